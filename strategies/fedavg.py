"""FedAvg, FedProx, FedAvgM and the robust rules: Flower's own strategies, registered.

On adapter tensors, FedAvg is FedIT (Zhang et al., 2024): the LoRA factors A and B are
averaged separately, weighted by each client's ``num-examples``. FedAvg and FedProx fold
each reply into running sums as it arrives (:mod:`fedpeft.strategies.fold`); the others
run Flower's code, which holds every reply of the round (the median and the trimmed mean
need them all at once).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import strategy as flwr
from flwr.serverapp.strategy import Strategy

from fedpeft.codecs import arrayrecord_to_state, state_to_arrayrecord
from fedpeft.config import Scenario
from fedpeft.strategies import register_strategy
from fedpeft.strategies.fold import (
    OnServerDevice,
    WeightedSums,
    aggregation_device,
    fold_replies,
)
from fedpeft.strategies.guard import GuardedReplies


class FoldedMean(OnServerDevice, flwr.FedAvg):
    """Flower's FedAvg rule, each reply folded into exact running sums as it arrives.

    Put it first among the bases. Unusable replies raise AggregationError, as in
    :class:`GuardedReplies`; the mean is accumulated in float64 and divided once.
    """

    def __init__(self, *args: Any, scenario: Scenario | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scenario = scenario  # its federation.server_device says where the sums live
        if scenario is not None:
            aggregation_device(scenario)  # a CUDA server that has no CUDA: one line, now

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The example-weighted mean of the replies' arrays, and of their metrics."""
        sums = WeightedSums(self.device)

        def fold(msg: Message, weight: float) -> None:
            for record in msg.content.array_records.values():
                sums.add(arrayrecord_to_state(record), weight, msg.metadata.src_node_id)

        metrics = fold_replies(replies, self.weighted_by_key, fold)
        if metrics is None:
            return None, None
        return state_to_arrayrecord(sums.mean()), metrics


class FedAvg(FoldedMean):
    """Flower's FedAvg, folding replies as they arrive; unusable ones raise AggregationError."""


class FedProx(FoldedMean, flwr.FedProx):
    """Flower's FedProx, folding replies as they arrive; unusable ones raise AggregationError."""


# Flower's rules as they are, refusing replies they cannot use (strategies.guard)


class FedAvgM(GuardedReplies, flwr.FedAvgM):
    """Flower's FedAvgM; unusable replies raise AggregationError."""


class FedMedian(GuardedReplies, flwr.FedMedian):
    """Flower's FedMedian; unusable replies raise AggregationError."""


class FedTrimmedAvg(GuardedReplies, flwr.FedTrimmedAvg):
    """Flower's FedTrimmedAvg; unusable replies raise AggregationError."""


def build_fedavg(scenario: Scenario, sampling: dict[str, Any]) -> Strategy:
    """Weighted average of the clients' adapter tensors."""
    return FedAvg(scenario=scenario, **sampling)


def build_fedprox(scenario: Scenario, sampling: dict[str, Any]) -> Strategy:
    """FedAvg on the server; clients add ``mu/2 ||w - w_global||^2`` (sent as proximal-mu)."""
    return FedProx(proximal_mu=scenario.strategy.proximal_mu, scenario=scenario, **sampling)


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
    streams_replies=True,
)
register_strategy(
    "fedprox",
    "FedAvg + client-side proximal term (mu)",
    build_fedprox,
    weighted_sum=True,
    streams_replies=True,
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
