"""The ``lora`` and ``qlora`` parts of ``benchmarks/gpu.py``: LoRA clients built as fedpeft does."""

from __future__ import annotations

import importlib.util
import traceback
from pathlib import Path
from typing import Any

import torch
from gpu_common import (
    CLASSES,
    LLAMA_TARGETS,
    MINILM_TARGETS,
    Sizes,
    Skip,
    classification_rows,
    instruction_rows,
    llama_folder,
    minilm_source,
    precisions,
    release,
    synthetic_words,
    thirds,
)


def lora_client(
    device: torch.device,
    model_name: str,
    task: str,
    rows: dict[str, list[Any]],
    held_out: dict[str, list[Any]],
    *,
    sizes: Sizes,
    precision: str,
    quantization: str = "none",
    num_labels: int = 0,
) -> dict[str, Any]:
    """One LoRA client as fedpeft's ClientApp builds it, trained in three timed thirds.

    The base model loads through ``load_base_model`` (quantized straight onto ``device``
    with ``quantization``), gets LoRA from ``build_peft_model``, trains with
    ``train_steps`` at ``precision`` and is scored by its task on ``held_out`` before and
    after. Step time leaves out the first third (warm-up).
    """
    import datasets

    from fedpeft.adapters import count_trainable
    from fedpeft.models import load_tokenizer, total_params
    from fedpeft.tasks import get_task

    release(device)
    model, weights_mb = client_model(device, model_name, task, sizes, quantization, num_labels)
    tokenizer = load_tokenizer(model_name)
    collate = get_task(task).make_collate(tokenizer, sizes.max_length)
    held = datasets.Dataset.from_dict(held_out)
    before = held_out_scores(model, task, tokenizer, held, sizes, device)
    parts = train_in_thirds(
        model, collate, datasets.Dataset.from_dict(rows), sizes, device, precision
    )
    after = held_out_scores(model, task, tokenizer, held, sizes, device)
    result = {
        "task": task,
        "quantization": quantization,
        "precision": precision,
        "params": total_params(model),
        "trainable": count_trainable(model),
        "weights_mb": weights_mb,
        **thirds_summary(parts),
        "eval_loss": [before["eval_loss"], after["eval_loss"]],
        "eval_accuracy": [before["eval_accuracy"], after["eval_accuracy"]],
        "loss_fell": after["eval_loss"] < before["eval_loss"],
    }
    del model, parts
    release(device)
    return result


def client_model(
    device: torch.device,
    model_name: str,
    task: str,
    sizes: Sizes,
    quantization: str,
    num_labels: int,
) -> tuple[torch.nn.Module, float]:
    """The base model with LoRA on ``device``, and the base weights' size in MiB."""
    from fedpeft.config import ModelSection, PeftSection
    from fedpeft.methods import build_peft_model
    from fedpeft.models import load_base_model

    model_cfg = ModelSection(
        name=model_name, task=task, device=str(device), quantization=quantization
    )
    targets = LLAMA_TARGETS if task == "causal-lm" else MINILM_TARGETS
    peft_cfg = PeftSection(r=sizes.rank, alpha=2.0 * sizes.rank, target_modules=targets)
    base = load_base_model(model_cfg, num_labels, device)
    weights_mb = base.get_memory_footprint() / 2**20
    model = build_peft_model(base, peft_cfg, task, seed=0)
    model.to(device)  # as the ClientApp does; a quantized base is already there
    return model, weights_mb


def held_out_scores(
    model: torch.nn.Module, task: str, tokenizer: Any, held: Any, sizes: Sizes, device: torch.device
) -> dict[str, float]:
    """The task's held-out loss and accuracy of ``model`` (``Task.evaluate``)."""
    from fedpeft.tasks import get_task

    return get_task(task).evaluate(
        model, tokenizer, held, batch_size=32, max_length=sizes.max_length, device=device
    )


