"""FLoRA (Wang et al., 2024): stack the client adapters, merge them into the base, restart.

``B = [B_1 .. B_K]`` and ``A = [p_1 s_1 A_1; ..; p_K s_K A_K]`` give ``B A = sum p_i s_i
B_i A_i`` exactly, for any mix of ranks. Every client merges that update into its frozen
base weights and starts a fresh adapter each round. The server keeps the merged total in
factored form (re-factored to its numerical rank, at most min(d, k), after each round)
and sends it with every instruction; that download grows with the merged rank and is
counted as sent. The final adapter saved in peft format carries the whole merged update.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import Strategy

from fedpeft.adapters import AdapterState, lora_pairs
from fedpeft.config import Scenario
from fedpeft.strategies import register_strategy
from fedpeft.strategies.adapter_strategy import HoldsReplies, select
from fedpeft.strategies.lora_math import accumulate_factors


class FLoRA(HoldsReplies):
    """FLoRA: stack B_i and p_i s_i A_i (exact sum of products), merge into the base."""

    heterogeneous_ranks = True

    def down_state(self, server_round: int, node_id: int) -> AdapterState:
        """Only the head: each round's adapter restarts from the shared initial LoRA."""
        return select(self.global_state, {"head"})

    def aggregate_states(
        self,
        server_round: int,
        states: list[AdapterState],
        weights: list[float],
        node_ids: list[int],
    ) -> None:
        """Merge the stacked update into the running base delta; average the head."""
        for module, p, q in self.product_sums(states, weights):
            self.base_delta[module] = accumulate_factors(self.base_delta.get(module), p, q)
        self.average_heads(states, weights)

    def export(self) -> tuple[AdapterState, int, float]:
        """One LoRA adapter whose ``B A`` is the merged total (peft's scaling 1)."""
        return self.export_unscaled(*export_with_base(self.global_state, self.base_delta, None))


def export_with_base(
    state: AdapterState,
    base_delta: dict[str, tuple[Any, Any]],
    extra: dict[str, tuple[Any, Any]] | None,
) -> tuple[AdapterState, int]:
    """Pack a base delta (plus optional scaled ``(B, A)`` per module) into one LoRA state.

    Every module gets the same rank (the largest needed; others are zero-padded); ``B @ A``
    is the delta itself, so the adapter is saved with peft's scaling 1
    (:meth:`AdapterStrategy.export_unscaled`). Returns (state, rank).
    """
    import torch

    pairs = lora_pairs(list(state))
    blocks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in pairs:
        parts = [base_delta[module]] if module in base_delta else []
        if extra and module in extra:
            parts.append(extra[module])
        if parts:
            blocks[module] = (
                torch.cat([p for p, _ in parts], 1),
                torch.cat([q for _, q in parts], 0),
            )
    rank = max([b.shape[1] for b, _ in blocks.values()] or [1])
    out = select(state, {"head"})
    for module, (a_key, b_key) in pairs.items():
        d, k = state[b_key].shape[0], state[a_key].shape[1]
        b_full = torch.zeros(d, rank, dtype=torch.float64)
        a_full = torch.zeros(rank, k, dtype=torch.float64)
        if module in blocks:
            b, a = blocks[module]
            b_full[:, : b.shape[1]], a_full[: a.shape[0], :] = b, a
        out[b_key], out[a_key] = b_full.float(), a_full.float()
    return out, rank


def build_flora(scenario: Scenario, sampling: dict[str, Any]) -> Strategy:
    """FLoRA with FedAvg's sampling."""
    return FLoRA(scenario, sampling)


register_strategy(
    "flora",
    "stack client factors (exact, any ranks), merge into the base, restart adapters",
    build_flora,
    heterogeneous_ranks=True,
    lora_only=True,
    new_factors_each_round="restarts LoRA every round",
    changes_base=True,
)
