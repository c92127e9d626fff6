"""FFA-LoRA (Sun et al., 2024): A is frozen at a shared random init; only B trains.

Every client builds A from the same seed (peft's Kaiming init under ``scenario.seed``), so
A is identical everywhere and never travels. With A fixed, averaging B is exact:
``sum p_i B_i A = (sum p_i B_i) A``.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import Strategy

from fedpeft.adapters import AdapterState
from fedpeft.config import Scenario
from fedpeft.strategies import register_strategy
from fedpeft.strategies.adapter_strategy import AdapterStrategy, instruct, select

TRAVELS = {"lora_B", "head"}


class FFALoRA(AdapterStrategy):
    """FFA-LoRA: frozen shared A, average B (exact); A is never sent."""

    def down_state(self, server_round: int, node_id: int) -> AdapterState:
        """B and the head only."""
        return select(self.global_state, TRAVELS)

    def instructions(self, server_round: int, node_id: int) -> dict[str, str | int | float]:
        """Train and send B (and the head); A stays at the shared init."""
        return instruct(",".join(sorted(TRAVELS)))


def build_ffa_lora(scenario: Scenario, sampling: dict[str, Any]) -> Strategy:
    """FFA-LoRA with FedAvg's sampling."""
    return FFALoRA(scenario, sampling)


register_strategy(
    "ffa_lora",
    "frozen shared A from the seed, average B only (exact)",
    build_ffa_lora,
    lora_only=True,
    weighted_sum=True,
    streams_replies=True,
)
