"""The Grid layers at the bottom of the stack: polling for replies, and counting the bytes.

Replies travel up the stack one at a time: each layer's ``send_and_receive`` sends at
once and returns an iterator that hands each reply on as it arrives, so the strategy folds
a reply while other clients still train, and no layer holds the round's replies
(:mod:`fedpeft.strategies.fold`). A layer's bookkeeping for the round is complete once its
replies have all been read.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedpeft import records
from fedpeft.codecs import payload_nbytes
from fedpeft.codecs.packing import Memo, PackingError, is_packed, pack, unpack

logger = logging.getLogger(__name__)


@dataclass
class RoundTraffic:
    """Traffic and replies of one round's training exchange."""

    bytes_up: int = 0
    bytes_down: int = 0
    clients_sampled: int = 0
    clients_failed: int = 0
    losses: list[tuple[float, float]] = field(default_factory=list)  # (loss, weight)
    # each reply's metrics, with the node's device and host (see _tally_entries)
    clients: list[dict[str, float | str]] = field(default_factory=list)
    personal: list[tuple[float, float, float]] = field(default_factory=list)  # (acc, loss, n)

    @property
    def personal_metrics(self) -> dict[str, float]:
        """Example-weighted personalised accuracy and loss, when clients evaluated."""
        total = sum(n for _, _, n in self.personal)
        if not total:
            return {}
        return {
            "personal_accuracy": sum(a * n for a, _, n in self.personal) / total,
            "personal_loss": sum(loss * n for _, loss, n in self.personal) / total,
        }

    failures: list[str] = field(default_factory=list)  # every failed client, with its reason
    rejections: list[str] = field(default_factory=list)  # the failures that were rejected updates
    not_aggregated: str | None = None  # why the round aggregated nothing, if it did not

    @property
    def train_loss(self) -> float | None:
        """Example-weighted mean of the clients' local training losses."""
        total = sum(w for _, w in self.losses)
        return sum(loss * w for loss, w in self.losses) / total if total else None


def is_training(messages: list[Message]) -> bool:
    """Whether ``messages`` are training instructions (Flower's TRAIN type)."""
    return bool(messages) and messages[0].metadata.message_type == MessageType.TRAIN


def _short(reason: str | None, limit: int = 300) -> str:
    """The informative tail of an error reason (Ray wraps the real error in a long preamble)."""
    text = " ".join((reason or "unknown error").split())
    marker = "ClientAppException"
    if marker in text:
        text = text[text.rfind(marker) :]
    return text[:limit]


def _tally_entries(
    content: RecordDict,
) -> tuple[dict[str, float | str], tuple[float, float] | None] | None:
    """A training reply's entry in ``clients``, and its (loss, weight) when it reports a loss.

    The entry is the reply's numeric metrics plus the text of its node-info record (device,
    host); None when the reply has no metrics.
    """
    metrics = content.metric_records.get(records.METRICS)
    if metrics is None:
        return None
    entry: dict[str, float | str] = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    info = content.config_records.get(records.NODE_INFO)
    if info is not None:
        entry.update({k: v for k, v in info.items() if isinstance(v, str)})
    if records.TRAIN_LOSS not in metrics:
        return entry, None
    return entry, (float(str(metrics[records.TRAIN_LOSS])), _weight(metrics))


def _weight(metrics: MetricRecord) -> float:
    """A reply's example count as a weight; 0 for one validation refuses (NaN, a list, ...).

    A NaN weight would stay in a round's losses even after its reply is rejected: NaN never
    equals itself, so the rejected entry could not be found again to be removed.
    """
    count = metrics.get(records.NUM_EXAMPLES, 1)
    if isinstance(count, int | float) and math.isfinite(count) and count > 0:
        return float(count)
    return 0.0


