"""The client's side of compression, as a Flower mod around every ClientApp handler.

On the way in, :func:`compression_mod` decodes a coded adapter payload into the plain
ArrayRecord the handlers read (rebuilding it on this node's copy of the adapter when the
server sent only the change). On the way out, it codes the reply's adapter tensors with
``compression.uplink`` as their change from what this client received, adding the
error-feedback residual: the part of earlier updates that compression dropped. Top-k ranks
the entries by the mean gradient the training handler attached to its reply
(``compression.topk_score = "loss"``); the mod takes that record out, so it never travels.

The node's copy and its residual live in the client state store under
``<state dir>/codec/``, one file per client, so they persist across rounds, survive
rounds in which the client is not sampled, and work the same in simulation (where a
client may run in any Ray worker) and on a real node (a fresh process per message).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedpeft import records
from fedpeft.adapters import AdapterState
from fedpeft.codecs import arrayrecord_to_state, blob_of, coded_record, state_to_arrayrecord
from fedpeft.codecs.compression import (
    UPLINK,
    CodecError,
    decode_update,
    encode_update,
    seeded_generator,
)
from fedpeft.config import Scenario
from fedpeft.state import ClientStateStore

HELD, RESIDUAL = "held/", "residual/"


def run_tag(context: Context, config: ConfigRecord) -> int:
    """The run's tag for the client state store: the server's, which survives a resume."""
    return int(str(config.get(records.RUN_TAG, context.run_id % 2**63)))


def state_dir(context: Context, config: ConfigRecord) -> str:
    """The node's state folder: its own ``state-dir`` node config, else the server's."""
    node_dir = context.node_config.get(records.NODE_STATE_DIR)
    return str(node_dir if node_dir is not None else config.get(records.STATE_DIR, ""))


def _split(saved: AdapterState, prefix: str) -> AdapterState:
    return {k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)}


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Decode the incoming adapter payload, run the handler, code the outgoing one."""
    content = msg.content
    config = content.config_records.get(records.CONFIG)
    if config is None or records.SCENARIO not in config:
        return call_next(msg, context)
    coded_in = records.COMPRESSED in content.array_records
    if not coded_in and records.ARRAYS not in content.array_records:
        return call_next(msg, context)
    scenario = Scenario.from_json(str(config[records.SCENARIO]))
    comp = scenario.compression
    if not comp.enabled:
        return call_next(msg, context)

    partition = int(str(context.node_config[records.NODE_PARTITION_ID]))
    folder = state_dir(context, config)
    store = ClientStateStore(Path(folder) / "codec", run_tag(context, config)) if folder else None
    saved = store.load(partition) if store else {}
    held, residual = _split(saved, HELD), _split(saved, RESIDUAL)

    if coded_in:
        received, _ = decode_update(blob_of(content.array_records[records.COMPRESSED]), held)
        del content.array_records[records.COMPRESSED]
        content[records.ARRAYS] = state_to_arrayrecord(received)
        if comp.downlink_delta:
            if store is None:
                raise CodecError("compression.downlink_delta needs a state-dir on this node")
            held = received
    else:
        received = arrayrecord_to_state(content.array_records[records.ARRAYS])

    reply = call_next(msg, context)
    gradient = None  # the handler's mean gradient, for top-k's ranking: it never travels
    if not reply.has_error() and records.GRADIENT in reply.content.array_records:
        gradient = arrayrecord_to_state(reply.content.array_records.pop(records.GRADIENT))
    if comp.uplink and not reply.has_error() and records.ARRAYS in reply.content.array_records:
        sent = arrayrecord_to_state(reply.content.array_records[records.ARRAYS])
        server_round = int(str(config.get(records.SERVER_ROUND, 0)))
        coded = encode_update(
            sent,
            comp.pipeline("uplink"),
            reference=received,
            residual=residual if comp.error_feedback else None,
            generator=seeded_generator(scenario.seed, server_round, partition, UPLINK),
            gradient=gradient,
        )
        del reply.content.array_records[records.ARRAYS]
        reply.content[records.COMPRESSED] = coded_record(coded.blob)
        if comp.error_feedback:  # tensors not sent this round keep their residual
            residual = {**residual, **coded.residual}
    if store is not None and (comp.downlink_delta or comp.error_feedback):
        store.save(
            partition,
            {
                **{HELD + k: v for k, v in held.items()},
                **{RESIDUAL + k: v for k, v in residual.items()},
            },
        )
    return reply
