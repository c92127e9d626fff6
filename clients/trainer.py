"""A deployed node's trainer: one long-lived process that keeps the model loaded.

``fedpeft deploy supernode`` starts it next to ``flower-supernode`` (and restarts it if it
dies). Each message's ClientApp process is a thin forwarder
(:mod:`fedpeft.clients.forwarder`); the work happens here, in the full ClientApp with all
its mods (compression, DP, SecAgg+, faults), so the base model, its quantisation and the
client's data split are built once per run instead of once per message. The models are
dropped, and their memory (GPU memory too) given back, when a message of another run
arrives or when the node has been idle for ``--idle-free-s`` seconds.

Run as ``python -m fedpeft.clients.trainer --socket PATH``.
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
import traceback
from pathlib import Path

from flwr.app import Context, Message
from google.protobuf.message import DecodeError

from fedpeft import models, records
from fedpeft.clients.app import app as client_app
from fedpeft.clients.app import forget_data_and_processors
from fedpeft.clients.channel import (
    FAILED,
    OK,
    READY,
    decode_exchange,
    encode_exchange,
    listen,
    peer_uid,
    recv_frame,
    send_frames,
)

#: seconds a forwarder may take to send its message once connected
REQUEST_TIMEOUT_S = 60.0


class Trainer:
    """Serves one message per connection on a private Unix socket."""

    def __init__(self, socket_path: Path | None, idle_free_s: float) -> None:
        self.server = listen(socket_path) if socket_path is not None else None
        self.idle_free_s = idle_free_s
        self.last_message = time.monotonic()
        self.run_id: int | None = None  # the run whose models are loaded
        self.messages = 0
        self._stopped = threading.Event()

    def serve_forever(self) -> None:
        """Accept and answer messages until the process is stopped."""
        assert self.server is not None, "a trainer made without a socket executes tasks"
        self.server.settimeout(self.idle_free_s)
        while not self._stopped.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:  # idle: the run has most likely ended
                self._free(f"idle for {self.idle_free_s:g} s")
                continue
            except OSError:
                if self._stopped.is_set():  # stop() closed the socket
                    return
                raise
            with conn:
                try:
                    self.serve_one(conn)
                except (OSError, DecodeError) as err:  # a forwarder that went away, or garbage
                    _say(f"dropped a connection: {type(err).__name__}: {err}")

    def stop(self) -> None:
        """Stop serving (from another thread); the models stay cached until freed."""
        self._stopped.set()
        if self.server is None:
            return
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() on Linux
        except OSError:
            pass
        self.server.close()

    def serve_one(self, conn: socket.socket) -> None:
        """Answer one forwarder: its message through the full ClientApp."""
        uid = peer_uid(conn)
        if uid is not None and uid != os.getuid():
            _say(f"refused a connection from uid {uid} (not this node's user)")
            return
        conn.settimeout(REQUEST_TIMEOUT_S)  # a stalled caller cannot hold the node
        message, context = decode_exchange(recv_frame(conn), recv_frame(conn))
        conn.settimeout(None)
        try:
            reply = self.answer(message, context)
        except Exception as err:  # noqa: BLE001 - the forwarder turns it into Flower's error reply
            reason = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
            send_frames(conn, FAILED, reason.encode())
            return
        send_frames(conn, OK, *encode_exchange(reply, context))

    def answer(self, message: Message, context: Context) -> Message:
        """Run one message through the full ClientApp; a new run frees the last run's models."""
        run_id = message.metadata.run_id
        if run_id != self.run_id:
            self._free(f"run {run_id} starts")
            self.run_id = run_id
        kind = message.metadata.message_type
        _say(f"run {run_id}: {kind} message (round {records.round_of(message)}) starts")
        started = time.perf_counter()
        try:
            reply = client_app(message, context)
        except Exception as err:
            _say(f"{kind} message failed: {type(err).__name__}: {err}")
            raise
        finally:
            self.last_message = time.monotonic()
        self.messages += 1
        _say(
            f"run {run_id}: {kind} message done in "
            f"{time.perf_counter() - started:.2f} s (model loads so far: "
            f"{models.LOADS['base_model']})"
        )
        return reply

    def free_when_idle(self) -> None:
        """Free the models once no message came for ``idle_free_s`` (the run has ended)."""
        if self.run_id is not None and time.monotonic() - self.last_message > self.idle_free_s:
            self._free(f"idle for {self.idle_free_s:g} s")

    def _free(self, why: str) -> None:
        forget_data_and_processors()
        if dropped := models.free_cached_models():
            _say(f"{why}: dropped {dropped} cached model(s) and freed their memory")
        self.run_id = None


def _exit_with(parent_pid: int) -> None:
    """Exit this process as soon as ``parent_pid`` is gone (its launcher was SIGKILLed)."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:  # re-parented: the launcher died
                _say(f"the node's launcher (pid {parent_pid}) is gone; exiting")
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _say(text: str) -> None:
    now = time.time()
    stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
    print(f"{stamp} fedpeft trainer: {text}", flush=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m fedpeft.clients.trainer (--socket PATH | --runtime-api ADDR --secret-file F)``.

    With ``--socket`` it answers the node's per-message forwarders; with ``--runtime-api``
    it is the node's SuperExec (:mod:`fedpeft.clients.executor`) and runs its tasks itself.
    """
    parser = argparse.ArgumentParser(prog="python -m fedpeft.clients.trainer")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", type=Path, help="the node's private socket (forwarders)")
    where.add_argument(
        "--runtime-api", help="HOST:PORT of the node's Runtime API (flower-supernode --port)"
    )
    parser.add_argument(
        "--secret-file", type=Path, help="the node's SuperExec secret (with --runtime-api)"
    )
    parser.add_argument(
        "--idle-free-s",
        type=float,
        default=float(os.environ.get("FEDPEFT_TRAINER_IDLE_FREE_S", "600")),
        help="free the loaded models after this many seconds without a message "
        "(default: $FEDPEFT_TRAINER_IDLE_FREE_S or 600)",
    )
    parser.add_argument(
        "--parent-pid", type=int, help="exit when this process (the node's launcher) is gone"
    )
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        _exit_with(args.parent_pid)
    trainer = Trainer(args.socket, args.idle_free_s)
    if args.runtime_api is None:
        print(f"{READY} {args.socket} (pid {os.getpid()})", flush=True)
        trainer.serve_forever()
        return
    if args.secret_file is None:
        parser.error("--runtime-api needs --secret-file (the node's SuperExec secret)")
    from fedpeft.clients.executor import TaskExecutor

    executor = TaskExecutor(args.runtime_api, args.secret_file, trainer.answer)
    print(f"{READY} {args.runtime_api} (pid {os.getpid()})", flush=True)
    _say("runs the node's ClientApp tasks itself (flower-supernode --isolation process)")
    executor.serve_forever(idle=trainer.free_when_idle)


if __name__ == "__main__":
    main()
