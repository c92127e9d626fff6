"""The client's side of local differential privacy, as a Flower mod around every handler.

With ``privacy.dp = "local"``, :func:`local_dp_mod` clips the update a training reply
carries (its change from the adapter the client received) and adds Gaussian noise before
the reply leaves; the maths is in :mod:`fedpeft.privacy`.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedpeft import records
from fedpeft.codecs import message_state, state_to_arrayrecord
from fedpeft.config import Scenario
from fedpeft.privacy import add_noise, clip_update, noise_generator


def local_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """``dp = "local"``: clip this client's update and add its Gaussian noise before sending."""
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    config = msg.content.config_records.get(records.CONFIG)
    if config is None or records.SCENARIO not in config:
        return reply
    scenario = Scenario.from_json(str(config[records.SCENARIO]))
    privacy = scenario.privacy
    if privacy.dp != "local" or records.ARRAYS not in reply.content.array_records:
        return reply
    clipped, _ = clip_update(message_state(reply), message_state(msg), privacy.clipping_norm)
    noisy = add_noise(clipped, privacy.noise_multiplier * privacy.clipping_norm, noise_generator())
    reply.content[records.ARRAYS] = state_to_arrayrecord(noisy)
    return reply
