"""Client side of secure aggregation: Flower's ``secaggplus_mod`` around fedpeft's training.

Flower 1.42 ships SecAgg+ for its legacy API: ``secaggplus_mod`` runs the client's part
of the four stages (keys, key shares, the masked vector, unmasking) and, in the third,
calls the rest of the ClientApp and masks the legacy ``FitRes`` parameters it returns.
:func:`secagg_mod` wraps it. Messages with no SecAgg+ configs pass straight through. In
the masking stage it hands the mod this client's update as a ``FitRes``: the change of
every tensor it sends from what it received, flattened in key order, in float64. That is
what gets quantized, masked and summed (changes are small, so they lose less to the
quantization than the adapter's values would). The reply keeps its metrics and node info.
Its adapter tensors are gone, replaced by the masked integers.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedpeft import records
from fedpeft.adapters import AdapterState
from fedpeft.codecs import message_state

FITRES = "fitres"  # the legacy record names secaggplus_mod reads


def update_vectors(given: AdapterState, reply: Message) -> tuple[list[str], list[np.ndarray]]:
    """The keys the reply sends (sorted) and each one's change from what was ``given``."""
    sent = message_state(reply)
    keys = sorted(sent)
    return keys, [(sent[k].double() - given[k].double()).numpy() for k in keys]


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run this client's part of SecAgg+ (a no-op for messages without SecAgg+ configs)."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    keys: list[str] = []

    def train_as_fitres(message: Message, ctx: Context) -> Message:
        given = message_state(message)  # before the ClientApp takes the message apart
        reply = call_next(message, ctx)
        if reply.has_error():
            return reply
        names, changes = update_vectors(given, reply)
        keys.extend(names)
        weight = int(str(reply.content.metric_records[records.METRICS][records.NUM_EXAMPLES]))
        content = reply.content
        content[f"{FITRES}.parameters"] = ArrayRecord(changes)
        content[f"{FITRES}.num_examples"] = MetricRecord({"num_examples": weight})
        content[f"{FITRES}.metrics"] = ConfigRecord({})
        content[f"{FITRES}.status"] = ConfigRecord({"code": 0, "message": ""})
        return reply

    out = secaggplus_mod(msg, context, train_as_fitres)
    if keys:  # the masking stage: drop the emptied tensors, say which keys were summed
        content = out.content
        for name in [n for n in content if n.startswith(f"{FITRES}.") or n == records.ARRAYS]:
            del content[name]
        content[records.SECAGG_KEYS] = ConfigRecord({"keys": keys})
    return out