class DelegatingGrid(Grid):
    """A Grid that hands every call to the Grid it wraps; subclasses override what they add."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run):  # noqa: D102
        return self._grid.set_run(run)

    @property
    def run(self):  # noqa: D102
        return self._grid.run

    def create_message(self, *args, **kwargs):  # noqa: D102
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self._grid.pull_messages(message_ids)

    def send_and_receive(  # noqa: D102
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class PackingGrid(DelegatingGrid):
    """A deployment's wire: each ArrayRecord travels as one Array (:mod:`fedpeft.codecs.packing`).

    Sits directly on Flower's Grid, so every layer above, the byte counts included, sees
    the records as in simulation. A reply whose packing does not unpack becomes an error
    reply (a failed client), with the reason.
    """

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push each message with its records packed; each original gets the pushed ID."""
        messages = list(messages)
        packed = _packed(messages)
        ids = list(self._grid.push_messages(packed))
        for original, sent in zip(messages, packed, strict=True):
            original.metadata.__dict__["_message_id"] = sent.metadata.message_id
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterator[Message]:
        """The replies to ``message_ids``, unpacked."""
        for reply in self._grid.pull_messages(message_ids):
            yield _unpacked(reply)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Flower's exchange of the packed messages; the replies unpacked."""
        packed = _packed(list(messages))
        for reply in self._grid.send_and_receive(packed, timeout=timeout):
            yield _unpacked(reply)


def _packed(messages: list[Message]) -> list[Message]:
    """Each message with its records packed; a record they share is packed once.

    That record is the adapter every node is sent. ``messages`` keeps the records alive,
    so their ids, the memo's keys, stay theirs.
    """
    memo: Memo = {}
    return [_with_content(m, pack(m.content, memo)) for m in messages]


def _with_content(msg: Message, content: RecordDict) -> Message:
    """A new instruction like ``msg``, carrying ``content``."""
    meta = msg.metadata
    return Message(
        content,
        dst_node_id=meta.dst_node_id,
        message_type=meta.message_type,
        ttl=meta.ttl,
        group_id=meta.group_id,
    )


def _unpacked(reply: Message) -> Message:
    """``reply`` with its records unpacked; an error reply when they do not unpack."""
    if reply.has_error() or not is_packed(reply.content):
        return reply
    try:
        reply.content = unpack(reply.content)
    except PackingError as exc:
        reason = f"malformed reply: {exc}"
        logger.warning("node %s: %s", reply.metadata.src_node_id, reason)
        # the reply's own metadata (sender, what it answers): Flower's constructor takes it
        # as its internal ``metadata`` argument, which its typed overloads leave out
        error = Error(code=0, reason=reason)
        return Message(error, metadata=copy.copy(reply.metadata))  # type: ignore[call-overload]
    return reply


#: ``progress(server_round, answered, sampled, seconds)``: replies in so far, as they arrive
Progress = Callable[[int, int, int, float], None]


