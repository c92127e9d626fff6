"""The ClientApp Flower starts for each message: a thin forwarder to the node's trainer.

Flower 1.42's deployment engine starts a fresh ``flwr-clientapp`` process for every
message. When the node was started with a trainer (``fedpeft deploy supernode``, whose
``--node-config`` then names ``trainer-socket``), this app imports neither torch nor
transformers: it hands the message and its context to the long-lived trainer process over
the node's private Unix socket (:mod:`fedpeft.clients.channel`) and returns the trainer's
reply. The trainer runs the whole ClientApp, mods included, and keeps its model loaded
across messages (:mod:`fedpeft.clients.trainer`).

Without a trainer (simulation, the in-process grid, ``--no-trainer``) the full ClientApp
runs right here, as it always did.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpeft import records
from fedpeft.clients.channel import (
    FAILED,
    OK,
    ChannelClosed,
    decode_exchange,
    encode_exchange,
    recv_frame,
    send_frames,
)

#: how long a message waits for a trainer that is (re)starting before the node gives up
CONNECT_WAIT_S = float(os.environ.get("FEDPEFT_TRAINER_WAIT_S", "120"))

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train, in the node's trainer when it has one."""
    return forward(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate, in the node's trainer when it has one."""
    return forward(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer the server's queries, in the node's trainer when it has one."""
    return forward(msg, context)


def forward(msg: Message, context: Context) -> Message:
    """The reply of the node's trainer, or of the full ClientApp here when there is none."""
    path = context.node_config.get(records.NODE_TRAINER_SOCKET)
    if path is None:
        # the full stack (torch, transformers) loads only on nodes without a trainer
        from fedpeft.clients.app import app as full_app

        return full_app(msg, context)
    return ask_trainer(Path(str(path)), msg, context)


def ask_trainer(path: Path, msg: Message, context: Context) -> Message:
    """Send one message to the trainer at ``path``; its reply, with ``context`` updated.

    A trainer that fails the message, or dies while handling it, makes this raise, so
    Flower answers the server with an error: the round counts the node as failed.
    """
    with _connect(path) as conn:
        send_frames(conn, *encode_exchange(msg, context))
        try:
            status = recv_frame(conn)
            if status == FAILED:
                raise RuntimeError(f"the node's trainer failed: {recv_frame(conn).decode()}")
            if status != OK:
                raise RuntimeError(f"the node's trainer answered {status!r}")
            reply, updated = decode_exchange(recv_frame(conn), recv_frame(conn))
        except ChannelClosed as err:
            raise RuntimeError(
                "the node's trainer died while handling this message; it restarts for the next"
            ) from err
    context.state = updated.state  # personal state, SecAgg+ keys: Flower saves it for the node
    return reply


def _connect(path: Path) -> socket.socket:
    """Connect to the trainer, waiting for one that is (re)starting to listen."""
    deadline = time.monotonic() + CONNECT_WAIT_S
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(path))
            return conn
        except (FileNotFoundError, ConnectionRefusedError) as err:
            conn.close()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no trainer listens at {path} after {CONNECT_WAIT_S:g} s"
                ) from err
            time.sleep(0.1)
