"""Every strategy's own guard: replies no rule can use raise :class:`AggregationError`.

In a fedpeft run the server's validating Grid (``server/reliability.py``) rejects such
replies before a strategy sees them. A strategy called directly (a test, a notebook, another
server) must still not turn them into silent NaN, a ``LinAlgError`` or a
``ZeroDivisionError`` depending on its rule: the rules that fold replies as they arrive
check each one with :func:`reply_weight` and :func:`check_finite`
(:func:`fedpeft.strategies.fold.fold_replies`), and Flower's own rules get
:func:`check_train_replies` through :class:`GuardedReplies`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedpeft import records
from fedpeft.codecs import array_values
from fedpeft.strategies import AggregationError


def reply_weight(msg: Message, key: str) -> float:
    """The weight (``key``, Flower's ``num-examples``) of a training reply, checked.

    Raises :class:`AggregationError` unless it is one finite, non-negative whole number.
    """
    node = msg.metadata.src_node_id
    found = msg.content.metric_records
    metrics = found.get(records.METRICS) or (
        next(iter(found.values())) if len(found) == 1 else None
    )
    if metrics is None or key not in metrics:
        raise AggregationError(f"node {node}: its reply has no '{key}' metric to weight it by")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AggregationError(f"node {node}: '{key}' is {value!r}, not a number")
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise AggregationError(
            f"node {node}: '{key}' is {value!r}; expected a finite whole number >= 0"
        )
    return float(value)


def check_finite(msg: Message) -> None:
    """Raise :class:`AggregationError` naming the first tensor of ``msg`` with NaN or inf.

    A sum is NaN or inf when any term is, so a finite sum clears a tensor in one pass; a sum
    that overflowed is checked element by element.
    """
    for record in msg.content.array_records.values():
        for key, array in record.items():
            values = array_values(array)
            if not np.issubdtype(values.dtype, np.inexact):
                continue
            with np.errstate(over="ignore", invalid="ignore"):
                clear = bool(np.isfinite(values.sum()))
            if not clear and not np.isfinite(values).all():
                raise AggregationError(
                    f"node {msg.metadata.src_node_id}: tensor '{key}' holds NaN or inf"
                )


def check_train_replies(replies: Sequence[Message], key: str) -> list[float]:
    """Check the replies a rule is about to aggregate; return their weights.

    Every tensor must be finite and every weight a finite whole number >= 0 (see
    :func:`reply_weight`), with a positive total. The first problem raises one
    :class:`AggregationError` naming the node and the tensor or key.
    """
    weights = []
    for msg in replies:
        weights.append(reply_weight(msg, key))
        check_finite(msg)
    if replies and sum(weights) <= 0:
        nodes = ", ".join(str(m.metadata.src_node_id) for m in replies)
        raise AggregationError(f"the replies of nodes {nodes} weigh nothing: '{key}' sums to 0")
    return weights


class GuardedReplies(FedAvg):
    """Flower's FedAvg family, refusing what its rule cannot use with AggregationError.

    Put it first among the bases (``class FedAdam(GuardedReplies, flwr.FedAdam)``): its
    :meth:`aggregate_train` checks the valid replies, then hands them to the Flower rule.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the replies without an error, then aggregate them with the Flower rule."""
        replies = list(replies)
        check_train_replies([m for m in replies if not m.has_error()], self.weighted_by_key)
        return super().aggregate_train(server_round, replies)
