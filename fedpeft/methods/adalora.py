"""AdaLoRA (Zhang et al., 2023) through Hugging Face peft, with a federated rank budget.

AdaLoRA writes each update in SVD form ``P diag(E) Q`` (peft's ``lora_B``, ``lora_E``,
``lora_A``), adds an orthogonality penalty on P and Q to the loss, and prunes singular
values towards a smaller total rank as training goes on.

Federated semantics chosen here: the rank allocation is global and happens per round,
not per local step. At the start of round t every client keeps the ``b(t)`` largest
entries of ``|E|`` of the *received global* adapter (over all adapted matrices) and
zeroes the rest; ``b`` follows AdaLoRA's cubic schedule from ``r`` per matrix in round 1
to ``peft.adalora_target_r`` per matrix in the last round. Because the global E is the
same on every client, every client prunes the same triplets; a pruned entry gets no
gradient during local training, so it stays zero in every update and in their average.
peft's own allocator (``update_and_allocate``) is not called: its importance scores come
from each client's own gradients, so clients would prune different triplets and their
masks would not agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from peft import AdaLoraConfig

from fedpeft.config import PeftSection
from fedpeft.methods.lowrank import targets
from fedpeft.methods.registry import MethodContext, register_method


def adalora_config(cfg: PeftSection, ctx: MethodContext) -> AdaLoraConfig:
    """Peft's AdaLoraConfig; ``total_step`` is required by peft but unused (see module doc)."""
    return AdaLoraConfig(
        init_r=cfg.r,
        target_r=cfg.adalora_target_r,
        total_step=1,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]
        lora_dropout=cfg.dropout,
        target_modules=targets(cfg),
        task_type=ctx.peft_task_type,
    )


def rank_budget(init_r: int, target_r: int, matrices: int, server_round: int, rounds: int) -> int:
    """Total number of singular values kept in ``server_round`` (1-based) of ``rounds``.

    AdaLoRA's cubic schedule ``b = b_T + (b_0 - b_T) (1 - progress)^3``, with progress
    0 in the first round and 1 in the last.
    """
    start, end = init_r * matrices, target_r * matrices
    if rounds <= 1:
        return end
    progress = min(max((server_round - 1) / (rounds - 1), 0.0), 1.0)
    return int(round(end + (start - end) * (1.0 - progress) ** 3))


def singular_values(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every adapted matrix's ``lora_E`` vector (shape ``r x 1``)."""
    return [p for n, p in model.named_parameters() if ".lora_E." in f"{n}."]


def budget_mask(values: Sequence[torch.Tensor], budget: int) -> list[torch.Tensor]:
    """Keep-masks for the ``budget`` largest ``|E|`` entries over all matrices (ties: first)."""
    flat = torch.cat([v.detach().abs().flatten().float() for v in values])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if budget > 0:
        order = torch.sort(-flat, stable=True).indices
        keep[order[: min(budget, flat.numel())]] = True
    masks, start = [], 0
    for v in values:
        masks.append(keep[start : start + v.numel()].view_as(v))
        start += v.numel()
    return masks


def before_round(
    model: torch.nn.Module, cfg: PeftSection, server_round: int, rounds: int
) -> Callable[[], None] | None:
    """Prune to this round's budget and keep pruned entries frozen while training."""
    values = singular_values(model)
    if not values or server_round < 1:
        return None
    budget = rank_budget(cfg.r, cfg.adalora_target_r, len(values), server_round, rounds)
    masks = budget_mask(values, budget)
    handles = []
    with torch.no_grad():
        for value, mask in zip(values, masks, strict=True):
            value.mul_(mask.to(value.dtype))
            handles.append(value.register_hook(lambda g, m=mask: g * m.to(g.dtype)))

    def undo() -> None:
        for handle in handles:
            handle.remove()

    return undo


register_method(
    "adalora",
    "reparameterised",
    "SVD-form LoRA with a global, round-based rank budget (see fedpeft/methods/adalora.py)",
    kind="peft",
    peft_config=adalora_config,
    before_round=before_round,
    no_hybrid="peft adds its orthogonality penalty only in AdaLoRA's own model wrapper",
)