class PollingGrid(DelegatingGrid):
    """Push, then pull replies as they arrive: every ``first_s`` seconds, backing off to ``max_s``.

    Flower 1.42's deployment Grid (``HttpGrid``) sleeps 3 s between pulls, so a reply that
    arrives just after a pull waits up to 3 s, on average 1.5 s per exchange. This uses the
    same public ``push_messages``/``pull_messages`` calls; the SuperLink answers a pull in
    milliseconds, so five requests a second cost it little (a reply waits 0.1 s on
    average, not the 0.25 s of a 0.5 s cap). During a training exchange each
    pull that brings replies calls ``progress`` (the console's "clients answered" line).
    """

    def __init__(
        self,
        grid: Grid,
        first_s: float = 0.05,
        max_s: float = 0.2,
        progress: Progress | None = None,
    ) -> None:
        super().__init__(grid)
        self.first_s, self.max_s, self.progress = first_s, max_s, progress

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Push ``messages`` now; the replies as they are pulled.

        Until all are in, or ``timeout`` seconds after the push.
        """
        messages = list(messages)
        training = is_training(messages)
        server_round = records.round_of(messages[0]) if training else 0
        waiting = set(self._grid.push_messages(messages))
        return self._pull(waiting, server_round if training else None, timeout)

    def _pull(
        self, waiting: set[str], server_round: int | None, timeout: float | None
    ) -> Iterator[Message]:
        """The replies to ``waiting``, pulled with growing pauses between empty pulls."""
        sampled, answered, started = len(waiting), 0, time.monotonic()
        deadline = None if timeout is None else started + timeout
        pause = self.first_s
        while waiting and (deadline is None or time.monotonic() < deadline):
            pulled = list(self._grid.pull_messages(waiting))
            answered += len(pulled)
            waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if pulled and server_round is not None and self.progress is not None:
                self.progress(server_round, answered, sampled, time.monotonic() - started)
            yield from pulled
            del pulled
            if waiting:
                time.sleep(pause)
                pause = min(pause * 2, self.max_s)


class CountingGrid(DelegatingGrid):
    """Delegates to a real Grid and records the serialized size of every message content.

    Each instruction's content is counted once per destination node (every node receives
    its own copy); each reply's content once. Evaluation traffic counts too.
    """

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.current = RoundTraffic()
        #: node id -> partition id, once known; node ids are random per run, so nodes are
        #: listed in partition order to make seeded client sampling reproducible
        self.partitions: dict[int, int] = {}

    def take(self) -> RoundTraffic:
        """Return the traffic since the last call and start a new tally."""
        current, self.current = self.current, RoundTraffic()
        return current

    # --- counted -----------------------------------------------------------------------
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Send, and count both directions: what is sent now, each reply as it passes.

        The round's tally (failures, replies that never came) is complete once the
        replies have all been read.
        """
        messages = list(messages)
        tally = self.current
        for msg in messages:
            tally.bytes_down += payload_nbytes(msg.content)
        replies = self._grid.send_and_receive(messages, timeout=timeout)
        return self._counted(messages, replies, tally, timeout)

    def _counted(
        self,
        messages: list[Message],
        replies: Iterable[Message],
        tally: RoundTraffic,
        timeout: float | None,
    ) -> Iterator[Message]:
        # a training exchange carries fedpeft's config; SecAgg+'s key stages do not (their
        # bytes count here, their failures where the protocol runs: server/secagg.py)
        train_type = is_training(messages)
        is_train = train_type and records.CONFIG in messages[0].content.config_records
        protocol = train_type and not is_train
        ok, answered = 0, set()
        for reply in replies:
            answered.add(reply.metadata.src_node_id)
            if reply.has_error():
                if not protocol:
                    tally.failures.append(
                        f"node {reply.metadata.src_node_id}: {_short(reply.error.reason)}"
                    )
            else:
                ok += 1
                tally.bytes_up += payload_nbytes(reply.content)
                if not is_train:
                    self._tally_personal(reply, tally)
                elif (entries := _tally_entries(reply.content)) is not None:
                    tally.clients.append(entries[0])
                    if entries[1] is not None:
                        tally.losses.append(entries[1])
            yield reply
            del reply
        if is_train:
            tally.clients_sampled += len(messages)
            tally.clients_failed += len(messages) - ok
            for msg in messages:
                if msg.metadata.dst_node_id not in answered:
                    tally.failures.append(
                        f"node {msg.metadata.dst_node_id}: no reply within "
                        f"the round timeout ({timeout} s)"
                    )

    @staticmethod
    def _tally_personal(reply: Message, tally: RoundTraffic) -> None:
        """An evaluation reply's personalised accuracy and loss, when it reports them."""
        if records.METRICS in reply.content.metric_records:
            m = reply.content.metric_records[records.METRICS]
            if records.PERSONAL_ACCURACY in m:
                tally.personal.append(
                    (
                        float(str(m[records.PERSONAL_ACCURACY])),
                        float(str(m[records.PERSONAL_LOSS])),
                        _weight(m),
                    )
                )

    def reject(self, reply: Message, reason: str) -> None:
        """Count a reply that arrived (its bytes stay counted) but will not be aggregated.

        Its loss and metrics leave this round's tally, and it counts as a failed client.
        """
        tally = self.current
        tally.clients_failed += 1
        tally.failures.append(f"node {reply.metadata.src_node_id}: {reason}")
        tally.rejections.append(f"node {reply.metadata.src_node_id}: {reason}")
        entries = _tally_entries(reply.content)
        if entries is None:
            return
        entry, loss = entries
        if entry in tally.clients:
            tally.clients.remove(entry)
        if loss is not None and loss in tally.losses:
            tally.losses.remove(loss)

    def lost(self, node: int, reason: str) -> None:
        """Count a training instruction that never reached ``node`` (a failed client)."""
        self.current.clients_sampled += 1
        self.current.clients_failed += 1
        self.current.failures.append(f"node {node}: {reason}")

    def get_node_ids(self) -> Iterable[int]:
        """Connected nodes, in partition order where partitions are known."""
        ids = list(self._grid.get_node_ids())
        return sorted(ids, key=lambda n: (self.partitions.get(n, len(self.partitions)), n))
