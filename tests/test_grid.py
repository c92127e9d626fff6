"""The byte-counting Grid: what it reports equals Flower's own serialization of the payloads.

And the stack passes replies on one at a time, as they arrive.
"""

import json
import time

import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict

from fedpeft import records
from fedpeft.clients.app import app as client_app
from fedpeft.codecs import payload_nbytes, state_to_arrayrecord
from fedpeft.config import load_scenario
from fedpeft.server.grid import CountingGrid
from fedpeft.server.inprocess import InProcessGrid
from fedpeft.server.run import run_federation
from fedpeft.strategies.adapter_strategy import AdapterStrategy
from fedpeft.strategies.testing import StaticGrid, ensure_task_identity, train_reply


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
    ensure_task_identity()
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


def test_polling_grid_collects_late_replies_and_gives_up_at_the_timeout():
    import time

    from fedpeft.clients.app import app as client_app
    from fedpeft.server.grid import PollingGrid
    from fedpeft.server.inprocess import InProcessGrid

    class OneReplyPerPull(InProcessGrid):  # replies trickle in, as from a real SuperLink
        pulls = 0

        def pull_messages(self, message_ids):
            self.pulls += 1
            ready = [i for i in message_ids if i in self._replies][:1]
            return super().pull_messages(ready)

    ensure_task_identity()
    grid = OneReplyPerPull(client_app, 3)
    query = ConfigRecord(
        {records.SCENARIO: load_scenario("smoke", ["data.num_clients=3"]).to_json()}
    )
    messages = [
        Message(RecordDict({records.CONFIG: query}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in grid.get_node_ids()
    ]
    polling = PollingGrid(grid, first_s=0.01, max_s=0.02)
    replies = list(polling.send_and_receive(messages, timeout=60))
    assert sorted(r.metadata.src_node_id for r in replies) == sorted(grid.get_node_ids())
    assert grid.pulls == 3

    class Silent(InProcessGrid):
        def pull_messages(self, message_ids):
            return []

    started = time.monotonic()
    silent = PollingGrid(Silent(client_app, 1), first_s=0.01, max_s=0.05)
    assert list(silent.send_and_receive(messages[:1], timeout=0.3)) == []
    assert 0.3 <= time.monotonic() - started < 5


def test_a_training_exchange_reports_each_reply_as_it_arrives():
    from fedpeft.clients.app import app as client_app
    from fedpeft.models import initial_adapter_state
    from fedpeft.report import RoundProgress, console
    from fedpeft.server.grid import PollingGrid
    from fedpeft.server.inprocess import InProcessGrid

    class OneReplyPerPull(InProcessGrid):
        def pull_messages(self, message_ids):
            ready = [i for i in message_ids if i in self._replies][:1]
            return super().pull_messages(ready)

    ensure_task_identity()
    scenario = load_scenario("smoke", ["data.num_clients=3", "train.local_steps=1"])
    state = initial_adapter_state(scenario.model, scenario.peft, 26, scenario.seed)
    config = ConfigRecord({records.SCENARIO: scenario.to_json(), records.SERVER_ROUND: 2})
    content = RecordDict({records.ARRAYS: state_to_arrayrecord(state), records.CONFIG: config})
    grid = OneReplyPerPull(client_app, 3)
    messages = [
        Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in grid.get_node_ids()
    ]
    calls = []

    def progress(*args):
        calls.append(args[:3])
        RoundProgress(total_rounds=5, every_s=0.0)(*args)

    with console.capture() as captured:
        replies = list(PollingGrid(grid, 0.01, 0.02, progress).send_and_receive(messages))
    assert len(replies) == 3 and not any(r.has_error() for r in replies)
    assert calls == [(2, 1, 3), (2, 2, 3), (2, 3, 3)]  # one reply per pull, round 2
    lines = captured.get().splitlines()
    assert lines[0].startswith("  round 2/5: 1/3 clients answered after 0:0")
    assert "the rest in ~" in lines[0] and "the rest" not in lines[2]


def test_round_progress_is_silent_in_a_short_round_and_paced_in_a_long_one():
    from fedpeft.report import RoundProgress, console

    progress = RoundProgress(total_rounds=3, every_s=10.0)
    with console.capture() as captured:
        for answered, seconds in [(1, 2.0), (2, 4.0), (3, 12.0), (4, 15.0), (5, 23.0)]:
            progress(1, answered, 6, seconds)
        progress(2, 1, 6, 3.0)  # a new round starts its own clock
    lines = captured.get().splitlines()
    assert lines == [
        "  round 1/3: 3/6 clients answered after 0:12, the rest in ~0:12",
        "  round 1/3: 5/6 clients answered after 0:23, the rest in ~0:05",
    ]


class _Watched(InProcessGrid):
    """An in-process engine that notes when each node trains."""

    def __init__(self, events: list[tuple[str, int]], nodes: int) -> None:
        super().__init__(client_app, nodes)
        self.events = events

    def _deliver(self, message: Message) -> Message:
        if message.metadata.message_type == MessageType.TRAIN:
            self.events.append(("trained", message.metadata.dst_node_id))
        return super()._deliver(message)


def test_each_reply_is_folded_before_the_next_client_trains(tmp_path, monkeypatch):
    """Through the whole stack (coding, validation, counting), the strategy folds a reply
    while the rest are still to come: it never holds the round's replies. Validation holds
    back the first valid reply until federation.min_fit_clients=2 are in."""
    events: list[tuple[str, int]] = []
    fold = AdapterStrategy.fold

    def noted_fold(self, server_round, state, weight, node_id):  # type: ignore[no-untyped-def]
        events.append(("folded", node_id))
        fold(self, server_round, state, weight, node_id)

    monkeypatch.setattr(AdapterStrategy, "fold", noted_fold)
    compressed = ['compression.uplink=["topk","int8"]', "compression.error_feedback=true"]
    scenario = load_scenario(
        "smoke",
        [
            'strategy.name="fedit"',
            "data.num_clients=4",
            "federation.clients_per_round=4",
            "federation.min_fit_clients=2",
            "federation.rounds=1",
            "train.local_steps=1",
            "data.eval_examples=16",
            *compressed,
        ],
    )
    run_federation(_Watched(events, 4), scenario, tmp_path, "in-process")
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["clients_sampled"] == 4 and row["clients_failed"] == 0
    nodes = [node for kind, node in events if kind == "trained"]
    first, second, third, fourth = nodes
    assert events == [
        ("trained", first),
        ("trained", second),  # the first valid reply waits for a second (min_fit_clients)
        ("folded", first),
        ("folded", second),
        ("trained", third),
        ("folded", third),
        ("trained", fourth),
        ("folded", fourth),
    ]


class _Slow(InProcessGrid):
    """An in-process engine whose clients each take ``pause`` seconds more to train."""

    def __init__(self, nodes: int, pause: float) -> None:
        super().__init__(client_app, nodes)
        self.pause = pause

    def _deliver(self, message: Message) -> Message:
        if message.metadata.message_type == MessageType.TRAIN:
            time.sleep(self.pause)
        return super()._deliver(message)


def test_each_row_says_where_its_round_went(tmp_path):
    """phase_seconds splits round_seconds: the clients' training lands in train_replies."""
    from fedpeft.server.rounds import PHASES

    scenario = load_scenario(
        "smoke", ["data.num_clients=2", "federation.rounds=2", "train.local_steps=1"]
    )
    run_federation(_Slow(2, pause=0.5), scenario, tmp_path, "in-process")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        phases = row["phase_seconds"]
        assert list(phases) == list(PHASES) and min(phases.values()) >= 0
        assert phases["train_replies"] >= 2 * 0.5  # two clients, each half a second slower
        assert phases["evaluate"] > 0  # the central evaluation
        # the phases cover the round, up to sampling and configuring (milliseconds)
        assert row["round_seconds"] - 0.25 <= sum(phases.values()) <= row["round_seconds"] + 0.01
    assert rows[0]["phase_seconds"]["checkpoint"] == 0  # round 1 follows no checkpoint
    assert rows[1]["phase_seconds"]["checkpoint"] > 0
