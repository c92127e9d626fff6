"""FedAvg, FedProx and FedAvgM: Flower's own strategies, registered for scenarios.

On adapter tensors, FedAvg is FedIT (Zhang et al., 2024): the LoRA factors A and B are
averaged separately, weighted by each client's ``num-examples``.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAvg, FedAvgM, FedProx, Strategy

from fedpeft.config import Scenario
from strategies import register_strategy


def build_fedavg(scenario: Scenario, sampling: dict[str, Any]) -> Strategy:
    """Weighted average of the clients' adapter tensors."""
    return FedAvg(**sampling)


def build_fedprox(scenario: Scenario, sampling: dict[str, Any]) -> Strategy:
    """FedAvg on the server; clients add ``mu/2 ||w - w_global||^2`` (sent as proximal-mu)."""
    return FedProx(proximal_mu=scenario.strategy.proximal_mu, **sampling)


def build_fedavgm(scenario: Scenario, sampling: dict[str, Any]) -> Strategy:
    """FedAvg with server-side momentum on the averaged update."""
    return FedAvgM(
        server_learning_rate=scenario.strategy.momentum_lr,
        server_momentum=scenario.strategy.server_momentum,
        **sampling,
    )


register_strategy("fedavg", "weighted average of adapter tensors (FedIT on LoRA)", build_fedavg)
register_strategy("fedprox", "FedAvg + client-side proximal term (mu)", build_fedprox)
register_strategy("fedavgm", "FedAvg with server momentum", build_fedavgm)
