"""Keeping the aggregate sound when clients fail, send garbage or lie.

Two Grid wrappers sit between the strategy and the rest (see ``run_federation``):

- :class:`ValidatingGrid` checks every training reply before any strategy sees it:
  its example count (a finite positive integer, within :class:`ExampleBound`), expected
  keys, shapes (a LoRA factor may have its client's own rank), dtypes, finite values and,
  optionally, a bound on the update's norm. A rejected reply is logged with its
  reason, counted (``updates_rejected``) and handed to the strategy as an error, so it never
  touches the aggregate. A round with fewer valid replies than
  ``federation.min_fit_clients`` aggregates nothing: the global adapter stays. With
  ``federation.clip_update_norm`` each valid update's change is scaled to that norm at
  most (norm clipping, a robust rule against scaled updates that works with any strategy).
- :class:`FaultyGrid` loses the training instructions that ``faults.drop_rate`` picks, so
  those clients never answer (:mod:`fedpeft.faults` injects the other faults client-side).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator

import torch
from flwr.app import Error, Message, MessageType
from flwr.serverapp import Grid

from fedpeft import records
from fedpeft.adapters import AdapterState, factor_of
from fedpeft.codecs import message_state, state_to_arrayrecord
from fedpeft.config import Scenario
from fedpeft.faults import strikes
from fedpeft.privacy import change_norm, clip_update, update_changes
from fedpeft.records import round_of
from fedpeft.server.grid import CountingGrid, DelegatingGrid, is_training
from fedpeft.train import examples_seen

logger = logging.getLogger(__name__)


class ServerCrash(RuntimeError):
    """The server failure that ``faults.server_crash_round`` injects (once: not on resume)."""


def check_update(
    update: AdapterState,
    reference: AdapterState,
    send: set[str],
    sent: AdapterState,
    max_norm: float = 0.0,
) -> str | None:
    """Why ``update`` must not be aggregated, or None when it is sound.

    ``reference`` is the server's adapter (largest rank); ``send`` the factors the client
    was told to send (empty: all); ``sent`` what it was sent, for the norm of its change.
    A LoRA factor may be narrower than the reference along its rank dimension (clients of
    lower or self-pruned rank); every other dimension and tensor must match exactly.
    """
    expected = {k for k in reference if not send or factor_of(k) in send}
    if missing := sorted(expected - set(update)):
        return f"missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}"
    if extra := sorted(set(update) - expected):
        return f"unexpected tensors {extra[:3]}{' ...' if len(extra) > 3 else ''}"
    for key, value in update.items():
        ref, before = reference[key], sent.get(key)
        # the server's own dtype, or the one it sent (server optimisers send float64)
        if value.dtype != ref.dtype and (before is None or value.dtype != before.dtype):
            return f"{key} is {value.dtype}, expected {ref.dtype}"
        if not _shape_fits(key, tuple(value.shape), tuple(ref.shape)):
            return f"{key} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if not torch.isfinite(value).all():
            return f"{key} holds non-finite values"
    if max_norm > 0 and (norm := change_norm(update_changes(update, sent))) > max_norm:
        return f"update norm {norm:.4g} exceeds federation.max_update_norm={max_norm:g}"
    return None


def check_examples(count: object, limit: int = 0, bound: str = "") -> str | None:
    """Why a reply's example count must not weight the aggregate, or None when it is sound.

    The count must be a finite positive integer (a whole float passes) and, with a
    ``limit``, at most that; ``bound`` says where the limit comes from, for the reason.
    """
    key = records.NUM_EXAMPLES
    if count is None:
        return f"no {key} in the reply's metrics"
    if (
        isinstance(count, bool)
        or not isinstance(count, int | float)
        or not math.isfinite(count)
        or count <= 0
        or count != int(count)
    ):
        return f"{key}={count!r} is not a finite positive integer"
    if limit and count > limit:
        return f"{key}={count:g} exceeds {limit}, {bound}"
    return None


class ExampleBound:
    """The most examples a client's training reply may claim in a round.

    A fedpeft client reports the examples it trained on: ``train.local_steps`` optimizer
    steps of ``train.grad_accum_steps`` batches of ``train.batch_size``, so never more than
    their product. ``federation.max_examples``
    replaces that cap. Where the server knows each client's data (simulation: the
    scenario's partitions), a client may claim no more than its own partition gives in
    those batches, fewer than the cap when a pass over a small partition ends short.
    """

    def __init__(self, scenario: Scenario, train_size: Callable[[int], int] | None = None) -> None:
        self.train, t = scenario.train, scenario.train
        # the round's batches, in the keys that set them: "train.local_steps=10", with
        # accumulation "train.local_steps x train.grad_accum_steps=10 x 4"
        keys, values = ["train.local_steps"], [t.local_steps]
        if t.grad_accum_steps > 1:
            keys, values = [*keys, "train.grad_accum_steps"], [*values, t.grad_accum_steps]
        self.batches_said = (
            f"train.epochs={t.epochs:g} passes:"
            if t.epochs
            else f"{' x '.join(keys)}={' x '.join(map(str, values))}"
        )
        self.cap: int | None
        if cap := scenario.federation.max_examples:
            self.cap, self.cap_reason = cap, f"federation.max_examples={cap}"
        elif t.batches_per_round is not None:
            self.cap = t.batches_per_round * t.batch_size
            self.cap_reason = (
                f"{' x '.join([*keys, 'train.batch_size'])} "
                f"({' x '.join(map(str, [*values, t.batch_size]))}; federation.max_examples unset)"
            )
        else:  # epochs: only the client's data size bounds it
            self.cap, self.cap_reason = None, "train.epochs with federation.max_examples unset"
        self.train_size = train_size
        self._sizes: dict[int, int] = {}

    def of(self, partition: int | None) -> tuple[int, str]:
        """The limit for a client of ``partition`` (None: unknown), and why it is that."""
        if self.train_size is None or partition is None:
            if self.cap is None:  # nothing to size it by: refuse rather than trust it
                return 0, f"a client of unknown data under {self.cap_reason}"
            return self.cap, self.cap_reason
        if partition not in self._sizes:
            self._sizes[partition] = self.train_size(partition)
        size = self._sizes[partition]
        batches = self.train.batches_for(size)
        seen = examples_seen(size, batches, self.train.batch_size)
        if self.cap is not None and seen >= self.cap:
            return self.cap, self.cap_reason
        in_batches = f"{self.batches_said} {batches}" if self.train.epochs else self.batches_said
        return seen, (
            f"what partition {partition}'s {size} training examples give in {in_batches} "
            f"batches of {self.train.batch_size}"
        )


def _shape_fits(key: str, shape: tuple[int, ...], ref: tuple[int, ...]) -> bool:
    if len(shape) != len(ref):
        return False
    factor = factor_of(key)
    if factor == "lora_A" and len(ref) == 2:  # (rank, in)
        return shape[1] == ref[1] and 1 <= shape[0] <= ref[0]
    if factor == "lora_B" and len(ref) == 2:  # (out, rank)
        return shape[0] == ref[0] and 1 <= shape[1] <= ref[1]
    return shape == ref


class ValidatingGrid(DelegatingGrid):
    """Reject unsound training replies before the strategy aggregates them."""

    def __init__(
        self,
        grid: Grid,
        counting: CountingGrid,
        reference: AdapterState,
        scenario: Scenario,
        examples: ExampleBound | None = None,
    ) -> None:
        super().__init__(grid)
        self.counting, self.reference = counting, reference
        self.examples = examples or ExampleBound(scenario)
        self.min_replies = scenario.federation.min_fit_clients
        self.max_norm = scenario.federation.max_update_norm
        self.clip = scenario.federation.clip_update_norm

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send; the replies as they come, unsound training updates turned into errors."""
        messages = list(messages)
        if not is_training(messages):
            return self._grid.send_and_receive(messages, timeout=timeout)
        replies = self._grid.send_and_receive(messages, timeout=timeout)
        return self._checked(messages, replies)

    def _checked(self, messages: list[Message], replies: Iterable[Message]) -> Iterator[Message]:
        """Vet each reply as it arrives.

        Until ``federation.min_fit_clients`` valid replies are in, the valid ones wait here
        (at most that many less one); if the round ends short of it they are dropped and
        only the failures go on, so the strategy aggregates nothing.
        """
        instructions = {m.metadata.dst_node_id: m for m in messages}
        tally = self.counting.current
        waiting: list[Message] = []
        valid = 0
        for reply in replies:
            if not reply.has_error():
                sent = instructions.get(reply.metadata.src_node_id)
                reason = self._vet(reply, sent)
                if reason is not None:
                    node = reply.metadata.src_node_id
                    logger.warning("node %s: update rejected: %s", node, reason)
                    self.counting.reject(reply, f"update rejected: {reason}")
                    if sent is None:  # answers nothing this round asked: leave it out
                        continue
                    reply = Message(
                        Error(code=0, reason=f"update rejected: {reason}"), reply_to=sent
                    )
                else:
                    valid += 1
                    if valid < self.min_replies:
                        waiting.append(reply)
                        continue
                    yield from waiting
                    waiting.clear()
            yield reply
            del reply
        if valid < self.min_replies:
            why = f"{valid} valid replies < federation.min_fit_clients={self.min_replies}"
            logger.warning("round not aggregated: %s; the global adapter stays", why)
            tally.not_aggregated = why

    def _vet(self, reply: Message, sent: Message | None) -> str | None:
        """Why ``reply`` must not be aggregated, or None; a sound one is clipped as asked.

        The tensors are decoded once, for the checks and for ``clip_update_norm``.
        """
        if sent is None:
            return "a reply to no instruction of this round"
        metrics = reply.content.metric_records.get(records.METRICS)
        count = metrics.get(records.NUM_EXAMPLES) if metrics is not None else None
        limit, bound = self.examples.of(self.counting.partitions.get(reply.metadata.src_node_id))
        if (reason := check_examples(count, limit, bound)) is not None:
            return reason
        if records.ARRAYS not in reply.content.array_records:
            return "no adapter tensors in the reply"
        send = records.factor_set(
            sent.content.config_records.get(records.CONFIG), records.SEND_FACTORS
        )
        try:
            update = message_state(reply)
        except Exception as exc:  # noqa: BLE001 - a malformed record is the client's fault
            return f"unreadable tensors: {type(exc).__name__}: {exc}"
        given = message_state(sent)
        reason = check_update(update, self.reference, send, given, self.max_norm)
        if reason is None and self.clip > 0:  # norm clipping of a sound update
            clipped, _ = clip_update(update, given, self.clip)
            reply.content[records.ARRAYS] = state_to_arrayrecord(clipped)
        return reason


class FaultyGrid(DelegatingGrid):
    """Lose the training instructions ``faults.drop_rate`` picks: those clients never answer."""

    def __init__(self, grid: Grid, counting: CountingGrid, scenario: Scenario) -> None:
        super().__init__(grid)
        self.counting, self.scenario = counting, scenario

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver the instructions not lost; the lost ones count as failed clients."""
        delivered = []
        rate, seed = self.scenario.faults.drop_rate, self.scenario.seed
        for msg in messages:
            node = msg.metadata.dst_node_id
            partition = self.counting.partitions.get(node, -1)
            if msg.metadata.message_type == MessageType.TRAIN and strikes(
                seed, round_of(msg), partition, "drop", rate
            ):
                self.counting.lost(node, f"no reply: instruction lost (faults.drop_rate={rate})")
            else:
                delivered.append(msg)
        return self._grid.send_and_receive(delivered, timeout=timeout) if delivered else []
