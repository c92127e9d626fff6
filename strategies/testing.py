"""Helpers to exercise a strategy's aggregation on exact numbers, without a Grid or Ray."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpeft import records
from fedpeft.adapters import AdapterState
from fedpeft.codecs import arrayrecord_to_state, state_to_arrayrecord
from fedpeft.config import Scenario, load_scenario
from fedpeft.strategies import build_strategy


class StaticGrid(Grid):
    """A Grid whose nodes are fixed and which never sends anything (for configure_* calls)."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self._nodes = list(node_ids)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self._nodes)

    def set_run(self, run):  # noqa: D102
        raise NotImplementedError

    @property
    def run(self):  # noqa: D102
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # noqa: D102
        raise NotImplementedError

    def push_messages(self, messages):  # noqa: D102
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: D102
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102
        raise NotImplementedError


def ensure_task_identity() -> None:
    """Messages need a run identity; outside a running app, give them a test one."""
    from flwr.supercore.task_identity import TaskIdentity

    try:
        TaskIdentity.run_id  # noqa: B018 - raises when unset
    except RuntimeError:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def train_reply(state: AdapterState, num_examples: int, node_id: int = 1) -> Message:
    """A client's training reply carrying ``state`` and its example count."""
    ensure_task_identity()
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            records.ARRAYS: state_to_arrayrecord(state),
            records.METRICS: MetricRecord({records.NUM_EXAMPLES: num_examples}),
        }
    )
    return Message(content, reply_to=instruction)


def aggregate_with(
    name: str,
    states: Sequence[AdapterState],
    weights: Sequence[int],
    current: AdapterState | None = None,
    scenario: Scenario | None = None,
    server_round: int = 1,
    strategy: Strategy | None = None,
) -> AdapterState:
    """Configure one round from ``current`` and aggregate ``states`` with the named strategy."""
    scenario = scenario or load_scenario(
        "smoke", [f"strategy.name={name!r}".replace("'", '"'), f"data.num_clients={len(states)}"]
    )
    strategy = strategy or build_strategy(scenario)
    current = current if current is not None else states[0]
    grid = StaticGrid(range(1, len(states) + 1))
    ensure_task_identity()
    list(
        strategy.configure_train(server_round, state_to_arrayrecord(current), ConfigRecord(), grid)
    )
    replies = [
        train_reply(s, n, i + 1) for i, (s, n) in enumerate(zip(states, weights, strict=True))
    ]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert arrays is not None, "strategy returned no aggregate"
    return {k: v.to(torch.float64) for k, v in arrayrecord_to_state(arrays).items()}
