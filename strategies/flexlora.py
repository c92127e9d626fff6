"""FlexLoRA (Bai et al., 2024): aggregate full products, redistribute each client's rank.

The server forms ``W = sum p_i s_i B_i A_i`` (``s_i`` peft's scaling of client i at its
rank: ``alpha / r_i``, or ``alpha / sqrt(r_i)`` with rsLoRA), takes its SVD and gives each
client the best rank-``r_j`` approximation split into LoRA factors: ``B = U S / s_j``,
``A = V^T`` as the authors' code does (``strategy.svd_split = "left"``), or sqrt(S) into
both (``"sqrt"``). The SVD is computed from the stacked factors, never from the d x k
matrix: exactly (QR + a small core SVD) while the stacked rank is small, and by a seeded
randomised range finder when hundreds of clients make it large (``strategy.flexlora_svd``,
:func:`fedpeft.strategies.lora_math.top_svd`). The sum is exact; redistribution truncates.

Nodes that have not replied yet get the largest rank's factors; a client keeps the
leading components (the rank-r_j truncation, since SVD components are ordered). After a
node's first reply its rank is known and it gets exactly its own truncation.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.serverapp.strategy import Strategy

from fedpeft.adapters import AdapterState, lora_pairs
from fedpeft.config import Scenario
from fedpeft.strategies import register_strategy
from fedpeft.strategies.adapter_strategy import AdapterStrategy
from fedpeft.strategies.lora_math import top_svd, truncate_to_rank


class FlexLoRA(AdapterStrategy):
    """FlexLoRA: SVD of the weighted sum of B_i A_i; client j gets its rank-r_j truncation."""

    heterogeneous_ranks = True

    def __init__(self, scenario: Scenario, sampling: dict[str, Any]) -> None:
        super().__init__(scenario, sampling)
        self.svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.svd_methods: dict[str, int] = {}  # method -> matrices it decomposed, so far

    def _factors(self, rank: int) -> AdapterState:
        state = dict(self.global_state)
        if not self.svd:
            return state
        scaling, split = self.scaling(rank), self.scenario.strategy.svd_split
        for module, (a_key, b_key) in lora_pairs(list(state)).items():
            u, s, v = self.svd[module]
            b, a = truncate_to_rank(u, s, v, rank, scaling, split)
            dtype = state[a_key].dtype
            state[a_key], state[b_key] = a.to(dtype), b.to(dtype)
        return state

    def down_state(self, server_round: int, node_id: int) -> AdapterState:
        """The node's own rank's truncation (the largest rank until the node has replied)."""
        return self._factors(self.node_ranks.get(node_id, self.scenario.max_rank))

    def aggregate_states(
        self,
        server_round: int,
        states: list[AdapterState],
        weights: list[float],
        node_ids: list[int],
    ) -> None:
        """Exact weighted sum of products, kept as its SVD; the head is averaged."""
        method, seed = self.scenario.strategy.flexlora_svd, self.scenario.seed + server_round
        for module, stacked_b, stacked_a in self.product_sums(states, weights):
            self.svd[module], used = top_svd(
                stacked_b, stacked_a, self.scenario.max_rank, method, seed
            )
            self.svd_methods[used] = self.svd_methods.get(used, 0) + 1
        self.average_heads(states, weights)

    def eval_state(self) -> AdapterState:
        """The server model's (largest-rank) truncation."""
        return self._factors(self.scenario.max_rank)

    def settings(self) -> dict[str, object]:
        """The scaling, and how the SVD is split into factors."""
        used = ", ".join(f"{m} for {n} matrices" for m, n in sorted(self.svd_methods.items()))
        return {
            **super().settings(),
            "SVD split": self.scenario.strategy.svd_split,
            "SVD": f"{self.scenario.strategy.flexlora_svd} ({used or 'none yet'})",
        }


def build_flexlora(scenario: Scenario, sampling: dict[str, Any]) -> Strategy:
    """FlexLoRA with FedAvg's sampling."""
    return FlexLoRA(scenario, sampling)


register_strategy(
    "flexlora",
    "SVD of the weighted sum of products; each client gets its rank's truncation",
    build_flexlora,
    heterogeneous_ranks=True,
    lora_only=True,
    new_factors_each_round="hands out freshly SVD-decomposed factors (a new basis) every round",
)
