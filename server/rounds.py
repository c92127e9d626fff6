"""The round loop: Flower's ``Strategy.start``, able to begin at any round.

``Strategy.start`` always counts from round 1, but the round number reaches the clients
(their batch order and dropout seeds derive from it) and the strategies (RoLoRA alternates
factors by its parity, server optimisers count steps). A resumed run must carry on from
round k+1, so fedpeft makes the same calls as ``Strategy.start``, in the same order:
``configure_train``, ``send_and_receive``, ``aggregate_train``, ``configure_evaluate``,
``send_and_receive``, ``aggregate_evaluate``, then the central ``evaluate_fn``. The
training replies reach the strategy as they arrive: an iterator, not a list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
#: called after round k with (k, the global arrays after it); checkpoints hook in here
RoundEnd = Callable[[int, ArrayRecord], None]
#: called after round k's last training reply is read, before the strategy finishes with it
RepliesIn = Callable[[int], None]
#: called with the name of each part of a round as it ends (``PHASES``), to time it
PhaseEnd = Callable[[str], None]
#: the parts of a round, in order: the training exchange (replies folded as they arrive),
#: what the strategy does after the last reply, the evaluation exchange, the central
#: evaluation, and the checkpoint
PHASES = ("train_replies", "aggregate", "evaluate_replies", "evaluate", "checkpoint")


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    *,
    first_round: int,
    last_round: int,
    timeout: float,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    evaluate_fn: EvaluateFn,
    round_end: RoundEnd | None = None,
    replies_in: RepliesIn | None = None,
    phase_end: PhaseEnd | None = None,
) -> ArrayRecord:
    """Run rounds ``first_round..last_round`` and return the global arrays after the last.

    Round 0, the evaluation of the initial arrays, runs only when ``first_round`` is 1.
    A round whose strategy aggregates nothing keeps the arrays it started with.
    """
    ended = phase_end or (lambda _: None)
    if first_round == 1:
        evaluate_fn(0, arrays)
    for server_round in range(first_round, last_round + 1):
        log(INFO, "[ROUND %s/%s]", server_round, last_round)
        replies = _arriving(
            grid.send_and_receive(
                strategy.configure_train(server_round, arrays, train_config, grid),
                timeout=timeout,
            ),
            server_round,
            replies_in,
            ended,
        )
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        for _ in replies:  # a strategy that stopped reading: the Grid's tallies need the rest
            pass
        if new_arrays is not None:
            arrays = new_arrays
        ended("aggregate")
        evaluate_replies = list(  # small, and the Grid's tallies are complete once read
            grid.send_and_receive(
                strategy.configure_evaluate(server_round, arrays, evaluate_config, grid),
                timeout=timeout,
            )
        )
        strategy.aggregate_evaluate(server_round, evaluate_replies)
        ended("evaluate_replies")
        evaluate_fn(server_round, arrays)  # ends the "evaluate" phase itself, to log it
        if round_end is not None:
            round_end(server_round, arrays)
        ended("checkpoint")
    return arrays


def _arriving(
    replies: Iterable[Message],
    server_round: int,
    replies_in: RepliesIn | None,
    ended: PhaseEnd,
) -> Iterator[Message]:
    """The round's training replies as they arrive, then the ``replies_in`` hook.

    The strategy folds each reply as it comes (:mod:`fedpeft.strategies.fold`), so the
    hook runs after the last one is read and before the strategy finishes aggregating.
    """
    yield from replies
    ended("train_replies")
    if replies_in is not None:
        replies_in(server_round)
