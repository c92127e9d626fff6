"""BitFit (Zaken et al., 2021): train every bias term of the base model, nothing else.

Written by hand because Hugging Face peft has no BitFit, and AdapterHub's ``adapters``
package, which has one, pins transformers 4.x and cannot be used with transformers 5.
"""

from __future__ import annotations

import torch

from fedpeft.config import PeftSection, ScenarioError
from fedpeft.methods.registry import MethodContext, register_method


def base_biases(model: torch.nn.Module, ctx: MethodContext) -> dict[str, torch.nn.Parameter]:
    """The base model's bias terms (linear, attention and LayerNorm biases), by name.

    The task head is left out (the registry trains it anyway), as is anything another
    method already trains: the base arrives frozen, so a frozen bias is a base bias.
    """
    return {
        name: p
        for name, p in model.named_parameters()
        if name.rsplit(".", 1)[-1] == "bias"
        and not p.requires_grad
        and not set(name.split(".")) & set(ctx.head_modules)
    }


def apply_bitfit(model: torch.nn.Module, cfg: PeftSection, ctx: MethodContext) -> None:
    """Make every bias of the base model trainable; refuse a model that has none."""
    biases = base_biases(model, ctx)
    if not biases:
        raise ScenarioError(
            f"peft.method 'bitfit' cannot apply: {type(model).__name__} has no bias terms "
            "to train; use another method such as 'lora' or 'ia3'"
        )
    for p in biases.values():
        p.requires_grad_(True)


register_method(
    "bitfit",
    "selective",
    "trains every bias term of the base model (incl. LayerNorm), nothing else",
    kind="fedpeft",
    apply=apply_bitfit,
)
