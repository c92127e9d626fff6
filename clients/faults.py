"""The client's side of injected failures, as a Flower mod around the training handler.

Which faults hit a client in a round is decided in :mod:`fedpeft.faults` (a pure function
of seed, round, client and kind); :func:`fault_mod` carries them out: it crashes, stalls,
poisons the reply or fills it with NaN. The server drops lost instructions itself
(:class:`fedpeft.server.reliability.FaultyGrid`).
"""

from __future__ import annotations

import math
import time

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedpeft import records
from fedpeft.codecs import arrayrecord_to_state, message_state, state_to_arrayrecord
from fedpeft.config import FaultsSection, Scenario
from fedpeft.faults import faults_of


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Crash, stall or poison a training reply as the scenario's ``[faults]`` ask."""
    if msg.metadata.message_type != MessageType.TRAIN or msg.has_error():
        return call_next(msg, context)
    config = msg.content.config_records.get(records.CONFIG)
    if config is None or records.SCENARIO not in config:
        return call_next(msg, context)
    scenario = Scenario.from_json(str(config[records.SCENARIO]))
    if not scenario.faults.enabled:
        return call_next(msg, context)
    server_round = int(str(config.get(records.SERVER_ROUND, 0)))
    partition_id = int(str(context.node_config[records.NODE_PARTITION_ID]))
    hits = faults_of(scenario, server_round, partition_id)
    if "crash" in hits:
        raise RuntimeError(f"injected crash (faults.crash_rate={scenario.faults.crash_rate})")
    if "slow" in hits:
        time.sleep(scenario.faults.slow_seconds)
    reply = call_next(msg, context)
    if scenario.faults.poison != "none" and partition_id in scenario.faults.poison_clients:
        reply = _poisoned(msg, reply, scenario.faults)
    if "nan" in hits and records.ARRAYS in reply.content.array_records:
        state = arrayrecord_to_state(reply.content.array_records[records.ARRAYS])
        first = next(iter(state), None)
        if first is not None:
            state[first] = state[first].clone().fill_(math.nan)
            reply.content[records.ARRAYS] = state_to_arrayrecord(state)
    return reply


def _poisoned(msg: Message, reply: Message, faults: FaultsSection) -> Message:
    """The reply with its change from the received adapter scaled (or sign-flipped).

    ``inflate_examples`` leaves the tensors and multiplies the example count instead: the
    weight a lying client would claim in every example-weighted rule.
    """
    if faults.poison == "inflate_examples":
        return _inflated(reply, faults.poison_scale)
    if reply.has_error() or records.ARRAYS not in reply.content.array_records:
        return reply
    sent, state = message_state(msg), message_state(reply)
    factor = faults.poison_scale * (-1.0 if faults.poison == "sign_flip" else 1.0)
    for key, value in state.items():
        if key in sent and sent[key].shape == value.shape:
            state[key] = sent[key] + factor * (value - sent[key])
    reply.content[records.ARRAYS] = state_to_arrayrecord(state)
    return reply


def _inflated(reply: Message, scale: float) -> Message:
    """The reply claiming ``scale`` times the examples it trained on (an int when whole)."""
    metrics = reply.content.metric_records.get(records.METRICS)
    if reply.has_error() or metrics is None or records.NUM_EXAMPLES not in metrics:
        return reply
    claimed = float(str(metrics[records.NUM_EXAMPLES])) * scale
    metrics[records.NUM_EXAMPLES] = int(claimed) if claimed.is_integer() else claimed
    return reply
