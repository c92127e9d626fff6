"""The trainer as its node's SuperExec: it runs the node's ClientApp tasks itself.

In Flower 1.42 a SuperNode hands each message to a *task*. By default
(``--isolation subprocess``) it starts ``flower-superexec``, which starts a fresh
``flwr-clientapp`` process for every task: Python, flwr's imports, the app's FAB unpacked,
and a 1 s poll between tasks, before any work. With ``--isolation process`` the SuperNode
starts nothing and waits for a SuperExec of the user's. The trainer is that SuperExec:
:class:`TaskExecutor` asks the node's Runtime API for ClientApp tasks and runs each one in
this process, as ``flwr-clientapp`` would (pull the message and context, run the ClientApp,
push the reply, the context and the task's status), with the model already loaded.

The Runtime API listens on the node's own address (``127.0.0.1:PORT``). Acquiring a task
is signed with the node's SuperExec secret (Flower's ``--superexec-auth-secret-file``,
a file only the node's user can read); each task's calls then carry the one-time token
the SuperNode issued for it, as Flower's own processes do.

The app that runs is the ClientApp imported here (``fedpeft.clients.app``), the
installed fedpeft, not the FAB the run ships: a deployed node runs the fedpeft it has.
"""

from __future__ import annotations

import os
import socket
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

import httpx
from flwr.app import Context, Error, Message, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

#: the Runtime API call that the SuperExec secret signs (as flower-superexec's)
ACQUIRE = "/flwr.proto.Runtime/AcquireTask"
#: seconds between asking for a task while none is waiting (flower-superexec: 1 s)
POLL_S = 0.05

#: the longest wait between two tries at a message's objects (see :func:`pull_task_input`)
PULL_BACKOFF_CAP_S = 1.0

#: what runs one message: the trainer's ClientApp call, timed and logged
Handler = Callable[[Message, Context], Message]


class TaskExecutor:
    """Acquire the node's ClientApp tasks and run each in this process, one at a time."""

    def __init__(
        self, runtime_address: str, secret_file: Path, handle: Handler, poll_s: float = POLL_S
    ) -> None:
        secret = load_superexec_auth_secret(str(secret_file))
        interceptors: list[ProtobufClientInterceptor] = [
            RuntimeVersionHttpInterceptor(component_name="SuperExec")
        ]
        if secret is not None:
            interceptors.append(
                SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE})
            )
        self.address, self.handle, self.poll_s = runtime_address, handle, poll_s
        #: the token of the task under way, so a restarted trainer can close it at once
        self.under_way = secret_file.parent / "task.token"
        self.client = RuntimeHttpClient.from_server_address(
            server_address=runtime_address,
            insecure=True,  # the node's own loopback address
            root_certificates=None,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
        )
        self._stopped = threading.Event()

    def serve_forever(self, idle: Callable[[], None] | None = None) -> None:
        """Run tasks as they come until :meth:`stop`; ``idle()`` runs between polls."""
        self.wait_for_node()
        self.close_abandoned_task()
        while not self._stopped.is_set():
            try:
                found = self.client.AcquireTask(
                    AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
                )
            except httpx.TransportError:  # the node went away: wait for it to listen again
                self.wait_for_node()
                continue
            if found.HasField("task") and found.token:
                self.run_task(found.token)
                continue
            if idle is not None:
                idle()
            self._stopped.wait(self.poll_s)

    def stop(self) -> None:
        """Stop after the task under way (from another thread)."""
        self._stopped.set()

    def wait_for_node(self) -> None:
        """Wait until the node's Runtime API accepts connections, checking every 0.1 s.

        The trainer starts before its SuperNode; asking for tasks before the node listens
        would leave the Runtime client in its retry back-off (up to seconds per try) when
        the first message arrives.
        """
        host, _, port = self.address.rpartition(":")
        while not self._stopped.is_set():
            try:
                with socket.create_connection((host, int(port)), timeout=1.0):
                    return
            except OSError:
                self._stopped.wait(0.1)

    def close_abandoned_task(self) -> None:
        """End the task a killed trainer left under way: its node fails it now.

        Otherwise the SuperNode notices only when the task's heartbeats have stopped for a
        minute, and the round waits that long for the node's reply.
        """
        if not self.under_way.is_file():
            return
        token, _, header = self.under_way.read_text().partition("\n")
        self.under_way.unlink()
        client = self._task_client(token.strip(), retry=False)
        why = "the node's trainer died during this task; it has been restarted"
        try:
            if header.strip():  # the message was pulled: answer it with an error
                proto = ProtoMessage.FromString(bytes.fromhex(header.strip()))
                message = message_from_proto(proto)
                context = Context(
                    run_id=message.metadata.run_id,
                    node_id=message.metadata.dst_node_id,
                    node_config={},
                    state=RecordDict(),
                    run_config={},
                )
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=why)
                push_message(client, Message(error, reply_to=message), context)
            push_task_output(client, None, SubStatus.FAILED, why)
            print(f"fedpeft trainer: answered the task left under way: {why}", flush=True)
        except Exception as err:  # noqa: BLE001 - else Flower expires it (its heartbeats stop)
            print(f"fedpeft trainer: could not close the task left under way: {err!r}", flush=True)
        finally:
            client.close()

    def _task_client(self, token: str, retry: bool = True) -> RuntimeHttpClient:
        """A Runtime API client for one task's calls, carrying its token."""
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=make_simple_http_retry_invoker() if retry else None,
        )

    def run_task(self, token: str) -> None:
        """One task, as Flower's ``flwr-clientapp`` runs it, in this process."""
        descriptor = os.open(self.under_way, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(token)
        client = self._task_client(token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        context: Context | None = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        try:
            message, context = pull_task_input(client, self.poll_s)
            header = message_to_proto(remove_content_from_message(message)).SerializeToString()
            with self.under_way.open("a") as out:  # what a restarted trainer answers
                out.write("\n" + header.hex())
            try:
                reply = self.handle(message, context)
                status, details = SubStatus.COMPLETED, ""
            except Exception as err:  # noqa: BLE001 - the server gets Flower's error reply
                details = f"<class '{type(err).__name__}'>:<'{err}'>"
                reason = f"ClientAppException: {details}\n{traceback.format_exc()}"
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
                reply = Message(error, reply_to=message)
            push_message(client, reply, context)
        finally:
            push_task_output(client, context, status, details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
            self.under_way.unlink(missing_ok=True)


def pull_task_input(client: RuntimeHttpClient, first_retry_s: float) -> tuple[Message, Context]:
    """A task's message and context, as Flower's ``pull_task_input`` gets them, sooner.

    The SuperNode creates a task as soon as a message's header has arrived, then pulls the
    message's objects from the SuperLink, so the trainer (polling every :data:`POLL_S`)
    usually asks for objects that are not there yet. Flower's ``flwr-clientapp`` does the
    same and retries after 1 s, then 2 s (``flwr.supercore.constant.PULL_INITIAL_BACKOFF``):
    about a second lost per message (measured in benchmarks/deploy_latency.py). The trainer
    retries after ``first_retry_s``, doubling up to :data:`PULL_BACKOFF_CAP_S`.
    """
    task_input = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = task_input.task_id
    TaskIdentity.run_id = task_input.run.run_id
    TaskIdentity.node_id = task_input.context.node_id
    context = context_from_proto(task_input.context)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        max_tries_per_object=None,  # bounded by Flower's max_time (2 h), as its own pull
        initial_backoff=first_retry_s,
        backoff_cap=PULL_BACKOFF_CAP_S,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's does
    return message, context
