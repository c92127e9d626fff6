"""The server's side of compression: code what is sent, decode what comes back.

:class:`CodecGrid` sits between the strategy and the byte-counting grid. It replaces
each instruction's adapter ArrayRecord with one coded payload (``compression.downlink``,
optionally as the change since the copy that node already holds) and turns each coded
reply back into a plain ArrayRecord before the strategy sees it. Every strategy, Flower's
own and fedpeft's, therefore aggregates decoded tensors: linear rules see the decoded
updates, and rules that need exact factors (FLoRA's stacking, FlexLoRA's and FedEx-LoRA's
products) stay exact *on the decoded factors*; the compression error is what those
factors carry, not an error of the rule.

The byte-counting grid underneath sees the coded messages, so ``bytes_up``/``bytes_down``
stay the real wire sizes; this grid also adds up what the same messages would have
weighed uncoded, for the compression ratios in ``summary.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from flwr.app import Error, Message, RecordDict

from fedpeft import records
from fedpeft.adapters import AdapterState
from fedpeft.codecs import (
    arrayrecord_to_state,
    blob_of,
    coded_record,
    payload_nbytes,
    state_to_arrayrecord,
)
from fedpeft.codecs.compression import (
    DOWNLINK,
    CodecError,
    Pipeline,
    decode_update,
    encode_update,
    seeded_generator,
    state_digest,
)
from fedpeft.config import CompressionSection
from fedpeft.records import round_of
from fedpeft.server.grid import CountingGrid, DelegatingGrid
from fedpeft.state import ClientStateStore

logger = logging.getLogger(__name__)


class CodecGrid(DelegatingGrid):
    """Codes adapter payloads on top of a :class:`CountingGrid` (see the module docstring)."""

    def __init__(
        self, grid: CountingGrid, compression: CompressionSection, state_dir: Path, seed: int
    ) -> None:
        super().__init__(grid)
        self._grid: CountingGrid = grid
        self.compression = compression
        self.down: Pipeline = compression.pipeline("downlink")
        self.seed = seed
        #: what each node holds of the adapter (the decoded copy of what it was last sent)
        self.copies = ClientStateStore(state_dir)
        self.plain_up = 0  # what the coded traffic would have weighed uncoded
        self.plain_down = 0

    def take(self) -> tuple[int, int]:
        """Uncoded-equivalent (up, down) bytes since the last call."""
        out = (self.plain_up, self.plain_down)
        self.plain_up = self.plain_down = 0
        return out

    def _node_key(self, node_id: int) -> str:
        part = self._grid.partitions.get(node_id)
        return f"partition-{part}" if part is not None else f"node-{node_id}"

    def _encode(self, msg: Message) -> tuple[Message, AdapterState, AdapterState]:
        """The coded message for ``msg``, the adapter it carries, and the node's decoding.

        Replies are rebuilt on the uncoded adapter, not on the node's decoded copy: a
        client's update is its change from what it received, and the server applies that
        change to its exact adapter, so downlink coding error never enters the aggregate.
        """
        content = msg.content
        self.plain_down += payload_nbytes(content)
        if records.ARRAYS not in content.array_records:
            return msg, {}, {}
        state = arrayrecord_to_state(content.array_records[records.ARRAYS])
        if not (self.down.stages or self.compression.downlink_delta):
            return msg, state, state  # plain downlink: the node receives exactly this
        node = msg.metadata.dst_node_id
        server_round = round_of(msg)
        held = self.copies.load(self._node_key(node)) if self.compression.downlink_delta else {}
        pipeline = self.down if held else self.down.without_topk()
        coded = encode_update(
            state,
            pipeline,
            reference=held,
            meta={"reference": state_digest(held) if held else None},
            generator=seeded_generator(
                self.seed, server_round, self._grid.partitions.get(node, node), DOWNLINK
            ),
        )
        new_content = RecordDict(
            {
                **{k: v for k, v in content.items() if k != records.ARRAYS},
                records.COMPRESSED: coded_record(coded.blob),
            }
        )
        meta = msg.metadata
        sent = Message(
            new_content,
            dst_node_id=node,
            message_type=meta.message_type,
            ttl=meta.ttl,
            group_id=meta.group_id,
        )
        if self.compression.downlink_delta:
            self.copies.save(self._node_key(node), coded.decoded)
        return sent, state, coded.decoded

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Code every instruction and send; decode each coded reply as it arrives."""
        exact: dict[int, AdapterState] = {}  # what each node was sent, uncoded
        views: dict[int, AdapterState] = {}  # what each node decoded
        coded_messages: dict[int, Message] = {}
        for msg in messages:
            node = msg.metadata.dst_node_id
            coded_messages[node], exact[node], views[node] = self._encode(msg)
        replies = self._grid.send_and_receive(coded_messages.values(), timeout=timeout)
        return self._decoded(replies, exact, views, coded_messages)

    def _decoded(
        self,
        replies: Iterable[Message],
        exact: dict[int, AdapterState],
        views: dict[int, AdapterState],
        sent: dict[int, Message],
    ) -> Iterator[Message]:
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                # the node may not hold what we think it holds: send it everything next time
                self.copies.delete(self._node_key(node))
                yield reply
            else:
                yield self._decode(reply, exact[node], views[node], sent[node])
            del reply

    def _decode(
        self, reply: Message, exact: AdapterState, view: AdapterState, sent: Message
    ) -> Message:
        """Rebuild a reply's adapter on the exact adapter the node was sent."""
        content = reply.content
        if records.COMPRESSED not in content.array_records:
            if self.down.stages and records.ARRAYS in content.array_records:
                # an uncoded reply is the node's own adapter, trained from its lossy copy:
                # move it onto the exact adapter, as a coded change would be
                state = arrayrecord_to_state(content.array_records[records.ARRAYS])
                for key, value in state.items():
                    if key in view and view[key].shape == value.shape:
                        moved = value.double() - view[key].double() + exact[key].double()
                        state[key] = moved.to(value.dtype)
                content[records.ARRAYS] = state_to_arrayrecord(state)
            self.plain_up += payload_nbytes(content)
            return reply
        try:
            state, _ = decode_update(blob_of(content.array_records[records.COMPRESSED]), exact)
        except Exception as exc:  # noqa: BLE001  # one hostile payload must not stop the server
            text = str(exc) if isinstance(exc, CodecError) else f"{type(exc).__name__}: {exc}"
            reason = f"undecodable compressed update: {text}"
            logger.warning("node %s: %s", reply.metadata.src_node_id, reason)
            self._grid.reject(reply, reason)
            self.plain_up += payload_nbytes(content)  # unknown uncoded size: count it as is
            self.copies.delete(self._node_key(reply.metadata.src_node_id))
            return Message(Error(code=0, reason=reason), reply_to=sent)
        del content.array_records[records.COMPRESSED]
        content[records.ARRAYS] = state_to_arrayrecord(state)
        self.plain_up += payload_nbytes(content)
        return reply
