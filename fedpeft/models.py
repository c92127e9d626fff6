"""Model loading: the frozen base model, its adapted copy per process, and devices.

Which ``AutoModelFor...`` class builds the model, and what turns raw rows into model
inputs (a tokenizer, or an image preparation), is the task's choice (:mod:`fedpeft.tasks`);
what a name means (a bundled alias, hub id or path) is :mod:`fedpeft.model_sources`'s.
This module loads the weights and keeps the per-process cache.

The frozen base model is the expensive part of a client. In simulation, Ray keeps its
worker processes alive across rounds, so :func:`cached_peft_model` keeps one adapted model
per process and per (model, method) and only swaps adapter tensors between rounds.

``describe_base``, ``load_tokenizer`` and ``load_processor`` live below this module and
are re-exported here, where a model's callers look for them.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import logging
from typing import Any

import torch
from transformers import PreTrainedModel

from fedpeft.adapters import META_ATTR, get_adapter_state
from fedpeft.config import ModelSection, PeftSection, ScenarioError
from fedpeft.methods import build_peft_model
from fedpeft.model_sources import ALIASES, model_source
from fedpeft.model_sources import describe_base as describe_base
from fedpeft.model_sources import load_tokenizer as load_tokenizer
from fedpeft.tasks import get_task
from fedpeft.tasks import load_processor as load_processor

logger = logging.getLogger(__name__)

# Random tiny models (and freshly initialised heads) must be identical in every process
# and run, so they are built under this fixed seed, independent of the scenario's seed.
TINY_MODEL_SEED = 1234


def load_base_model(
    cfg: ModelSection, num_labels: int, device: torch.device | None = None
) -> PreTrainedModel:
    """Load the frozen base model for ``cfg.task`` (a head of ``num_labels`` classes if any).

    With ``cfg.quantization`` the pretrained weights load in 4 or 8 bits straight onto
    ``device`` (default: ``cfg.device`` resolved), which must be a CUDA device; other
    models load on the CPU and the caller moves them.
    """
    task = get_task(cfg.task)
    quantized = cfg.quantization != "none"
    load_kwargs: dict[str, Any] = {}
    if quantized:
        device = device or resolve_device(cfg.device)
        check_quantization(cfg, device)
        load_kwargs = _quantization_kwargs(cfg, device)
    # Random parts (a tiny config's weights, a fresh task head) are the same in every
    # process and every run, whatever the global RNG has done before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_MODEL_SEED)
        try:
            if cfg.name in ALIASES and (make_config := ALIASES[cfg.name][0]) is not None:
                model = task.model_from_config(make_config(), num_labels)
            else:
                model = task.model_from_pretrained(
                    model_source(cfg.name), num_labels, **load_kwargs
                )
        except (OSError, ValueError) as err:
            raise ScenarioError(
                f"cannot load model.name={cfg.name!r} for model.task={cfg.task!r} (not a "
                f"bundled alias, local folder or reachable hub id for this task): "
                f"{str(err).splitlines()[0]}"
            ) from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = 0
    if quantized:
        from peft import prepare_model_for_kbit_training

        # freezes the base and casts what stays unquantized (norms, heads) to fp32;
        # checkpointing is this module's own setting, applied below
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.requires_grad_(False)
    return model


def check_quantization(cfg: ModelSection, device: torch.device) -> None:
    """Refuse, in one line, a ``model.quantization`` this process cannot load on ``device``."""
    if cfg.quantization == "none":
        return
    key = f"model.quantization={cfg.quantization!r}"
    if cfg.name in ALIASES and ALIASES[cfg.name][0] is not None:
        raise ScenarioError(
            f"{key} quantizes pretrained weights, but model.name={cfg.name!r} is a random "
            "test model: set model.quantization='none' or name a pretrained model"
        )
    if device.type != "cuda" or not torch.cuda.is_available():
        where = f"'{device}'" + (" without CUDA available" if device.type == "cuda" else "")
        raise ScenarioError(
            f"{key} needs bitsandbytes on a CUDA device, but this node trains on {where}: "
            "run it on CUDA (model.device or the node's device), or set model.quantization='none'"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ScenarioError(
            f"{key} needs bitsandbytes, which is not installed here: pip install "
            "bitsandbytes, or set model.quantization='none'"
        )


def _quantization_kwargs(cfg: ModelSection, device: torch.device) -> dict[str, Any]:
    """``from_pretrained`` arguments that load the weights quantized onto ``device``.

    4-bit is QLoRA's recipe: NF4 weights, double-quantized scales, and matrix products
    in bf16 (fp16 on GPUs without native bf16).
    """
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if native_bf16() else torch.float16,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"quantization_config": config, "device_map": {"": index}}


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in the backward pass instead of keeping them.

    Non-reentrant checkpointing passes gradients to trainable adapter weights inside a
    checkpointed block even though the frozen block's inputs need none.
    """
    if not model.supports_gradient_checkpointing:
        raise ScenarioError(
            f"model.gradient_checkpointing=true, but {type(model).__name__} does not support "
            "it: set model.gradient_checkpointing=false"
        )
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # newer transformers
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def native_bf16() -> bool:
    """Whether the current CUDA device computes in bf16 natively (Ampere or newer)."""
    if not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3 has no emulation and no argument
        return torch.cuda.is_bf16_supported()


