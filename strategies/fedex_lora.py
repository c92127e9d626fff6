"""FedEx-LoRA (Singhal et al., 2025): FedIT plus the exact residual folded into the base.

The averaged factors ``B, A`` stay the global adapter; what FedIT misses,
``s (sum p_i B_i A_i - B A)``, is folded into every client's frozen base weights (in peft's
orientation, transposed for GPT-2's Conv1D). The server keeps the running residual in
factored form (at most rank min(d, k)) and sends it with every instruction, counted as
sent; base plus adapter then equal the exact weighted sum of the clients' updates.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import Strategy

from fedpeft.adapters import AdapterState, lora_pairs
from fedpeft.config import Scenario
from fedpeft.strategies import register_strategy
from fedpeft.strategies.adapter_strategy import HoldsReplies, lora_factors, weighted_average
from fedpeft.strategies.flora import export_with_base
from fedpeft.strategies.lora_math import accumulate_factors, fedex_residual


class FedExLoRA(HoldsReplies):
    """FedEx-LoRA: FedIT's averages plus the residual folded into the frozen base."""

    def aggregate_states(
        self,
        server_round: int,
        states: list[AdapterState],
        weights: list[float],
        node_ids: list[int],
    ) -> None:
        """Average every tensor; add this round's residual to the running base delta."""
        scaling = self.scaling(self.scenario.max_rank)
        self.global_state = weighted_average(states, weights)  # before the factors go
        for module, _, _, bs, as_ in lora_factors(states):
            p, q = fedex_residual(bs, as_, weights, scaling)
            self.base_delta[module] = accumulate_factors(self.base_delta.get(module), p, q)

    def export(self) -> tuple[AdapterState, int, float]:
        """One LoRA adapter carrying the residuals and ``s B A`` (peft's scaling 1)."""
        scaling = self.scaling(self.scenario.max_rank)
        extra = {
            module: (scaling * self.global_state[b].double(), self.global_state[a].double())
            for module, (a, b) in lora_pairs(list(self.global_state)).items()
        }
        return self.export_unscaled(*export_with_base(self.global_state, self.base_delta, extra))


def build_fedex_lora(scenario: Scenario, sampling: dict[str, Any]) -> Strategy:
    """FedEx-LoRA with FedAvg's sampling."""
    return FedExLoRA(scenario, sampling)


register_strategy(
    "fedex_lora",
    "FedIT plus the exact residual folded into the frozen base weights",
    build_fedex_lora,
    lora_only=True,
    changes_base=True,
)
