"""LoRA (Hu et al., 2021) and DoRA (Liu et al., 2024) through Hugging Face peft.

LoRA adds ``scaling * B @ A`` to each target matrix (``scaling = alpha / r``, or
``alpha / sqrt(r)`` with ``use_rslora``); DoRA also learns each column's magnitude.
"""

from __future__ import annotations

from typing import Any

from peft import LoraConfig

from fedpeft.config import PeftSection
from fedpeft.methods.lowrank import targets
from fedpeft.methods.registry import MethodContext, register_method

# peft's init_lora_weights values for the scenario's peft.init
INITS: dict[str, Any] = {"default": True, "gaussian": "gaussian", "orthogonal": "orthogonal"}


def lora_config(cfg: PeftSection, ctx: MethodContext, use_dora: bool = False) -> LoraConfig:
    """Peft's LoraConfig for the scenario (peft's default targets when none are named)."""
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # peft annotates int; floats work
        lora_dropout=cfg.dropout,
        target_modules=targets(cfg),
        use_rslora=cfg.use_rslora,
        init_lora_weights=INITS[cfg.init],
        use_dora=use_dora,
        task_type=ctx.peft_task_type,
    )


def dora_config(cfg: PeftSection, ctx: MethodContext) -> LoraConfig:
    """DoRA: LoRA on the direction, plus a trained magnitude vector per adapted matrix."""
    return lora_config(cfg, ctx, use_dora=True)


register_method(
    "lora",
    "reparameterised",
    "low-rank update B @ A on chosen matrices (use_rslora, init options)",
    kind="peft",
    peft_config=lora_config,
)
register_method(
    "dora",
    "reparameterised",
    "weight-decomposed LoRA: low-rank direction plus a trained magnitude",
    kind="peft",
    peft_config=dora_config,
)
