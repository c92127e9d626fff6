"""Adapter tensors <-> Flower ArrayRecord, and the byte counts of what really travels."""

from __future__ import annotations

import json
from io import BytesIO

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


#: parsed ``.npy`` headers (the header's bytes -> shape, Fortran order, dtype); a round's
#: replies repeat the same few, so each is parsed once
_HEADERS: dict[bytes, tuple[tuple[int, ...], bool, np.dtype]] = {}
_MAX_HEADERS = 4096


def array_values(array: Array) -> np.ndarray:
    """The values of a Flower ``Array``, read-only, without copying its bytes.

    ``Array.numpy()`` runs ``np.load`` on a copy of the bytes and parses the ``.npy`` header
    with ``ast`` every time: 70 ms per 7B-shaped reply. This parses each distinct header
    once (pickled object arrays refused, as ``np.load(allow_pickle=False)`` does) and views
    the data where it lies.
    """
    if array.stype != "numpy.ndarray":
        raise TypeError(f"unsupported serialization type for numpy conversion: '{array.stype}'")
    data = array.data
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("the array's bytes are not in the .npy format")
    width = 2 if data[6] == 1 else 4  # format 1.0: 2-byte header length; 2.0 and 3.0: 4
    start = 8 + width + int.from_bytes(data[8 : 8 + width], "little")
    header = bytes(data[:start])
    parsed = _HEADERS.get(header)
    if parsed is None:
        stream = BytesIO(header)
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else None
        parsed = (read or np.lib.format.read_array_header_2_0)(stream)
        if parsed[2].hasobject:
            raise ValueError("the array holds Python objects, which are never unpickled")
        if len(_HEADERS) >= _MAX_HEADERS:
            _HEADERS.clear()
        _HEADERS[header] = parsed
    shape, fortran, dtype = parsed
    count = int(np.prod(shape, dtype=np.int64))
    values = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    return values.reshape(shape, order="F" if fortran else "C")


def arrayrecord_to_state(record: ArrayRecord) -> AdapterState:
    """Unpack an ArrayRecord into CPU tensors (each a fresh, writable copy)."""
    return {k: torch.from_numpy(array_values(arr).copy()) for k, arr in record.items()}


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