def train_in_thirds(
    model: torch.nn.Module,
    collate: Any,
    data: Any,
    sizes: Sizes,
    device: torch.device,
    precision: str,
) -> list[Any]:
    """``sizes.steps`` steps in three calls of ``train_steps``: their ``TrainResult``s.

    Each third gets fresh batches (its seed) and a fresh optimizer, as in a new round.
    """
    from fedpeft.train import train_steps

    return [
        train_steps(
            model,
            collate,
            data,
            steps=n,
            batch_size=sizes.batch,
            lr=sizes.lr,
            seed=i,
            device=device,
            precision=precision,
        )
        for i, n in enumerate(thirds(sizes.steps))
    ]


def thirds_summary(parts: list[Any]) -> dict[str, Any]:
    """Step time (the first third left out: warm-up), peak memory and loss of each third."""
    timed = parts[1:]
    return {
        "step_ms": 1e3 * sum(p.step_seconds * p.steps for p in timed) / sum(p.steps for p in timed),
        "warmup_step_ms": 1e3 * parts[0].step_seconds,
        "peak_memory_mb": max(p.peak_memory_mb for p in parts),
        "losses": [p.train_loss for p in parts],
    }


def client_run(
    part: str, model: str, weights: str, device: torch.device, **settings: Any
) -> dict[str, Any]:
    """:func:`lora_client` with ``settings``, or its error: one failing setting loses no other."""
    entry: dict[str, Any] = {"model": model, "weights": weights}
    try:
        entry.update(lora_client(device, **settings))
    except Exception as err:  # noqa: BLE001 - recorded, and the script exits 1
        traceback.print_exc()
        entry["error"] = f"{type(err).__name__}: {err}"
        print(f"{part:6} {model:16} failed: {entry['error']}", flush=True)
        return entry
    base = entry["quantization"] if entry["quantization"] != "none" else "full"
    print(
        f"{part:6} {model:16} {base:5} {entry['precision']:5} step {entry['step_ms']:7.1f} ms"
        f"  peak {entry['peak_memory_mb']:8.0f} MiB  held-out loss {entry['eval_loss'][0]:.3f}"
        f" -> {entry['eval_loss'][1]:.3f}",
        flush=True,
    )
    return entry


def llama_runs(
    part: str, device: torch.device, sizes: Sizes, work: Path, variants: list[dict[str, str]]
) -> list[dict[str, Any]]:
    """The random Llama as a LoRA client once per variant (its precision, quantization)."""
    words = synthetic_words(sizes.words)
    llama = llama_folder(work, sizes)
    rows, held = instruction_rows(words, sizes.rows, 1), instruction_rows(words, 64, 11)
    return [
        client_run(
            part,
            llama.name,
            "random (LlamaConfig)",
            device,
            model_name=str(llama),
            task="causal-lm",
            rows=rows,
            held_out=held,
            sizes=sizes,
            **variant,
        )
        for variant in variants
    ]


def lora_part(device: torch.device, sizes: Sizes, work: Path) -> dict[str, Any]:
    """The Llama and the MiniLM classifier, LoRA at every precision ``device`` offers."""
    variants = [{"precision": precision} for precision in precisions(device)]
    runs = llama_runs("lora", device, sizes, work, variants)
    if sizes.minilm:
        words = synthetic_words(sizes.words)
        name, weights = minilm_source(work, sizes)
        cls_rows = classification_rows(words, sizes.rows, CLASSES, seed=2)
        cls_held = classification_rows(words, 64, CLASSES, seed=12)
        runs += [
            client_run(
                "lora",
                "minilm",
                weights,
                device,
                model_name=name,
                task="seq-cls",
                rows=cls_rows,
                held_out=cls_held,
                sizes=sizes,
                precision=precision,
                num_labels=CLASSES,
            )
            for precision in precisions(device)
        ]
    return {"runs": runs}


def qlora_part(device: torch.device, sizes: Sizes, work: Path) -> dict[str, Any]:
    """The Llama loaded in 4 and in 8 bits through bitsandbytes, LoRA on top."""
    if device.type != "cuda":
        raise Skip(f"bitsandbytes quantization needs a CUDA device, not '{device}'")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skip("bitsandbytes is not installed here (carry its wheel: see the docstring)")
    variants = [{"precision": "auto", "quantization": bits} for bits in ("4bit", "8bit")]
    return {"runs": llama_runs("qlora", device, sizes, work, variants)}
