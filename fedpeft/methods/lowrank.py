"""Other reparameterised low-rank methods through Hugging Face peft: LoHa, LoKr, VeRA."""

from __future__ import annotations

from peft import LoHaConfig, LoKrConfig, VeraConfig

from fedpeft.config import PeftSection
from fedpeft.methods.registry import MethodContext, register_method


def targets(cfg: PeftSection) -> list[str] | None:
    """The scenario's target modules; None lets peft pick its default for the model."""
    return list(cfg.target_modules) or None


def loha_config(cfg: PeftSection, ctx: MethodContext) -> LoHaConfig:
    """LoHa (Hyeon-Woo et al., 2022): Hadamard product of two low-rank products."""
    return LoHaConfig(
        r=cfg.r,
        alpha=cfg.alpha,  # type: ignore[arg-type]
        target_modules=targets(cfg),
        task_type=ctx.peft_task_type,
    )


def lokr_config(cfg: PeftSection, ctx: MethodContext) -> LoKrConfig:
    """LoKr (Yeh et al., 2023): Kronecker product of a small factor and a low-rank one."""
    return LoKrConfig(
        r=cfg.r,
        alpha=cfg.alpha,  # type: ignore[arg-type]
        target_modules=targets(cfg),
        task_type=ctx.peft_task_type,
    )


def vera_config(cfg: PeftSection, ctx: MethodContext) -> VeraConfig:
    """VeRA (Kopiczko et al., 2024): frozen random A, B shared by all layers; train scalings.

    The shared projections come from ``projection_prng_key`` (the scenario's seed), so
    every client and the server rebuild the same ones: they are never sent, nor saved
    (``save_projection=False``; peft regenerates them from the key on load).
    """
    return VeraConfig(
        r=cfg.r,
        target_modules=targets(cfg),
        projection_prng_key=ctx.seed,
        save_projection=False,
        vera_dropout=cfg.dropout,
        task_type=ctx.peft_task_type,
    )


register_method(
    "loha",
    "reparameterised",
    "Hadamard product of two low-rank products (FedPara-style)",
    kind="peft",
    peft_config=loha_config,
)
register_method(
    "lokr",
    "reparameterised",
    "Kronecker product of a small factor and a low-rank factor",
    kind="peft",
    peft_config=lokr_config,
)
register_method(
    "vera",
    "reparameterised",
    "shared frozen random projections (from the seed, never sent); trains scaling vectors",
    kind="peft",
    peft_config=vera_config,
    no_hybrid="peft injects VeRA's shared projections only through its own model wrapper",
)
