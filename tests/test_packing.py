"""A deployment's packed wire: each ArrayRecord one Array, restored byte for byte."""

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.inflatable.inflatable_object import get_object_tree, iterate_object_tree

from fedpeft import records
from fedpeft.clients.app import app as client_app
from fedpeft.codecs import arrayrecord_to_state, state_to_arrayrecord
from fedpeft.codecs.packing import INDEX_PREFIX, PackingError, is_packed, pack, unpack
from fedpeft.config import load_scenario
from fedpeft.models import initial_adapter_state
from fedpeft.server.grid import PackingGrid, PollingGrid
from fedpeft.server.inprocess import InProcessGrid
from fedpeft.strategies.testing import ensure_task_identity


def mixed_content() -> RecordDict:
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal(5).astype(np.float16),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "scalar": np.array(2.5),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((4, 3))),
    }
    return RecordDict(
        {
            "config": ConfigRecord({"x": 1, "names": ["a", "b"]}),
            records.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "one": ArrayRecord({"only": Array(np.ones(3))}),  # a single array stays as it is
            "metrics": MetricRecord({"loss": 0.5}),
            "more": ArrayRecord({"a": Array(np.ones(2)), "b": Array(np.zeros(2))}),
        }
    )


def objects_in(content: RecordDict) -> int:
    message = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    return sum(1 for _ in iterate_object_tree(get_object_tree(message)))


def test_pack_then_unpack_gives_back_every_record_byte_for_byte_and_in_order():
    ensure_task_identity()
    content = mixed_content()
    packed = pack(content)
    assert is_packed(packed) and not is_packed(content)
    assert len(packed[records.ARRAYS]) == 1 and len(packed["more"]) == 1
    assert packed["one"] is content["one"] and packed["config"] is content["config"]
    restored = unpack(packed)
    assert list(restored.keys()) == list(content.keys())
    for name, record in content.array_records.items():
        again = restored.array_records[name]
        assert list(again.keys()) == list(record.keys())
        for key, array in record.items():
            got = again[key]
            assert (got.dtype, got.shape, got.stype, got.data) == (
                array.dtype,
                array.shape,
                array.stype,
                array.data,
            )
            np.testing.assert_array_equal(got.numpy(), array.numpy())
        assert again.object_id == record.object_id  # Flower's content hash: the same record
    # 6 + 2 arrays were 16 objects (an array and its chunk each); packed, 2 arrays, 4 objects
    assert objects_in(content) - objects_in(packed) == 16 - 4 - 2  # minus the two indexes


def test_a_packed_record_whose_index_lies_does_not_unpack():
    ensure_task_identity()
    packed = pack(mixed_content())
    index_name = INDEX_PREFIX + records.ARRAYS
    index = packed[index_name]

    def broken(**changes) -> RecordDict:
        out = RecordDict(dict(packed.items()))
        out[index_name] = ConfigRecord({**dict(index.items()), **changes})
        return out

    sizes = list(index["sizes"])
    cases = {
        "lists 6 arrays of": broken(sizes=[*sizes[:-1], sizes[-1] + 1]),
        "has shape": broken(shapes="[[3, 4], [5], [2, 3], [], [0, 4], [-1]]"),
        "malformed index": broken(shapes="not json"),
        "lists 6 arrays": broken(keys=["f32"] * 6),  # two arrays under one key
    }
    for reason, content in cases.items():
        with pytest.raises(PackingError, match=reason) as caught:
            unpack(content)
        assert "\n" not in str(caught.value)
    orphan = RecordDict({INDEX_PREFIX + "gone": ConfigRecord(dict(index.items()))})
    with pytest.raises(PackingError, match="no record beside it"):
        unpack(orphan)
    with pytest.raises(PackingError, match="already holds"):
        pack(packed)


class RecordingGrid(InProcessGrid):
    """An in-process engine that notes whether what crosses it is packed."""

    def __init__(self, app, nodes: int) -> None:
        super().__init__(app, nodes)
        self.crossed: list[tuple[str, bool]] = []

    def push_messages(self, messages):
        messages = list(messages)
        self.crossed += [("down", is_packed(m.content)) for m in messages]
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        self.crossed += [("up", r.has_content() and is_packed(r.content)) for r in replies]
        return replies


