"""The wire format of a compressed payload: packing, varints, int4 nibbles, raw bytes.

A payload is a small JSON header (keys, shapes, stage settings, section sizes) followed by
the bytes of its sections, deflated (zlib, lossless) into one ``uint8`` array; see
:mod:`fedpeft.codecs.compression` for the stages that fill the sections.
"""

from __future__ import annotations

import json
import math
import zlib
from typing import Any

import numpy as np
import torch

FORMAT = 1
MAX_PAYLOAD_BYTES = 2**31  # inflated size a payload may claim (a 7B model's LoRA is ~40 MB)


class CodecError(ValueError):
    """A malformed pipeline or payload; the message is one line meant for the user."""


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a float tensor as an integer tensor of the same width."""
    t = t.detach().cpu().contiguous()
    width = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t if not t.is_floating_point() else t.view(width)


def bytes_of(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a tensor, flattened, as a ``uint8`` array."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)


def concat_bytes(parts: list[np.ndarray]) -> np.ndarray:
    """``uint8`` arrays joined end to end (an empty array for none)."""
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def rows_of(t: torch.Tensor) -> tuple[int, int]:
    """(rows, columns) of a tensor seen as a matrix; see :func:`rows_of_shape`."""
    return rows_of_shape(tuple(t.shape))


def rows_of_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of a tensor seen as a matrix: first dimension by the rest."""
    n = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 and shape[0] else 1
    return rows, n // rows if rows else 0


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Two int4 codes (-7..7) per byte, low nibble first; an odd tail is padded."""
    u = (q.astype(np.int16) + 8).astype(np.uint8)  # -7..7 -> 1..15
    if len(u) % 2:
        u = np.append(u, np.uint8(8))
    return u[0::2] | (u[1::2] << 4)


def unpack_int4(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`: the first ``n`` codes as int16."""
    u = np.empty(2 * len(packed), np.uint8)
    u[0::2], u[1::2] = packed & 0x0F, packed >> 4
    return u[:n].astype(np.int16) - 8


def varint_encode(values: np.ndarray) -> np.ndarray:
    """LEB128: 7 bits per byte, low bits first, high bit set on all but the last byte."""
    v = np.asarray(values, dtype=np.uint64)
    if (np.asarray(values) < 0).any():
        raise CodecError("varint_encode takes non-negative integers")
    nbytes = np.ones(len(v), dtype=np.int64)
    rest = v >> np.uint64(7)
    while rest.any():
        nbytes += rest > 0
        rest >>= np.uint64(7)
    out = np.empty(int(nbytes.sum()), np.uint8)
    starts = np.cumsum(nbytes) - nbytes
    for j in range(int(nbytes.max()) if len(v) else 0):
        sel = nbytes > j
        low = (v[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (nbytes[sel] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + j] = (low | more).astype(np.uint8)
    return out


def varint_decode(data: np.ndarray) -> np.ndarray:
    """Inverse of :func:`varint_encode`."""
    data = np.asarray(data, dtype=np.uint8)
    ends = np.flatnonzero(data < 0x80)
    if len(data) and (not len(ends) or ends[-1] != len(data) - 1):
        raise CodecError("truncated varint stream")
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if len(ends) else ends
    lengths = ends - starts + 1
    out = np.zeros(len(ends), np.uint64)
    for j in range(int(lengths.max()) if len(ends) else 0):
        sel = lengths > j
        out[sel] |= (data[starts[sel] + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
    return out


def pack_payload(header: dict[str, Any], sections: dict[str, np.ndarray]) -> np.ndarray:
    """Header JSON + section bytes, deflated into one uint8 array."""
    header = {**header, "sections": [[name, a.dtype.str, a.nbytes] for name, a in sections.items()]}
    head = json.dumps(header, separators=(",", ":")).encode()
    body = b"".join(np.ascontiguousarray(a).tobytes() for a in sections.values())
    raw = len(head).to_bytes(4, "little") + head + body
    return np.frombuffer(zlib.compress(raw, 9), dtype=np.uint8).copy()


def unpack_payload(blob: np.ndarray | bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Inverse of :func:`pack_payload`: the header and its sections, checked and bounded."""
    data = blob if isinstance(blob, bytes) else bytes(np.asarray(blob, dtype=np.uint8))
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(data, MAX_PAYLOAD_BYTES)
        if inflater.unconsumed_tail:
            raise CodecError(f"compressed payload inflates past {MAX_PAYLOAD_BYTES} bytes")
        if not inflater.eof:
            raise CodecError("compressed payload is cut short")
        n = int.from_bytes(raw[:4], "little")
        header = json.loads(raw[4 : 4 + n])
    except (zlib.error, ValueError, UnicodeDecodeError) as exc:
        raise CodecError(f"not a fedpeft compressed payload ({exc})") from None
    if header.get("format") != FORMAT:
        raise CodecError(f"payload format {header.get('format')!r}; this fedpeft reads {FORMAT}")
    sections, offset = {}, 4 + n
    for name, dtype, nbytes in header["sections"]:
        sections[name] = np.frombuffer(raw[offset : offset + nbytes], dtype=np.dtype(dtype))
        offset += nbytes
    return header, sections
