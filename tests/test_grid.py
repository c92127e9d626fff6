"""The byte-counting Grid: what it reports equals Flower's own serialization of the payloads."""

import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict

from fedpeft import records
from fedpeft.codecs import payload_nbytes, state_to_arrayrecord
from server.grid import CountingGrid
from strategies.testing import StaticGrid, _ensure_task_identity, train_reply


class EchoGrid(StaticGrid):
    """Answers node 1 with a training reply and node 2 with an error."""

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            if msg.metadata.dst_node_id == 1:
                out.append(train_reply({"w": torch.ones(10, 10)}, 7, node_id=1))
            else:
                out.append(Message(Error(code=0, reason="boom"), reply_to=msg))
        return out


def test_counts_both_directions_and_failures():
    _ensure_task_identity()
    content = RecordDict(
        {
            records.ARRAYS: state_to_arrayrecord({"w": torch.zeros(10, 10)}),
            records.CONFIG: ConfigRecord({"x": 1}),
        }
    )
    msgs = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in (1, 2)]
    grid = CountingGrid(EchoGrid([1, 2]))
    replies = list(grid.send_and_receive(msgs, timeout=1))
    tally = grid.take()
    assert tally.bytes_down == 2 * payload_nbytes(content)
    assert tally.bytes_up == payload_nbytes(replies[0].content)
    assert (tally.clients_sampled, tally.clients_failed) == (2, 1)
    assert "boom" in tally.failures[0]
    assert grid.take().bytes_up == 0  # a new tally starts after take()
