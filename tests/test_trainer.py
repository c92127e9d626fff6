"""A deployed node's trainer and the forwarder Flower starts per message, over a real socket.

The deployment itself (a trainer killed mid-round, restarted, the model loaded once per
node) is checked in test_deploy; here the channel, the forwarder and the trainer's
caching are checked in process, each against the ClientApp called directly.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedpeft import models, records
from fedpeft.clients.app import app as client_app
from fedpeft.clients.channel import ChannelClosed, private_socket_path, recv_frame, send_frames
from fedpeft.clients.forwarder import ask_trainer, forward
from fedpeft.clients.trainer import Trainer
from fedpeft.codecs import arrayrecord_to_state, state_to_arrayrecord
from fedpeft.config import load_scenario
from fedpeft.data import load_task_data
from fedpeft.models import initial_adapter_state
from fedpeft.strategies.testing import ensure_task_identity
from fedpeft.tools.deploy import DeployError, SuperNodeOptions, supernode_command
from fedpeft.tools.deploy.poll import shortened_time

SCENARIO = load_scenario("smoke", ["train.local_steps=2"])


def _train_message(run_id: int = 1) -> Message:
    ensure_task_identity()
    labels = load_task_data(SCENARIO.data).num_labels
    peft = SCENARIO.peft_for_rank(SCENARIO.max_rank)
    initial = initial_adapter_state(SCENARIO.model, peft, labels, SCENARIO.seed)
    config = ConfigRecord({records.SCENARIO: SCENARIO.to_json(), records.SERVER_ROUND: 1})
    content = RecordDict({records.ARRAYS: state_to_arrayrecord(initial), records.CONFIG: config})
    message = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    message.metadata.__dict__.update(_message_id=f"m{run_id}", _run_id=run_id)
    return message


def _context(socket_path: Path | None = None, run_id: int = 1) -> Context:
    node = {records.NODE_PARTITION_ID: 1, records.NODE_NUM_PARTITIONS: 2}
    if socket_path is not None:
        node[records.NODE_TRAINER_SOCKET] = str(socket_path)
    return Context(run_id=run_id, node_id=7, node_config=node, state=RecordDict(), run_config={})


@pytest.fixture
def trainer():
    """A trainer serving on a private socket from a thread of this process."""
    folder = Path(tempfile.mkdtemp(prefix="fedpeft-test-"))  # short: socket paths are limited
    served = Trainer(private_socket_path(folder), idle_free_s=600)
    threading.Thread(target=served.serve_forever, daemon=True).start()
    yield served
    served.stop()
    shutil.rmtree(folder, ignore_errors=True)


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    state = arrayrecord_to_state(reply.content.array_records[records.ARRAYS])
    return {k: v.numpy() for k, v in state.items()}


def test_a_forwarded_message_gets_the_reply_the_clientapp_gives_directly(trainer):
    direct = client_app(_train_message(), _context())
    context = _context(Path(trainer.server.getsockname()))
    forwarded = forward(_train_message(), context)

    assert forwarded.metadata.reply_to_message_id == "m1"
    assert forwarded.metadata.message_type == MessageType.TRAIN
    mine, theirs = _arrays(forwarded), _arrays(direct)
    assert mine.keys() == theirs.keys()
    for key in mine:
        np.testing.assert_array_equal(mine[key], theirs[key])
    metrics = forwarded.content.metric_records[records.METRICS]
    assert metrics[records.PARTITION_ID] == 1
    assert (
        metrics[records.TRAIN_LOSS]
        == direct.content.metric_records[records.METRICS][records.TRAIN_LOSS]
    )
    assert trainer.messages == 1


def test_the_trainer_keeps_its_model_within_a_run_and_loads_afresh_for_a_new_one(trainer):
    path = Path(trainer.server.getsockname())
    first_run, second_run = [_train_message(run_id=1) for _ in range(3)], _train_message(run_id=2)
    before = models.LOADS["base_model"]
    for message in first_run:
        forward(message, _context(path, run_id=1))
    assert models.LOADS["base_model"] == before + 1  # one load for three messages
    forward(second_run, _context(path, run_id=2))
    assert models.LOADS["base_model"] == before + 2  # another run: dropped and built again
    assert trainer.run_id == 2


def test_the_socket_is_private_to_this_user(trainer):
    path = Path(trainer.server.getsockname())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_trainer_that_dies_mid_message_fails_that_message_in_one_line(tmp_path):
    folder = Path(tempfile.mkdtemp(prefix="fedpeft-test-"))
    path = private_socket_path(folder)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def dies_after_reading() -> None:  # what a SIGKILLed trainer looks like to the forwarder
        conn, _ = server.accept()
        recv_frame(conn), recv_frame(conn)
        conn.close()

    threading.Thread(target=dies_after_reading, daemon=True).start()
    with pytest.raises(RuntimeError, match="trainer died while handling this message"):
        ask_trainer(path, _train_message(), _context(path))
    server.close()
    shutil.rmtree(folder, ignore_errors=True)


def test_the_trainer_outlives_a_forwarder_that_vanishes(trainer):
    path = Path(trainer.server.getsockname())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:  # connects, sends nothing
        gone.connect(str(path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as garbage:
        garbage.connect(str(path))
        send_frames(garbage, b"not a message", b"not a context")
        with pytest.raises(ChannelClosed):
            recv_frame(garbage)  # the trainer drops it without an answer
    reply = forward(_train_message(), _context(path))  # and serves the next message
    assert reply.content.metric_records[records.METRICS][records.PARTITION_ID] == 1
    assert trainer.messages == 1


def test_the_context_state_comes_back_from_the_trainer(trainer):
    path = Path(trainer.server.getsockname())
    context = _context(path)
    context.state["mine"] = ConfigRecord({"kept": 3})
    probe = Message(
        RecordDict({records.CONFIG: ConfigRecord({records.SCENARIO: SCENARIO.to_json()})}),
        dst_node_id=7,
        message_type=MessageType.QUERY,
    )
    probe.metadata.__dict__.update(_message_id="q1", _run_id=1)
    reply = forward(probe, context)
    assert reply.metadata.reply_to_message_id == "q1"
    assert reply.content.metric_records[records.METRICS][records.PARTITION_ID] == 1
    assert context.state["mine"]["kept"] == 3  # the state the trainer saw, handed back


def test_an_error_in_the_trainer_reaches_the_forwarder_with_its_reason(trainer):
    path = Path(trainer.server.getsockname())
    bad = _train_message()
    bad.content.config_records[records.CONFIG][records.SCENARIO] = "{not json"
    with pytest.raises(RuntimeError, match="the node's trainer failed"):
        forward(bad, _context(path))
    forward(_train_message(), _context(path))  # and it serves the next message
    assert trainer.messages == 1


def test_the_forwarder_imports_neither_torch_nor_transformers():
    code = (
        "import sys, fedpeft.clients.forwarder; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().replace("'", '"')) == []


def test_poll_interval_shortens_only_flowers_empty_pull_wait(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr("time.sleep", slept.append)
    fake_time = shortened_time(0.2)
    fake_time.sleep(3)
    fake_time.sleep(0.5)
    assert slept == [0.2, 0.5]
    assert fake_time.monotonic is not None  # the rest of the time module is there

    opts = SuperNodeOptions(superlink="127.0.0.1:1", partition_id=0, num_partitions=1)
    command = supernode_command(SuperNodeOptions(**{**opts.__dict__, "insecure": True}))
    assert command[0].endswith("flower-supernode")
    fast = SuperNodeOptions(**{**opts.__dict__, "insecure": True, "poll_interval": 0.2})
    assert supernode_command(fast)[1:4] == ["-m", "fedpeft.tools.deploy.poll", "0.2"]
    with pytest.raises(DeployError, match="--poll-interval 5"):
        supernode_command(SuperNodeOptions(**{**fast.__dict__, "poll_interval": 5.0}))


def test_a_node_with_a_trainer_names_its_socket_in_the_node_config():
    opts = SuperNodeOptions(
        superlink="127.0.0.1:1",
        partition_id=0,
        num_partitions=1,
        insecure=True,
        trainer_socket=Path("/tmp/fedpeft-trainer-x/trainer.sock"),
    )
    command = supernode_command(opts)
    node_config = command[command.index("--node-config") + 1]
    assert 'trainer-socket="/tmp/fedpeft-trainer-x/trainer.sock"' in node_config.split()
    assert os.sep in node_config


def test_the_trainer_runs_tasks_of_a_supernode_in_process_isolation(tmp_path) -> None:
    """The command lines: the SuperNode starts no process per message and requires the
    secret, which the supervisor makes 0600 and hands to the trainer."""
    from fedpeft.tools.deploy.processes import Processes
    from fedpeft.tools.deploy.trainer import TrainerSupervisor

    folder = Path(tempfile.mkdtemp(prefix="fedpeft-test-"))
    try:
        supervisor = TrainerSupervisor(Processes({}, cwd=tmp_path), folder, tmp_path / "t.log",
                                       runtime_port=9177)  # fmt: skip
        assert stat.S_IMODE(supervisor.secret.stat().st_mode) == 0o600
        assert len(supervisor.secret.read_bytes()) == 32
        command = supervisor.command()
        assert command[command.index("--runtime-api") + 1] == "127.0.0.1:9177"
        assert command[command.index("--secret-file") + 1] == str(supervisor.secret)
        assert "--socket" not in command
        opts = SuperNodeOptions(
            superlink="127.0.0.1:9092",
            partition_id=0,
            num_partitions=2,
            insecure=True,
            port=9177,
            executor_secret=supervisor.secret,
        )
        node = supernode_command(opts)
        assert node[node.index("--isolation") + 1] == "process"
        assert node[node.index("--superexec-auth-secret-file") + 1] == str(supervisor.secret)
        assert "trainer-socket" not in node[node.index("--node-config") + 1]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow(10)
def test_a_supernode_hands_tasks_only_to_the_holder_of_its_secret(tmp_path) -> None:
    """A real flower-supernode (no SuperLink: its Runtime API starts first): AcquireTask
    unsigned is refused; signed with the node's secret it is answered (no task yet)."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    from fedpeft.clients.executor import TaskExecutor
    from fedpeft.tools.deploy.flower import flower_bin
    from fedpeft.tools.deploy.processes import free_port

    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32))
    port = free_port()
    log = (tmp_path / "node.log").open("w")
    node = subprocess.Popen(
        [
            flower_bin("flower-supernode"),
            "--insecure",
            "--superlink",
            f"127.0.0.1:{free_port()}",  # nothing listens: it keeps retrying
            "--port",
            str(port),
            "--isolation",
            "process",
            "--superexec-auth-secret-file",
            str(secret),
        ],  # fmt: skip
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        stranger = RuntimeHttpClient.from_server_address(
            f"127.0.0.1:{port}",
            insecure=True,
            root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        )
        deadline = time.monotonic() + 60
        while True:  # until the Runtime API is up: then it must refuse the stranger
            try:
                stranger.AcquireTask(request)
                raise AssertionError("an unsigned AcquireTask was answered")
            except httpx.TransportError:
                assert time.monotonic() < deadline, (tmp_path / "node.log").read_text()
                time.sleep(0.2)
            except httpx.HTTPStatusError as refused:
                assert refused.response.status_code in (401, 403)
                break
        executor = TaskExecutor(f"127.0.0.1:{port}", secret, handle=lambda m, c: m)
        answer = executor.client.AcquireTask(request)
        assert not answer.HasField("task")  # answered: no message has come yet
    finally:
        os.killpg(node.pid, 15)  # the SuperNode this test started, and only it
        node.wait(timeout=30)
        log.close()


class _NodeStillPulling:
    """The parts of a SuperNode's Runtime API a task's pull uses, serving one message
    whose objects each become available only after ``unavailable`` tries, as on a node
    still pulling them from the SuperLink. It records when each object was asked for."""

    def __init__(self, message: Message, context: Context, unavailable: int) -> None:
        from flwr.common.serde import context_to_proto, message_to_proto
        from flwr.supercore.inflatable.inflatable_object import (
            get_all_nested_objects,
            get_object_tree,
        )

        self.tree = get_object_tree(message)
        self.contents = {k: v.deflate() for k, v in get_all_nested_objects(message).items()}
        self.header = message_to_proto(message)
        self.context = context_to_proto(context)
        self.unavailable, self.confirmed = unavailable, []
        self.asked: dict[str, list[float]] = {}

    def PullTaskInput(self, request):  # noqa: N802 - the Runtime API's names
        from flwr.proto.run_pb2 import Run
        from flwr.proto.runtime_pb2 import PullTaskInputResponse

        run = Run(run_id=self.context.run_id)
        return PullTaskInputResponse(task_id=3, run=run, context=self.context)

    def PullMessages(self, request):  # noqa: N802
        from flwr.proto.runtime_pb2 import PullAppMessagesResponse

        return PullAppMessagesResponse(
            messages_list=[self.header], message_object_trees=[self.tree]
        )

    def PullObject(self, request):  # noqa: N802
        from flwr.proto.message_pb2 import PullObjectResponse

        tries = self.asked.setdefault(request.object_id, [])
        tries.append(time.monotonic())
        ready = len(tries) > self.unavailable
        content = self.contents[request.object_id] if ready else b""
        return PullObjectResponse(object_found=True, object_available=ready, object_content=content)

    def ConfirmMessageReceived(self, request):  # noqa: N802
        from flwr.proto.message_pb2 import ConfirmMessageReceivedResponse

        self.confirmed.append(request.message_object_id)
        return ConfirmMessageReceivedResponse()


def test_the_trainer_pulls_a_message_whose_objects_are_still_arriving_without_waiting_1s():
    """Flower's flwr-clientapp retries unavailable objects after 1 s, then 2 s; the trainer
    retries after its poll interval, so a message that arrives a moment later is not late."""
    from fedpeft.clients.executor import POLL_S, pull_task_input

    message = _train_message()
    message.metadata.__dict__["_message_id"] = message.object_id
    node = _NodeStillPulling(message, _context(), unavailable=3)
    pulled, context = pull_task_input(node, POLL_S)  # type: ignore[arg-type]
    assert pulled.object_id == message.object_id == pulled.metadata.message_id
    assert _arrays(pulled).keys() == _arrays(message).keys()
    for key, value in _arrays(pulled).items():
        np.testing.assert_array_equal(value, _arrays(message)[key])
    assert context.run_id == 1 and context.node_id == 7
    assert node.confirmed == [message.object_id]
    assert node.asked.keys() == node.contents.keys()
    for tries in node.asked.values():
        assert len(tries) == 4
        # retries after 0.05, 0.1 and 0.2 s (+-20%); Flower's schedule takes 1 + 2 + 4 s
        assert tries[-1] - tries[0] < 1.0, tries