def total_params(model: torch.nn.Module) -> int:
    """Number of parameters of the whole model, base and adapter."""
    return sum(p.numel() for p in model.parameters())


def resolve_device(name: str) -> torch.device:
    """Map ``auto`` to the best available device (cuda, then mps, then cpu)."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_label(device: torch.device) -> str:
    """The device as a node reports it: ``cpu``, ``mps``, ``cuda:0 (NVIDIA H200)``."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


_CACHE: dict[str, Any] = {}
LOADS = {"base_model": 0}  # how often this process really built a model (for tests and logs)


def cached_peft_model(
    model_cfg: ModelSection,
    peft_cfg: PeftSection,
    num_labels: int,
    seed: int,
    device: torch.device | None = None,
) -> torch.nn.Module:
    """Return this process's adapted model, building it on first use.

    The adapter's initial values depend on ``seed``; callers overwrite them with the
    global adapter before use, so only the server's copy keeps them. ``device`` is where
    a quantized base model loads (see :func:`load_base_model`); others load on the CPU.
    """
    key = repr((model_cfg, peft_cfg, num_labels, seed))
    if key not in _CACHE:
        base = load_base_model(model_cfg, num_labels, device)
        model = build_peft_model(base, peft_cfg, model_cfg.task, seed)
        # what fedpeft's adapter loader needs to rebuild this model (see adapter_files.save_adapter)
        getattr(model, META_ATTR).update(model=dataclasses.asdict(model_cfg), num_labels=num_labels)
        _CACHE[key] = model
        _CACHE["initial:" + key] = get_adapter_state(model)
        LOADS["base_model"] += 1
    return _CACHE[key]


def free_cached_models() -> int:
    """Drop this process's cached models and give their memory back (GPU memory too).

    A deployed node's trainer calls it when a new run starts or the node falls idle.
    Returns how many models were dropped.
    """
    dropped = sum(1 for key in _CACHE if not key.startswith("initial:"))
    _CACHE.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return dropped


def initial_adapter_state(
    model_cfg: ModelSection, peft_cfg: PeftSection, num_labels: int, seed: int
) -> dict[str, torch.Tensor]:
    """The adapter exactly as :func:`cached_peft_model` first built it (same in every process).

    A new dict each call, so a caller may replace its entries; the tensors are the cache's
    own and must not be modified in place.
    """
    cached_peft_model(model_cfg, peft_cfg, num_labels, seed)
    state: dict[str, torch.Tensor] = _CACHE[
        "initial:" + repr((model_cfg, peft_cfg, num_labels, seed))
    ]
    return dict(state)
