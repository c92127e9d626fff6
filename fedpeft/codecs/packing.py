"""One Array per ArrayRecord on a deployment's wire: an exact, reversible repacking.

Flower 1.42 moves a message as a tree of objects, and every ``Array`` is an object of its
own (two, with its chunk), pushed and pulled with one HTTP request each, two at a time on
a 2-core machine. A MiniLM LoRA adapter is 26 arrays: 55 requests per message, four
times a round (server to SuperLink, SuperLink to node, and back), which cost a deployed
round seconds more than its training (benchmarks/RESULTS.md, deploy latency).

:func:`pack` replaces each ArrayRecord of two or more arrays with one ``Array`` that holds
their bytes end to end, and lists what it holds (keys, dtypes, shapes, serialization
types and sizes) in a ConfigRecord beside it; :func:`unpack` restores the same records,
byte for byte, in the same order. The server packs at the bottom of its Grid stack
(:class:`fedpeft.server.grid.PackingGrid`) and each node's outermost ClientApp mod
(:mod:`fedpeft.clients.packing`) unpacks what arrives and packs its reply, so every layer
in between, and the byte counts, see the records exactly as in simulation.
"""

from __future__ import annotations

import json

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

PACKED_STYPE = "fedpeft.packed"  # the one Array of a packed ArrayRecord
PACKED_KEY = "packed"
INDEX_PREFIX = "fedpeft.packed-index."  # + the record's name: the ConfigRecord listing it


class PackingError(ValueError):
    """A packed record that does not unpack: its index disagrees with its bytes."""


def is_packed(content: RecordDict) -> bool:
    """Whether ``content`` holds a record that :func:`pack` packed."""
    return any(name.startswith(INDEX_PREFIX) for name in content.config_records)


#: a packing's memo: id of an ArrayRecord -> (its packed record, its index)
Memo = dict[int, tuple[ArrayRecord, ConfigRecord]]


def pack(content: RecordDict, memo: Memo | None = None) -> RecordDict:
    """``content`` with each ArrayRecord of two or more arrays as one Array (and its index).

    The other records are the same objects, in the same order. Give the messages of one
    exchange one ``memo``: a record they share (the global adapter, sent to every node)
    is then packed once and shared, not copied once per node. The records must outlive
    the memo (their ids are its keys).
    """
    if is_packed(content):
        raise PackingError(f"the content already holds a record named {INDEX_PREFIX}*")
    memo = {} if memo is None else memo
    out = RecordDict()
    for name, record in content.items():
        if not isinstance(record, ArrayRecord) or len(record) < 2:
            out[name] = record
            continue
        if id(record) not in memo:
            memo[id(record)] = _packed(record)
        out[name], out[INDEX_PREFIX + name] = memo[id(record)]
    return out


def _packed(record: ArrayRecord) -> tuple[ArrayRecord, ConfigRecord]:
    """``record``'s arrays end to end in one Array, and the index that splits them again."""
    arrays = list(record.values())
    packed = Array(
        dtype="uint8",
        shape=(sum(len(a.data) for a in arrays),),
        stype=PACKED_STYPE,
        data=b"".join(a.data for a in arrays),
    )
    index = ConfigRecord(
        {
            "keys": list(record.keys()),
            "dtypes": [a.dtype for a in arrays],
            "stypes": [a.stype for a in arrays],
            "shapes": json.dumps([list(a.shape) for a in arrays]),
            "sizes": [len(a.data) for a in arrays],
        }
    )
    return ArrayRecord({PACKED_KEY: packed}), index


def unpack(content: RecordDict) -> RecordDict:
    """The records :func:`pack` was given, byte for byte and in order.

    Raises :class:`PackingError` (one line) when an index disagrees with its record.
    """
    out = RecordDict()
    for name, record in content.items():
        if name.startswith(INDEX_PREFIX):
            if name.removeprefix(INDEX_PREFIX) not in content.array_records:
                raise PackingError(f"packed index {name!r} has no record beside it")
            continue
        index = content.config_records.get(INDEX_PREFIX + name)
        if index is None or not isinstance(record, ArrayRecord):
            out[name] = record
            continue
        out[name] = _unpacked(name, record, index)
    return out


def _listed(index: ConfigRecord, column: str) -> list:
    """``index[column]``, which must be a list."""
    values = index[column]
    if not isinstance(values, list):
        raise TypeError(f"{column} is not a list")
    return values


def _unpacked(name: str, record: ArrayRecord, index: ConfigRecord) -> ArrayRecord:
    """Record ``name`` split back into its arrays along ``index``."""
    try:
        keys, dtypes, stypes, sizes = (
            _listed(index, c) for c in ("keys", "dtypes", "stypes", "sizes")
        )
        shapes = json.loads(str(index["shapes"]))
        sizes = [int(s) for s in sizes]
        packed = record[PACKED_KEY]
    except (KeyError, TypeError, ValueError) as exc:
        raise PackingError(f"packed record {name!r} has a malformed index ({exc})") from None
    columns = {len(keys), len(set(keys)), len(dtypes), len(stypes), len(shapes), len(sizes)}
    data = packed.data
    if (
        packed.stype != PACKED_STYPE
        or len(record) != 1
        or len(columns) != 1
        or min(sizes, default=0) < 0
        or sum(sizes) != len(data)
    ):
        raise PackingError(
            f"packed record {name!r}: its index lists {len(sizes)} arrays of {sum(sizes)} "
            f"bytes, its data holds {len(data)}"
        )
    arrays, start = {}, 0
    for key, dtype, stype, shape, size in zip(keys, dtypes, stypes, shapes, sizes, strict=True):
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise PackingError(f"packed record {name!r}: array {key!r} has shape {shape!r}")
        arrays[str(key)] = Array(
            dtype=str(dtype), shape=tuple(shape), stype=str(stype), data=data[start : start + size]
        )
        start += size
    return ArrayRecord(arrays)
