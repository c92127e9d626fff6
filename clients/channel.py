"""The local channel between a deployed node's per-message ClientApp and its trainer.

A Unix-domain socket in a folder only the node's user can enter (0700), the socket itself
0600, and the trainer checks each caller's uid (``SO_PEERCRED``): no other user of the
machine can send it work. One connection carries one exchange: the forwarder sends the
message and its context, the trainer answers with the reply and the updated context, or
with an error text. Frames are Flower's own protobufs behind an 8-byte length, so nothing
here imports torch.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

_LENGTH = struct.Struct("!Q")
OK, FAILED = b"ok", b"er"  # the first frame of an answer
READY = "fedpeft trainer: listening on"  # the trainer's first line, once it accepts work


class ChannelClosed(ConnectionError):
    """The other end went away before a whole frame arrived."""

    def __init__(self, text: str = "the other end closed the channel mid-message") -> None:
        super().__init__(text)


def send_frames(conn: socket.socket, *frames: bytes) -> None:
    """Write each frame as its 8-byte length and its bytes."""
    conn.sendall(b"".join(_LENGTH.pack(len(f)) + f for f in frames))


def recv_frame(conn: socket.socket) -> bytes:
    """Read one frame; ChannelClosed when the peer closed (or died) first."""
    (size,) = _LENGTH.unpack(_recv_exactly(conn, _LENGTH.size))
    return _recv_exactly(conn, size)


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ChannelClosed()
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def encode_exchange(message: Message, context: Context) -> tuple[bytes, bytes]:
    """A message and its context as two frames."""
    return (
        message_to_proto(message).SerializeToString(),
        context_to_proto(context).SerializeToString(),
    )


def decode_exchange(message: bytes, context: bytes) -> tuple[Message, Context]:
    """The inverse of :func:`encode_exchange`."""
    proto_message, proto_context = ProtoMessage(), ProtoContext()
    proto_message.ParseFromString(message)
    proto_context.ParseFromString(context)
    return message_from_proto(proto_message), context_from_proto(proto_context)


def private_socket_path(folder: Path) -> Path:
    """``folder/trainer.sock``, with ``folder`` made private to this user (mode 0700)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder / "trainer.sock"


#: a Unix socket's path must fit in ``sockaddr_un.sun_path`` (108 bytes on Linux, 104 on macOS)
MAX_SOCKET_PATH = 100


def listen(path: Path) -> socket.socket:
    """A listening Unix socket at ``path`` that only this user may connect to (0600)."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(
            f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes; use a shorter TMPDIR"
        )
    if path.is_symlink() or (path.exists() and not stat.S_ISSOCK(path.stat().st_mode)):
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    if path.exists():
        path.unlink()  # a socket left by a trainer that was killed
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 0600: no window in which others could connect
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    server.listen(8)
    return server


def peer_uid(conn: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (Linux ``SO_PEERCRED``).

    None where the platform has no ``SO_PEERCRED`` (macOS): there the socket's 0600 mode
    in a 0700 folder is the whole protection.
    """
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    creds = conn.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("iII"))
    _, uid, _ = struct.unpack("iII", creds)
    return int(uid)
