"""FedAvg, FedProx, FedAvgM and the robust rules: Flower's own strategies, registered.

On adapter tensors, FedAvg is FedIT (Zhang et al., 2024): the LoRA factors A and B are
averaged separately, weighted by each client's ``num-examples``.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as flwr
from flwr.serverapp.strategy import Strategy

from fedpeft.config import Scenario
from fedpeft.strategies import register_strategy
from fedpeft.strategies.guard import GuardedReplies


# Flower's rules as they are, refusing replies they cannot use (strategies.guard)
class FedAvg(GuardedReplies, flwr.FedAvg):
    """Flower's FedAvg; unusable replies raise AggregationError."""


class FedProx(GuardedReplies, flwr.FedProx):
    """Flower's FedProx; unusable replies raise AggregationError."""


class FedAvgM(GuardedReplies, flwr.FedAvgM):
    """Flower's FedAvgM; unusable replies raise AggregationError."""


class FedMedian(GuardedReplies, flwr.FedMedian):
    """Flower's FedMedian; unusable replies raise AggregationError."""


class FedTrimmedAvg(GuardedReplies, flwr.FedTrimmedAvg):
    """Flower's FedTrimmedAvg; unusable replies raise AggregationError."""


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


register_strategy(
    "fedavg",
    "weighted average of adapter tensors (FedIT on LoRA)",
    build_fedavg,
    weighted_sum=True,
)
register_strategy(
    "fedprox", "FedAvg + client-side proximal term (mu)", build_fedprox, weighted_sum=True
)
register_strategy("fedavgm", "FedAvg with server momentum", build_fedavgm)


def build_fedmedian(scenario: Scenario, sampling: dict[str, Any]) -> Strategy:
    """Coordinate-wise median of the clients' tensors (each LoRA factor on its own)."""
    return FedMedian(**sampling)


def build_fedtrimmedavg(scenario: Scenario, sampling: dict[str, Any]) -> Strategy:
    """Coordinate-wise mean after cutting ``strategy.trim_beta`` of each tail."""
    return FedTrimmedAvg(beta=scenario.strategy.trim_beta, **sampling)


register_strategy(
    "fedmedian", "coordinate-wise median (robust to a few poisoners)", build_fedmedian
)
register_strategy(
    "fedtrimmedavg",
    "coordinate-wise trimmed mean (strategy.trim_beta per tail)",
    build_fedtrimmedavg,
)
