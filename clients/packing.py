"""The node's side of a deployment's packed wire, as the outermost ClientApp mod.

The server sends each ArrayRecord as one Array (:mod:`fedpeft.codecs.packing`): one
HTTP request for the node's pull instead of two per array. :func:`packing_mod` unpacks
what arrives, so every other mod and the handlers see the records as in simulation, and
packs the reply the same way when the instruction came packed.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedpeft.codecs.packing import is_packed, pack, unpack


def packing_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Unpack the instruction's records, run the rest, pack the reply's (if it came packed)."""
    if not msg.has_content() or not is_packed(msg.content):
        return call_next(msg, context)
    msg.content = unpack(msg.content)
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content = pack(reply.content)
    return reply
