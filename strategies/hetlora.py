"""HetLoRA (Cho et al., 2024): heterogeneous ranks by zero-padding and truncation.

Clients of rank r_i send factors that the server zero-pads to the largest rank and
averages with weights proportional to ``||B_i A_i||_F`` (the paper; larger updates count
more), or to ``p_i * ||B_i A_i||_F`` (``strategy.hetlora_weighting = "examples_norm"``);
client j receives the first r_j components. Clients add the rank self-pruning
regulariser to their loss and shrink their own rank when the tail of their factors has
become negligible (:mod:`fedpeft.strategies.lora_math`). All ranks share peft's scaling at
``r_max`` here (``alpha / r_max``, or ``alpha / sqrt(r_max)`` with rsLoRA: each client's
``lora_alpha`` is set to match), so padded factors of different ranks add up in the same
units.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.serverapp.strategy import Strategy

from fedpeft.adapters import AdapterState, lora_pairs
from fedpeft.config import Scenario
from fedpeft.state import scalar
from fedpeft.strategies import register_strategy
from fedpeft.strategies.adapter_strategy import ALL_FACTORS, HoldsReplies, instruct, lora_factors
from fedpeft.strategies.client_hook import ClientHook, Regulariser
from fedpeft.strategies.lora_math import (
    hetlora_aggregate,
    hetlora_prune_rank,
    hetlora_self_pruning_penalty,
    hetlora_truncate,
)


class HetLoRA(HoldsReplies):
    """HetLoRA: zero-pad to r_max, norm-weighted average, truncate to each client's rank."""

    heterogeneous_ranks = True

    def instructions(self, server_round: int, node_id: int) -> dict[str, str | int | float]:
        """Train and send everything, with shared scaling and rank self-pruning."""
        s = self.scenario.strategy
        return instruct(
            ALL_FACTORS,
            alpha_mode="shared-scaling",
            prune_gamma=s.hetlora_gamma,
            prune_threshold=s.hetlora_prune_threshold,
        )

    def down_state(self, server_round: int, node_id: int) -> AdapterState:
        """The first r_j components for a node of known rank r_j, else all of them."""
        rank = self.node_ranks.get(node_id)
        if rank is None:
            return self.global_state
        state = dict(self.global_state)
        for a_key, b_key in lora_pairs(list(state)).values():
            state[b_key], state[a_key] = hetlora_truncate(state[b_key], state[a_key], rank)
        return state

    def aggregate_states(
        self,
        server_round: int,
        states: list[AdapterState],
        weights: list[float],
        node_ids: list[int],
    ) -> None:
        """Pad, norm-weight and average each module's factors; average the head."""
        r_max, weighting = self.scenario.max_rank, self.scenario.strategy.hetlora_weighting
        for _, a_key, b_key, bs, as_ in lora_factors(states):
            b, a = hetlora_aggregate(bs, as_, weights, r_max, weighting)
            dtype = self.global_state[a_key].dtype
            self.global_state[a_key], self.global_state[b_key] = a.to(dtype), b.to(dtype)
        self.average_heads(states, weights)

    def settings(self) -> dict[str, object]:
        """The shared scaling, and how clients are weighted."""
        r_max = self.scenario.max_rank
        return {
            "LoRA scaling": f"{self.scaling(r_max):g} at every rank (peft's at r_max={r_max})",
            "Weighting": self.scenario.strategy.hetlora_weighting,
        }


class HetLoRAClient(ClientHook):
    """HetLoRA on the client: the self-pruning regulariser, and a rank that only shrinks.

    A client whose factors' tail has become negligible sends (and from then on trains) at a
    lower rank; it keeps that rank in its state store under :attr:`RANK_KEY`, and the
    components past it stay zero.
    """

    RANK_KEY = "__rank__"

    def current_rank(self, personal: AdapterState, rank: int) -> int:
        """The self-pruned rank kept from earlier rounds, else the adapter's."""
        return min(int(personal[self.RANK_KEY].item()), rank) if self.RANK_KEY in personal else rank

    def restore(self, state: AdapterState, personal: AdapterState) -> AdapterState:
        """Zero the components past the self-pruned rank."""
        if self.RANK_KEY not in personal:
            return state
        rank = int(personal[self.RANK_KEY].item())
        out = dict(state)
        for a_key, b_key in lora_pairs(list(state)).values():
            out[a_key] = state[a_key].clone()
            out[a_key][rank:, :] = 0
            out[b_key] = state[b_key].clone()
            out[b_key][:, rank:] = 0
        return out

    def regulariser(
        self,
        live: Mapping[str, torch.Tensor],
        current_rank: int,
        gamma: float,
        device: torch.device,
    ) -> Regulariser | None:
        """The rank self-pruning penalty on every module's live factors (gamma > 0)."""
        if gamma <= 0:
            return None
        pairs = [(live[a], live[b]) for a, b in lora_pairs(list(live)).values()]

        def penalty() -> torch.Tensor:
            return sum(
                (hetlora_self_pruning_penalty(b, a, current_rank, gamma) for a, b in pairs),
                torch.zeros((), device=device),
            )

        return penalty

    def rank_to_send(
        self, state: AdapterState, current_rank: int, gamma: float, threshold: float
    ) -> int:
        """With pruning on (gamma, threshold > 0), the smallest rank any module needs, >= 1."""
        if gamma <= 0 or threshold <= 0:
            return current_rank
        ranks = [
            hetlora_prune_rank(state[b_key], state[a_key], current_rank, 0.5, threshold)
            for a_key, b_key in lora_pairs(list(state)).values()
        ]
        return max(1, min(current_rank, max(ranks) if ranks else current_rank))

    def outgoing(self, state: AdapterState, rank: int) -> AdapterState:
        """The first ``rank`` components of each factor pair."""
        out = dict(state)
        for a_key, b_key in lora_pairs(list(state)).values():
            out[a_key], out[b_key] = state[a_key][:rank, :], state[b_key][:, :rank]
        return out

    def kept(self, sent_rank: int, rank: int) -> AdapterState:
        """The self-pruned rank, when it is below the adapter's."""
        return {self.RANK_KEY: scalar(sent_rank)} if sent_rank != rank else {}


def build_hetlora(scenario: Scenario, sampling: dict[str, Any]) -> Strategy:
    """HetLoRA with FedAvg's sampling."""
    return HetLoRA(scenario, sampling)


register_strategy(
    "hetlora",
    "zero-pad to r_max, norm-weighted average, truncate; rank self-pruning",
    build_hetlora,
    heterogeneous_ranks=True,
    lora_only=True,
    client_hook=HetLoRAClient(),
)
