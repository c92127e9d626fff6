"""A Grid that hands each message straight to the ClientApp, in this process.

Flower's engines (the Ray simulation, a real SuperLink) move messages between processes;
this one calls the same ClientApp function directly, one node after the other. The
server, strategy and client code are the real ones: only the transport is missing. It
serves tests that need many short federated runs (the method table) and benchmarks that
measure fedpeft's own cost apart from the engine's.
"""

from __future__ import annotations

import itertools
import traceback
from collections.abc import Iterable, Iterator

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedpeft import records


class InProcessGrid(Grid):
    """``num_nodes`` virtual SuperNodes (partition ids 0..N-1) served by ``app`` here.

    Node ids are ``first_node_id``, ``first_node_id + 1``, ... in partition order, or
    ``node_ids`` (partition i on ``node_ids[i]``), as random as a real engine's.
    """

    def __init__(
        self,
        app: ClientApp,
        num_nodes: int,
        run_id: int = 1,
        first_node_id: int = 101,
        node_ids: list[int] | None = None,
    ) -> None:
        ids = node_ids or list(range(first_node_id, first_node_id + num_nodes))
        if len(ids) != num_nodes or len(set(ids)) != num_nodes:
            raise ValueError(f"node_ids must be {num_nodes} distinct ids, got {ids}")
        self._app = app
        self._run_id = run_id
        self._ids = itertools.count(1)
        self._contexts = {
            node_id: Context(
                run_id=run_id,
                node_id=node_id,
                node_config={
                    records.NODE_PARTITION_ID: pid,
                    records.NODE_NUM_PARTITIONS: num_nodes,
                },
                state=RecordDict(),
                run_config={},
            )
            for pid, node_id in enumerate(ids)
        }
        self._replies: dict[str, Message] = {}
        _ensure_task_identity(run_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self._contexts)

    def set_run(self, run_id):  # noqa: D102
        self._run_id = run_id

    @property
    def run(self):  # noqa: D102
        raise NotImplementedError("an in-process grid has no Flower Run object")

    def create_message(  # noqa: D102
        self, content, message_type, dst_node_id, group_id, ttl=None
    ) -> Message:
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id
        )

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        ids = []
        for message in messages:
            message_id = self._stamp(message)
            self._replies[message_id] = self._deliver(message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Each reply when it is asked for: the node trains as the server reads its reply.

        As on a real engine, where clients train while the server folds the replies in.
        """
        for message in messages:
            self._stamp(message)
            yield self._deliver(message)

    def _stamp(self, message: Message) -> str:
        """Give a message its id and run, as Flower's own grids stamp these read-only fields."""
        message_id = f"m{next(self._ids)}"
        message.metadata.__dict__.update(_message_id=message_id, _run_id=self._run_id)
        return message_id

    def _deliver(self, message: Message) -> Message:
        """Run the ClientApp on one message; an exception becomes an error reply, as in Flower."""
        context = self._contexts[message.metadata.dst_node_id]
        try:
            reply = self._app(message, context)
        except Exception as err:  # noqa: BLE001 - a failing client must not stop the server
            reason = f"ClientAppException: {type(err).__name__}: {err}\n{traceback.format_exc()}"
            reply = Message(Error(code=0, reason=reason), reply_to=message)
        reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
        return reply


def _ensure_task_identity(run_id: int) -> None:
    """Flower's messages read the running app's identity; outside an engine, set one."""
    from flwr.supercore.task_identity import TaskIdentity

    try:
        TaskIdentity.run_id  # noqa: B018 - raises when unset
    except RuntimeError:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, 0
