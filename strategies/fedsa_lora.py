"""FedSA-LoRA (Guo et al., 2025): share A, keep B on each client (personalised).

A learns what is common across clients and is averaged; each client's B stays local and
persists across rounds in the client's state store. A client trained for the first time
starts from the initial B (zero). With ``strategy.personal_head`` (the authors' code for
classification) each client keeps its own task head the same way; without it the head is
averaged. The global model (shared A, initial B, and the initial head when it is
personal) is reported next to the personalised one (shared A, each client's own B and
head on its local held-out part).
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import Strategy

from fedpeft.adapters import AdapterState
from fedpeft.config import Scenario
from fedpeft.strategies import register_strategy
from fedpeft.strategies.adapter_strategy import AdapterStrategy, instruct, select


class FedSALoRA(AdapterStrategy):
    """FedSA-LoRA: average A; every client keeps its own B (and, by default, its own head)."""

    personalised = True

    @property
    def personal(self) -> set[str]:
        """The factors each client keeps: B, and the head with ``strategy.personal_head``."""
        return {"lora_B", "head"} if self.scenario.strategy.personal_head else {"lora_B"}

    @property
    def shared(self) -> set[str]:
        """The factors that travel and are averaged: A, and the head unless it is personal."""
        return {"lora_A", "head"} - self.personal

    def down_state(self, server_round: int, node_id: int) -> AdapterState:
        """The shared part."""
        return select(self.global_state, self.shared)

    def instructions(self, server_round: int, node_id: int) -> dict[str, str | int | float]:
        """Train everything, send the shared part, keep the personal one."""
        return instruct(
            "head,lora_A,lora_B",
            send=",".join(sorted(self.shared)),
            personal=",".join(sorted(self.personal)),
        )

    def settings(self) -> dict[str, object]:
        """The scaling, and whether the head stays on each client."""
        return {**super().settings(), "Personal head": self.scenario.strategy.personal_head}


def build_fedsa_lora(scenario: Scenario, sampling: dict[str, Any]) -> Strategy:
    """FedSA-LoRA with FedAvg's sampling (plus personalised evaluation)."""
    return FedSALoRA(scenario, sampling)


register_strategy(
    "fedsa_lora",
    "average A, keep B on each client (personalised)",
    build_fedsa_lora,
    lora_only=True,
    weighted_sum=True,
    streams_replies=True,
)