def train_messages(grid: InProcessGrid) -> list[Message]:
    scenario = load_scenario("smoke", ["data.num_clients=2", "train.local_steps=1"])
    state = initial_adapter_state(scenario.model, scenario.peft, 26, scenario.seed)
    config = ConfigRecord({records.SCENARIO: scenario.to_json(), records.SERVER_ROUND: 1})
    content = RecordDict({records.ARRAYS: state_to_arrayrecord(state), records.CONFIG: config})
    return [
        Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in grid.get_node_ids()
    ]


def test_the_packed_wire_carries_a_round_exactly_as_the_plain_one():
    """Server packs, the node's outermost mod unpacks and packs the reply, the server unpacks."""
    ensure_task_identity()
    plain_grid = InProcessGrid(client_app, 2)
    plain = list(PollingGrid(plain_grid, 0.01, 0.02).send_and_receive(train_messages(plain_grid)))
    wire = RecordingGrid(client_app, 2)
    messages = train_messages(wire)
    packed = list(PollingGrid(PackingGrid(wire), 0.01, 0.02).send_and_receive(messages))
    assert sorted(wire.crossed) == [("down", True)] * 2 + [("up", True)] * 2
    assert all(m.metadata.message_id for m in messages)  # the originals got the pushed ids
    assert not any(is_packed(r.content) for r in packed)
    by_node = {r.metadata.src_node_id: r for r in plain}
    for reply in packed:
        twin = by_node[reply.metadata.src_node_id]
        assert reply.metadata.reply_to_message_id
        assert list(reply.content.keys()) == list(twin.content.keys())
        got = arrayrecord_to_state(reply.content.array_records[records.ARRAYS])
        want = arrayrecord_to_state(twin.content.array_records[records.ARRAYS])
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got)  # same training, same bytes


def test_a_reply_that_does_not_unpack_fails_its_client_with_the_reason():
    ensure_task_identity()

    class Lying(InProcessGrid):
        def pull_messages(self, message_ids):
            replies = list(super().pull_messages(message_ids))
            for reply in replies:
                index = reply.content.config_records[INDEX_PREFIX + records.ARRAYS]
                index["sizes"] = [*list(index["sizes"])[:-1], 10**9]
            return replies

    grid = Lying(client_app, 2)
    polling = PollingGrid(PackingGrid(grid), 0.01, 0.02)
    replies = list(polling.send_and_receive(train_messages(grid)))
    assert len(replies) == 2 and all(r.has_error() for r in replies)
    assert all(r.error.reason.startswith("malformed reply: packed record") for r in replies)
    assert {r.metadata.src_node_id for r in replies} == set(grid.get_node_ids())


def test_an_adapter_sent_to_every_node_is_packed_once():
    """One exchange, one memo: the shared record is one packed buffer, not one per node."""
    ensure_task_identity()
    shared = mixed_content()
    own = RecordDict(
        {records.ARRAYS: ArrayRecord({"a": Array(np.ones(2)), "b": Array(np.ones(3))})}
    )
    memo = {}
    first, second, third = (pack(c, memo) for c in (shared, shared, own))
    assert first[records.ARRAYS] is second[records.ARRAYS]
    assert first[INDEX_PREFIX + records.ARRAYS] is second[INDEX_PREFIX + records.ARRAYS]
    assert third[records.ARRAYS] is not first[records.ARRAYS]
    assert list(unpack(third)[records.ARRAYS].keys()) == ["a", "b"]
    assert pack(shared)[records.ARRAYS] is not first[records.ARRAYS]  # no memo, no sharing

    class Pushed(InProcessGrid):
        def push_messages(self, messages):
            messages = list(messages)
            self.packed = [m.content[records.ARRAYS] for m in messages]
            return super().push_messages(messages)

    grid = Pushed(client_app, 2)
    messages = train_messages(grid)
    PackingGrid(grid).push_messages(messages)
    assert grid.packed[0] is grid.packed[1]  # both nodes' messages share one packed buffer
