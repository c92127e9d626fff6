"""Each SuperNode's trainer process: started with the node, restarted if it dies, stopped with it.

The trainer (:mod:`fedpeft.clients.trainer`) keeps the model loaded across messages; the
node's per-message ClientApps forward to it over a private Unix socket. A watcher thread
restarts a trainer that exits while its node is up, so a crash costs the message under
way (the round counts the node failed) and nothing after it.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedpeft.clients.channel import READY, private_socket_path
from fedpeft.tools.deploy.errors import DeployError
from fedpeft.tools.deploy.flower import SuperNodeOptions, supernode_command
from fedpeft.tools.deploy.processes import Processes, last_line, wait_for_text


class TrainerSupervisor:
    """Keeps one node's trainer running; every process it starts is in ``procs.started``."""

    def __init__(
        self,
        procs: Processes,
        folder: Path,
        log: Path,
        name: str = "trainer",
        runtime_port: int | None = None,
    ) -> None:
        self.procs = procs
        self.socket = private_socket_path(folder)
        #: the node's Runtime API port when the trainer runs the node's tasks itself
        self.runtime_port = runtime_port
        self.secret = folder / "superexec.secret"  # the node's SuperExec secret (0600)
        if runtime_port is not None:
            descriptor = os.open(self.secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as out:
                out.write(secrets.token_bytes(32))
        self.log = log
        self.name = name
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True, name=f"{name}-watch")

    def command(self) -> list[str]:
        """The trainer's command line (it exits by itself if this process dies)."""
        if self.runtime_port is None:
            serves = ["--socket", str(self.socket)]
        else:
            address = f"127.0.0.1:{self.runtime_port}"
            serves = ["--runtime-api", address, "--secret-file", str(self.secret)]
        return [
            sys.executable,
            "-m",
            "fedpeft.clients.trainer",
            *serves,
            "--parent-pid",
            str(os.getpid()),
        ]

    def launch(self) -> subprocess.Popen:
        """Start the trainer (it listens once torch is imported: :meth:`wait_ready`)."""
        return self._spawn()

    def wait_ready(self, wait_s: float = 120.0) -> None:
        """Wait until the trainer listens; from then on, restart it whenever it exits."""
        assert self._proc is not None, "launch() first"
        if not wait_for_text(self.log, READY, self._proc, wait_s):
            raise DeployError(f"the node's trainer did not start: {last_line(self.log)}")
        self._watcher.start()

    def stop(self) -> None:
        """No more restarts; the caller's ``procs.stop_all()`` stops the process itself."""
        self._stopping.set()
        if self._watcher.is_alive():
            self._watcher.join()

    def remove_socket_folder(self) -> None:
        """Delete the socket's private folder (once the trainer is stopped)."""
        shutil.rmtree(self.socket.parent, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        """The running trainer's PID."""
        return self._proc.pid if self._proc is not None else None

    def _spawn(self) -> subprocess.Popen:
        # appended, so a restart keeps the log of the trainer that died
        self._proc = self.procs.start(self.name, self.command(), self.log, append=True)
        return self._proc

    def _watch(self) -> None:
        """Restart the trainer whenever it exits.

        At once the first time; while it keeps dying within a minute of its start, after
        a pause that doubles up to 30 s.
        """
        pause, started = 0.0, time.monotonic()
        while not self._stopping.wait(0.5):
            proc = self._proc
            if proc is None or proc.poll() is None:
                continue
            pause = 0.0 if time.monotonic() - started > 60 else min(max(2 * pause, 1.0), 30.0)
            self.restarts += 1
            self._note(
                f"exited with code {proc.returncode}; restarting in {pause:g} s "
                f"(restart {self.restarts})"
            )
            if self._stopping.wait(pause):
                return
            try:
                self._spawn()
            except OSError as err:  # the dead process stays current: the next pass retries
                self._note(f"could not restart: {err}")
            started = time.monotonic()

    def _note(self, text: str) -> None:
        with self.log.open("a") as out:
            out.write(f"fedpeft trainer: {text}\n")


def run_supernode_with_trainer(
    opts: SuperNodeOptions, env: dict[str, str], forwarder: bool = False
) -> int:
    """``fedpeft deploy supernode``: the node's trainer and ``flower-supernode``, as one.

    The trainer runs the node's tasks itself (:mod:`fedpeft.clients.executor`); with
    ``forwarder``, Flower starts a ClientApp process per message that forwards it to the
    trainer over a private socket.

    Both stop when either this process is interrupted (Ctrl-C, SIGTERM) or the SuperNode
    exits; the trainer is restarted whenever it dies while the node is up. The trainer's
    log is ``trainer.log`` in the node's state folder (else in the current folder).
    Returns the SuperNode's exit status.
    """
    folder = Path(tempfile.mkdtemp(prefix="fedpeft-trainer-"))  # 0700, and a short path
    log_dir = opts.state_dir if opts.state_dir is not None else Path.cwd()
    procs = Processes(env, cwd=Path.cwd())
    port = None if forwarder else opts.port
    supervisor = TrainerSupervisor(procs, folder, log_dir / "trainer.log", runtime_port=port)
    if forwarder:
        opts = dataclasses.replace(opts, trainer_socket=supervisor.socket)
    else:
        opts = dataclasses.replace(opts, executor_secret=supervisor.secret)
    cmd = supernode_command(opts)
    with sigterm_as_interrupt():
        try:
            supervisor.launch()
            print(f"fedpeft: node trainer starting (log: {supervisor.log})", file=sys.stderr)
            supervisor.wait_ready()
            print(f"fedpeft: {shlex.join(cmd)}", file=sys.stderr, flush=True)
            node = subprocess.Popen(cmd, env=env, start_new_session=True)
            procs.started.append(("supernode", node))
            return node.wait()
        except KeyboardInterrupt:
            return 130
        finally:
            supervisor.stop()
            procs.stop_all()
            supervisor.remove_socket_folder()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so the processes started here get stopped on either."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
