"""Adaptive server optimisers (Reddi et al., 2021): FedAdam, FedYogi, FedAdagrad.

The averaged client update is treated as a pseudo-gradient and applied by an adaptive
optimiser on the server; Flower's classes are reused as they are.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as flwr
from flwr.serverapp.strategy import Strategy

from fedpeft.config import Scenario
from fedpeft.strategies import register_strategy
from fedpeft.strategies.guard import GuardedReplies


# Flower's rules as they are, refusing replies they cannot use (strategies.guard)
class FedAdam(GuardedReplies, flwr.FedAdam):
    """Flower's FedAdam; unusable replies raise AggregationError."""


class FedYogi(GuardedReplies, flwr.FedYogi):
    """Flower's FedYogi; unusable replies raise AggregationError."""


class FedAdagrad(GuardedReplies, flwr.FedAdagrad):
    """Flower's FedAdagrad; unusable replies raise AggregationError."""


def build_fedadam(scenario: Scenario, sampling: dict[str, Any]) -> Strategy:
    """Adam on the server over the averaged adapter update."""
    s = scenario.strategy
    return FedAdam(eta=s.server_lr, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau, **sampling)


def build_fedyogi(scenario: Scenario, sampling: dict[str, Any]) -> Strategy:
    """Yogi on the server (additive second-moment update)."""
    s = scenario.strategy
    return FedYogi(eta=s.server_lr, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau, **sampling)


def build_fedadagrad(scenario: Scenario, sampling: dict[str, Any]) -> Strategy:
    """Adagrad on the server."""
    s = scenario.strategy
    return FedAdagrad(eta=s.server_lr, tau=s.tau, **sampling)


register_strategy("fedadam", "server-side Adam on the averaged update", build_fedadam)
register_strategy("fedyogi", "server-side Yogi on the averaged update", build_fedyogi)
register_strategy("fedadagrad", "server-side Adagrad on the averaged update", build_fedadagrad)
