"""FedSA-LoRA (Guo et al., 2025): share A, keep B on each client (personalised).

A learns what is common across clients and is averaged; each client's B stays local and
persists across rounds in the client's state store. A client trained for the first time
starts from the initial B (zero). The global model (shared A, initial B) is reported next
to the personalised one (shared A, each client's own B on its local held-out part).
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import Strategy

from fedpeft.adapters import AdapterState
from fedpeft.config import Scenario
from strategies import register_strategy
from strategies.adapter_strategy import AdapterStrategy, instruct, select

SHARED = {"lora_A", "head"}


class FedSALoRA(AdapterStrategy):
    """FedSA-LoRA: average A (and the head); every client keeps its own B."""

    personalised = True

    def down_state(self, server_round: int, node_id: int) -> AdapterState:
        """The shared part: A and the head."""
        return select(self.global_state, SHARED)

    def instructions(self, server_round: int, node_id: int) -> dict[str, str | int | float]:
        """Train everything, send A and the head, keep B."""
        return instruct("head,lora_A,lora_B", send=",".join(sorted(SHARED)), personal="lora_B")


def build_fedsa_lora(scenario: Scenario, sampling: dict[str, Any]) -> Strategy:
    """FedSA-LoRA with FedAvg's sampling (plus personalised evaluation)."""
    return FedSALoRA(scenario, sampling)


register_strategy(
    "fedsa_lora", "average A, keep B on each client (personalised)", build_fedsa_lora,
    lora_only=True,
)  # fmt: skip
