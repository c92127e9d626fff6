"""Houlsby bottleneck adapters (Houlsby et al., 2019) after attention and after the FFN.

Written by hand because Hugging Face peft has no Houlsby bottleneck adapter, and
AdapterHub's ``adapters`` package pins transformers 4.x so it cannot be used with
transformers 5.

Each output projection of an attention block and of a feed-forward block is wrapped:
``y = base_layer(x); y + up(gelu(down(y)))``, the adapter sitting before the block's
residual sum (and, in BERT, its LayerNorm), as in the paper. ``up`` starts at zero, so
the adapted model starts exactly equal to the base model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fedpeft.config import PeftSection, ScenarioError
from fedpeft.methods.registry import MethodContext, register_method

# model_type -> name suffixes of the attention and feed-forward output projections
DEFAULT_MODULES: dict[str, list[str]] = {
    "bert": ["output.dense"],  # attention.output.dense and the FFN's output.dense
    "roberta": ["output.dense"],
    "vit": ["attention.o_proj", "mlp.fc2"],  # transformers 5 names
    "llama": ["o_proj", "down_proj"],
    "mistral": ["o_proj", "down_proj"],
    "qwen2": ["o_proj", "down_proj"],
    "gpt2": ["attn.c_proj", "mlp.c_proj"],
}


class BottleneckAdapter(nn.Module):
    """A frozen layer followed by a trainable bottleneck with its own skip connection."""

    def __init__(self, base_layer: nn.Module, hidden: int, bottleneck: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        weight = _weight_of(base_layer)
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        kw: dict[str, Any] = {"device": weight.device, "dtype": dtype}
        self.down = nn.Linear(hidden, bottleneck, **kw)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, hidden, **kw)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # nn.Linear's default
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # the adapter starts as the identity
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer's output plus the bottleneck's correction of it."""
        y = self.base_layer(x, *args, **kwargs)
        return y + self.up(self.act(self.down(y)))


def _weight_of(layer: nn.Module) -> torch.Tensor:
    while isinstance(getattr(layer, "base_layer", None), nn.Module):
        layer = layer.base_layer  # type: ignore[assignment]
    return layer.weight  # type: ignore[return-value]


def _out_features(name: str, layer: nn.Module) -> int:
    """Output width of nn.Linear (and peft's wrappers) or of transformers' Conv1D (``nf``)."""
    for attr in ("out_features", "nf"):
        if isinstance(width := getattr(layer, attr, None), int):
            return width
    raise ScenarioError(
        f"peft.adapter_modules matches {name!r} ({type(layer).__name__}), which is not a "
        "linear layer: name the attention and feed-forward output projections"
    )


def apply_adapter(model: nn.Module, cfg: PeftSection, ctx: MethodContext) -> None:
    """Wrap each matching output projection in a :class:`BottleneckAdapter` of width ``r``."""
    suffixes = list(cfg.adapter_modules) or DEFAULT_MODULES.get(ctx.model_type)
    if suffixes is None:
        raise ScenarioError(
            f"peft.method 'adapter' has no default positions for model type "
            f"{ctx.model_type!r}: set peft.adapter_modules to the attention and feed-forward "
            f"output projections (defaults exist for {', '.join(sorted(DEFAULT_MODULES))})"
        )
    heads = set(ctx.head_modules)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if any(name == s or name.endswith(f".{s}") for s in suffixes)
        and not heads & set(name.split("."))
    ]
    if not found:
        raise ScenarioError(
            f"peft.adapter_modules={suffixes} matches no module of {type(model).__name__}; "
            "name the attention and feed-forward output projections"
        )
    for name, layer in found:
        parent, _, child = name.rpartition(".")
        wrapper = BottleneckAdapter(layer, _out_features(name, layer), cfg.r)
        setattr(model.get_submodule(parent), child, wrapper)


register_method(
    "adapter",
    "additive",
    "Houlsby bottleneck adapters after each attention and feed-forward block",
    kind="fedpeft",
    apply=apply_adapter,
)
