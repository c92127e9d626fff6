"""RoLoRA (Chen et al., 2024): alternate which factor is trained and averaged.

Odd rounds freeze A and average B; even rounds freeze B and average A. With one factor
frozen and shared, averaging the other is exact for that round. The server sends both
factors (the client needs both); the client sends back only the one it trained.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import Strategy

from fedpeft.config import Scenario
from fedpeft.strategies import register_strategy
from fedpeft.strategies.adapter_strategy import AdapterStrategy, instruct


def trained_factor(server_round: int) -> str:
    """``lora_B`` in odd rounds, ``lora_A`` in even rounds."""
    return "lora_B" if server_round % 2 == 1 else "lora_A"


class RoLoRA(AdapterStrategy):
    """RoLoRA: alternate rounds train-and-average B (A frozen), then A (B frozen)."""

    def instructions(self, server_round: int, node_id: int) -> dict[str, str | int | float]:
        """Train and send this round's factor and the head."""
        return instruct(f"head,{trained_factor(server_round)}")


def build_rolora(scenario: Scenario, sampling: dict[str, Any]) -> Strategy:
    """RoLoRA with FedAvg's sampling."""
    return RoLoRA(scenario, sampling)


register_strategy(
    "rolora",
    "alternate rounds: average B with A frozen, then A with B frozen",
    build_rolora,
    lora_only=True,
    weighted_sum=True,
    streams_replies=True,
)
