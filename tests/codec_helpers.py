"""Shared helpers of the codec tests: seeded tensors, bitwise equality, a payload reader.

Each is an independent formula (numpy, plain Python), never a call into the codec's own
helpers, so that the tests check the codec against the format its docstrings specify.
"""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import torch

from fedpeft.codecs.compression import Pipeline

LEVELS = {"int8": 127, "int4": 7}


def randn(seed: int, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def roundtrip(pipe: Pipeline, tensors: dict, generator=None) -> dict:
    decoded, _ = Pipeline.decode(pipe.encode(tensors, generator=generator))
    return decoded


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a_bytes = a.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    b_bytes = b.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return a_bytes == b_bytes


def same_state(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(same_bits(a[k], b[k]) for k in a)


def wire(blob: np.ndarray) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a payload by the documented format: deflate(len32 + JSON header + sections)."""
    raw = zlib.decompress(bytes(np.asarray(blob, dtype=np.uint8)))
    n = int.from_bytes(raw[:4], "little")
    header = json.loads(raw[4 : 4 + n])
    sections, offset = {}, 4 + n
    for name, dtype, nbytes in header["sections"]:
        sections[name] = np.frombuffer(raw[offset : offset + nbytes], dtype=np.dtype(dtype))
        offset += nbytes
    assert offset == len(raw)
    return header, sections


def leb128(n: int) -> bytes:
    """Reference LEB128 (protobuf varint) of one non-negative integer."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def leb128_decode(data: bytes) -> list[int]:
    values, cur, shift = [], 0, 0
    for byte in data:
        cur |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            values.append(cur)
            cur, shift = 0, 0
    assert shift == 0
    return values


def as_rows(x: np.ndarray) -> np.ndarray:
    """A tensor seen as a matrix: first dimension by the rest (1-D: one row)."""
    return x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)


def distinct(seed: int, *shape: int) -> torch.Tensor:
    """Entries with distinct magnitudes (a permutation of 1..n, random signs, scaled)."""
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    mags = rng.permutation(n) + 1.0
    signs = rng.choice([-1.0, 1.0], size=n)
    return torch.from_numpy((mags * signs * 0.01).astype(np.float32)).reshape(shape)
