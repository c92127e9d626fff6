"""Adapter tensors <-> Flower ArrayRecord, and the byte counts of what really travels."""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.supercore.constant import HEAD_BODY_DIVIDER, HEAD_VALUE_DIVIDER
from flwr.supercore.inflatable.inflatable_object import (
    InflatableObject,
    get_all_nested_objects,
)

from fedpeft import records
from fedpeft.adapters import AdapterState

PAYLOAD = "payload"  # the one Array of a coded ArrayRecord


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy (and so .npy) has no bfloat16
        t = t.float()
    return t.numpy()


def state_to_arrayrecord(state: AdapterState) -> ArrayRecord:
    """Pack adapter tensors into an ArrayRecord, keeping key order."""
    return ArrayRecord({k: Array(np.ascontiguousarray(_to_numpy(v))) for k, v in state.items()})


def arrayrecord_to_state(record: ArrayRecord) -> AdapterState:
    """Unpack an ArrayRecord into CPU tensors."""
    return {k: torch.from_numpy(np.array(arr.numpy(), copy=True)) for k, arr in record.items()}


def message_state(message: Message) -> AdapterState:
    """The adapter tensors a message carries (``records.ARRAYS``); empty when it has none."""
    record = message.content.array_records.get(records.ARRAYS)
    return arrayrecord_to_state(record) if record is not None else {}


def coded_record(blob: np.ndarray) -> ArrayRecord:
    """Wrap a coded payload (one uint8 array, see :mod:`fedpeft.codecs.compression`)."""
    return ArrayRecord({PAYLOAD: Array(blob)})


def blob_of(record: ArrayRecord) -> np.ndarray:
    """The coded payload inside a record made by :func:`coded_record`."""
    return record[PAYLOAD].numpy()


def payload_nbytes(obj: InflatableObject) -> int:
    """Bytes of ``obj`` as Flower serializes it for the wire (itself and all its children)."""
    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())


def tensors_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Wire size of ``tensors`` as one ArrayRecord, built one array at a time (bounded memory).

    Equals ``payload_nbytes(state_to_arrayrecord(tensors))`` without holding every array
    at once; used for the full-fine-tuning baseline of a large model.
    """
    seen: set[str] = set()
    total = 0
    refs: dict[str, str] = {}
    for name, t in tensors.items():
        arr = Array(np.ascontiguousarray(_to_numpy(t)))
        for object_id, obj in get_all_nested_objects(arr).items():
            if object_id not in seen:  # Flower sends an identical chunk only once
                seen.add(object_id)
                total += len(obj.deflate())
        refs[name] = arr.object_id
    body = json.dumps(refs).encode("utf-8")
    children = ",".join(dict.fromkeys(refs.values()))  # unique Array ids, in order
    header = f"ArrayRecord{HEAD_VALUE_DIVIDER}{children}{HEAD_VALUE_DIVIDER}{len(body)}"
    return total + len(header.encode("utf-8")) + len(HEAD_BODY_DIVIDER) + len(body)
