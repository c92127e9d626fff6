"""Keeping the aggregate sound when clients fail, send garbage or lie.

Two Grid wrappers sit between the strategy and the rest (see ``run_federation``):

- :class:`ValidatingGrid` checks every training reply before any strategy sees it:
  expected keys, shapes (a LoRA factor may have its client's own rank), dtypes, finite
  values and, optionally, a bound on the update's norm. A rejected reply is logged with its
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
from collections.abc import Iterable

import torch
from flwr.app import Error, Message, MessageType
from flwr.serverapp import Grid

from fedpeft import records
from fedpeft.adapters import AdapterState, factor_of
from fedpeft.codecs import message_state, state_to_arrayrecord
from fedpeft.config import Scenario
from fedpeft.faults import strikes
from fedpeft.privacy import change_norm, clip_update, update_changes
from server.grid import CountingGrid, DelegatingGrid, is_training, round_of

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
        self, grid: Grid, counting: CountingGrid, reference: AdapterState, scenario: Scenario
    ) -> None:
        super().__init__(grid)
        self.counting, self.reference = counting, reference
        self.min_replies = scenario.federation.min_fit_clients
        self.max_norm = scenario.federation.max_update_norm
        self.clip = scenario.federation.clip_update_norm

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send; return the replies, unsound training updates turned into errors."""
        messages = list(messages)
        if not is_training(messages):
            return self._grid.send_and_receive(messages, timeout=timeout)
        instructions = {m.metadata.dst_node_id: m for m in messages}
        checked: list[Message] = []
        valid = 0
        for reply in self._grid.send_and_receive(messages, timeout=timeout):
            if not reply.has_error():
                sent = instructions.get(reply.metadata.src_node_id)
                reason = self._vet(reply, sent)
                if reason is not None:
                    node = reply.metadata.src_node_id
                    logger.warning("node %s: update rejected: %s", node, reason)
                    self.counting.reject(reply, f"update rejected: {reason}")
                    if sent is None:  # answers nothing this round asked: leave it out
                        continue
                    reply = Message(Error(code=0, reason=f"update rejected: {reason}"),
                                    reply_to=sent)  # fmt: skip
                else:
                    valid += 1
            checked.append(reply)
        if valid < self.min_replies:
            why = f"{valid} valid replies < federation.min_fit_clients={self.min_replies}"
            logger.warning("round not aggregated: %s; the global adapter stays", why)
            self.counting.current.not_aggregated = why
            return [r for r in checked if r.has_error()]
        return checked

    def _vet(self, reply: Message, sent: Message | None) -> str | None:
        """Why ``reply`` must not be aggregated, or None; a sound one is clipped as asked.

        The tensors are decoded once, for the checks and for ``clip_update_norm``.
        """
        if sent is None:
            return "a reply to no instruction of this round"
        if records.ARRAYS not in reply.content.array_records:
            return "no adapter tensors in the reply"
        send = records.factor_set(sent.content.config_records.get(records.CONFIG),
                                  records.SEND_FACTORS)  # fmt: skip
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
