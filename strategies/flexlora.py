"""FlexLoRA (Bai et al., 2024): aggregate full products, redistribute each client's rank.

The server forms ``W = sum p_i s_i B_i A_i`` (``s_i`` peft's scaling of client i at its
rank: ``alpha / r_i``, or ``alpha / sqrt(r_i)`` with rsLoRA), takes its SVD and gives each
client the best rank-``r_j`` approximation split into LoRA factors: ``B = U S / s_j``,
``A = V^T`` as the authors' code does (``strategy.svd_split = "left"``), or sqrt(S) into
both (``"sqrt"``). The SVD is computed from the stacked factors, never from the d x k
matrix (``strategy.flexlora_svd``): exactly (QR + a small core SVD) while the stacked rank
is small; by a seeded randomised range finder with power iterations when many clients make
it large (:func:`fedpeft.strategies.lora_math.top_svd`); and, when the round's factors
would not fit in ``HELD_FACTORS_BYTES``, by a streaming SVD folded as the replies
arrive (:class:`fedpeft.strategies.streaming_svd.StreamingSVD`), so that the server's memory
no longer grows with the clients. The first two hold the round's factors and are exact to
the sum; the streaming SVD is exact while the sum's rank is at most ``4 r_max``, and as
close beyond as the spectrum decays.

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
from fedpeft.strategies.adapter_strategy import HoldsReplies, select
from fedpeft.strategies.fold import WeightedSums
from fedpeft.strategies.lora_math import svd_costs, top_svd, truncate_to_rank
from fedpeft.strategies.streaming_svd import StreamingSVD

#: ``auto`` streams the replies when holding a round's factors (float64, as the exact
#: and randomised paths hold them) would take more than this
HELD_FACTORS_BYTES = 1 << 30


class FlexLoRA(HoldsReplies):
    """FlexLoRA: SVD of the weighted sum of B_i A_i; client j gets its rank-r_j truncation."""

    heterogeneous_ranks = True

    def __init__(self, scenario: Scenario, sampling: dict[str, Any]) -> None:
        super().__init__(scenario, sampling)
        self.svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.svd_methods: dict[str, int] = {}  # method -> matrices it decomposed, so far
        self.streaming: StreamingSVD | None = None  # this round's, when it streams
        self.truncations: dict[int, AdapterState] = {}  # rank -> factors, this round

    def _factors(self, rank: int) -> AdapterState:
        """The rank-``rank`` truncation, one object per rank until the next aggregation.

        Nodes of one rank then share one ArrayRecord (:meth:`AdapterStrategy._messages`).
        """
        cache = self.__dict__.setdefault("truncations", {})  # a checkpoint may predate it
        if rank not in cache:
            cache[rank] = self._truncate(rank)
        return cache[rank]

    def _truncate(self, rank: int) -> AdapterState:
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

    def method(self) -> str:
        """How this round's SVD is found: ``strategy.flexlora_svd``, or what ``auto`` picks.

        Auto, from the sampled clients' ranks and the adapter's shapes: exact while its flop
        count is the smaller, the randomised range finder while the factors fit in
        :data:`HELD_FACTORS_BYTES`, the streaming SVD beyond.
        """
        chosen = self.scenario.strategy.flexlora_svd
        if chosen != "auto":
            return chosen
        stacked = sum(self.node_ranks.get(n, self.scenario.max_rank) for n in self.last_trained)
        shapes = [
            (self.global_state[b].shape[0], self.global_state[a].shape[1])
            for a, b in lora_pairs(list(self.global_state)).values()
        ]
        if sum(8 * stacked * (d + k) for d, k in shapes) > HELD_FACTORS_BYTES:
            return "streaming"
        costs = [svd_costs(d, k, stacked, self.scenario.max_rank) for d, k in shapes]
        exact = sum(c["exact"] for c in costs) <= sum(c["randomized"] for c in costs)
        return "exact" if exact else "randomized"

    def start_aggregation(self, server_round: int) -> None:
        """Hold the round's replies, or start a streaming SVD that takes each as it comes."""
        if self.method() == "streaming":
            self._start_streaming()
        else:
            self.streaming = None
            super().start_aggregation(server_round)

    def _start_streaming(self) -> None:
        self.streaming = StreamingSVD(self.scenario.max_rank, self.device)
        self.heads = WeightedSums(self.device)  # the heads' mean; its total weighs the round

    def fold(self, server_round: int, state: AdapterState, weight: float, node_id: int) -> None:
        """Fold ``weight * s_i * B_i A_i`` into each module's streaming SVD (or hold it)."""
        if self.streaming is None:
            super().fold(server_round, state, weight, node_id)
            return
        for module, (a_key, b_key) in lora_pairs(list(state)).items():
            a = state[a_key]
            self.streaming.add(module, state[b_key], a, weight * self.scaling(a.shape[0]))
        self.heads.add(select(state, {"head"}), weight, node_id)

    def finish_aggregation(self, server_round: int) -> None:
        """SVD of each module's weighted sum of products; the head is averaged."""
        if self.streaming is None:
            super().finish_aggregation(server_round)
            return
        for module in self.streaming.modules:
            self.svd[module] = self.streaming.top_svd(module, 1.0 / self.heads.total)
        count = self.svd_methods.get("streaming", 0) + len(self.streaming.modules)
        self.svd_methods["streaming"] = count
        if self.heads.sums:
            self.global_state.update(self.heads.mean())
        self.streaming, self.heads, self.truncations = None, WeightedSums(), {}  # let go

    def aggregate_states(
        self,
        server_round: int,
        states: list[AdapterState],
        weights: list[float],
        node_ids: list[int],
    ) -> None:
        """Exact weighted sum of products, kept as its SVD; the head is averaged.

        The SVD is exact or randomised per module as ``strategy.flexlora_svd`` says (auto:
        the cheaper); with ``streaming`` the replies go through the streaming SVD one by one.
        """
        method = self.scenario.strategy.flexlora_svd
        if method == "streaming":
            self._start_streaming()
            for state, weight, node_id in zip(states, weights, node_ids, strict=True):
                self.fold(server_round, state, weight, node_id)
            self.finish_aggregation(server_round)
            return
        seed, device = self.scenario.seed + server_round, self.device
        for module, stacked_b, stacked_a in self.product_sums(states, weights):
            svd, used = top_svd(
                stacked_b.to(device), stacked_a.to(device), self.scenario.max_rank, method, seed
            )
            self.svd[module] = (svd[0].cpu(), svd[1].cpu(), svd[2].cpu())
            self.svd_methods[used] = self.svd_methods.get(used, 0) + 1
        self.average_heads(states, weights)
        self.truncations = {}

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
