"""Compression of adapter updates: a pipeline of stages, one payload, error feedback.

A :class:`Pipeline` turns a dict of tensors into one ``uint8`` array and back. Its stages
run in this order, each optional:

1. ``topk``: keep the ``ceil(topk_fraction * numel)`` entries of largest score, of the
   whole update or per tensor. The score is ``|x|``, or ``|x| * w`` with per-entry
   ``weights`` (the client's mean gradient, which makes it the entry's first-order effect
   on the loss). Only the kept positions and values travel: positions as the gaps between
   consecutive kept entries, varint-coded (LEB128, as protobuf writes integers).
2. One value stage: ``fp16`` or ``bf16`` (a cast), or ``int8`` / ``int4`` (symmetric
   quantisation with a float32 scale per tensor or per row, ``max|x| / 127`` or ``/ 7``;
   round to nearest, or stochastic rounding ``floor(x / s + u)``, ``u ~ U[0, 1)``, which is
   unbiased because the max-abs scale never clips).

Every payload is then packed with a small JSON header (keys, shapes, stage settings) into
one array and deflated (zlib, lossless). Flower adds about 300 bytes per array of an
ArrayRecord, so one array instead of one per tensor matters for small compressed updates.

:func:`encode_update` adds what makes a pipeline a communication scheme: the update is
coded relative to a *reference* both sides hold (the global adapter the client received,
or the adapter the server last sent that client), and with error feedback the part that
compression dropped is kept and added to the next update. The sender decodes its own
payload with the receiver's code, so both sides reconstruct bit-identical tensors.

The stages are coded in :mod:`fedpeft.codecs.pipeline` and the payload format is
:mod:`fedpeft.codecs.wire`; this module re-exports their public names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedpeft.codecs.pipeline import (
    CASTS,
    QUANTISERS,
    STAGES,
    Pipeline,
    check_stages,
    topk_count,
)
from fedpeft.codecs.wire import (
    FORMAT,
    MAX_PAYLOAD_BYTES,
    CodecError,
    bits_of,
    bytes_of,
    varint_decode,
    varint_encode,
)

__all__ = [
    "CASTS",
    "DOWNLINK",
    "FORMAT",
    "MAX_PAYLOAD_BYTES",
    "QUANTISERS",
    "STAGES",
    "UPLINK",
    "CodecError",
    "Encoded",
    "Pipeline",
    "apply_changes",
    "check_stages",
    "decode_update",
    "encode_update",
    "seeded_generator",
    "state_digest",
    "topk_count",
    "varint_decode",
    "varint_encode",
]

AdapterState = dict[str, torch.Tensor]

UPLINK, DOWNLINK = 0, 1  # stream ids that seed stochastic rounding apart per direction


@dataclass
class Encoded:
    """One coded update: what travels, what the receiver rebuilds, what was dropped."""

    blob: np.ndarray  # uint8: the payload
    decoded: AdapterState  # the receiver's reconstruction, bit for bit
    residual: AdapterState  # (update + old residual) - decoded change; empty when lossless


def encode_update(
    state: Mapping[str, torch.Tensor],
    pipeline: Pipeline,
    reference: Mapping[str, torch.Tensor] | None = None,
    residual: Mapping[str, torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    gradient: Mapping[str, torch.Tensor] | None = None,
) -> Encoded:
    """Code ``state`` as a change from ``reference``, plus the error-feedback ``residual``.

    A tensor of ``state`` whose key, shape and dtype the reference has travels as a change:
    ``state - reference`` under lossy stages, the XOR of the float bit patterns when the
    pipeline is lossless (exactly invertible, and mostly zero bits where little changed,
    which deflate removes). Other tensors travel whole, and skip ``topk``. A residual of
    the wrong shape (a client whose rank changed) is dropped, and so is a non-finite one
    (an update that held NaN must not poison every later round).

    With ``gradient`` (the sender's mean gradient over its local steps, per key), ``topk``
    keeps the entries of largest ``|change * gradient|``: the largest first-order change of
    the sender's loss, rather than the largest moves. Under AdamW, which moves almost every
    coordinate by about ``lr`` per step, magnitude says little about which moves matter.
    If any change that top-k may cut lacks a finite gradient of its shape, every entry is
    ranked by magnitude.
    """
    reference = reference or {}
    residual = residual or {}
    kinds: dict[str, str] = {}
    changes: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        ref = reference.get(key)
        if ref is not None and ref.shape == value.shape and ref.dtype == value.dtype:
            if pipeline.lossless:
                kinds[key] = "xor"
                changes[key] = bits_of(value) ^ bits_of(ref)
                continue
            kinds[key] = "sub"
            change = value.detach().float() - ref.float()
        else:
            kinds[key] = "abs"
            change = value.detach() if pipeline.lossless else value.detach().float()
        res = residual.get(key)
        if res is not None and res.shape == change.shape and not pipeline.lossless:
            change = change + res.float()
        changes[key] = change
    whole = frozenset(k for k, kind in kinds.items() if kind == "abs")
    weights = _gradient_weights(changes, whole, gradient) if pipeline.sparse else None
    blob = pipeline.encode(
        changes, {**(meta or {}), "kinds": kinds}, generator, dense=whole, weights=weights
    )
    decoded_changes, _ = Pipeline.decode(blob)
    decoded = apply_changes(decoded_changes, kinds, reference)
    dropped = {}
    if not pipeline.lossless:
        for key, change in changes.items():
            left = change - decoded_changes[key].float()
            dropped[key] = left if torch.isfinite(left).all() else torch.zeros_like(left)
    return Encoded(blob, decoded, dropped)


def _gradient_weights(
    changes: Mapping[str, torch.Tensor],
    whole: frozenset[str],
    gradient: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor] | None:
    """``|gradient|`` per change top-k may cut; ``None`` (rank by magnitude) if any lacks one."""
    if not gradient:
        return None
    weights = {}
    for key, change in changes.items():
        g = gradient.get(key)
        if key in whole:
            weights[key] = torch.ones(())  # kept whole anyway: any weight will do
        elif g is None or g.shape != change.shape or not torch.isfinite(g).all():
            return None
        else:
            weights[key] = g.detach().float().abs()
    return {k: w.expand(changes[k].shape) for k, w in weights.items()}


def decode_update(
    blob: np.ndarray | bytes, reference: Mapping[str, torch.Tensor] | None = None
) -> tuple[AdapterState, dict[str, Any]]:
    """Rebuild the sender's tensors from a payload and the shared ``reference``.

    A payload that names its reference by hash (a downlink delta) is refused unless this
    side's reference has that hash.
    """
    changes, meta = Pipeline.decode(blob)
    wanted = meta.get("reference") if isinstance(meta, dict) else None
    if wanted is not None and (not reference or state_digest(reference) != wanted):
        raise CodecError(
            "the payload is a change from an adapter copy this side does not hold "
            f"(reference {wanted}); the sender sends the whole adapter next time"
        )
    kinds = meta.get("kinds", {}) if isinstance(meta, dict) else None
    if not isinstance(kinds, dict) or not set(kinds.values()) <= {"abs", "sub", "xor"}:
        raise CodecError("malformed compressed payload (its 'kinds' are not abs/sub/xor per key)")
    missing = [k for k, kind in kinds.items() if kind != "abs" and k not in (reference or {})]
    if missing:
        raise CodecError(f"payload is a change from a reference this side lacks ({missing[0]})")
    return apply_changes(changes, kinds, reference or {}), meta


def apply_changes(
    changes: Mapping[str, torch.Tensor],
    kinds: Mapping[str, str],
    reference: Mapping[str, torch.Tensor],
) -> AdapterState:
    """``reference + change`` (or XOR, or the change itself) per key, in the reference's dtype."""
    out = {}
    for key, change in changes.items():
        kind = kinds.get(key, "abs")
        if kind == "abs":
            out[key] = change
            continue
        ref = reference[key]
        fits = change.shape == ref.shape and (
            kind == "sub"
            or (not change.is_floating_point() and change.element_size() == ref.element_size())
        )
        if not fits:
            raise CodecError(
                f"the change of {key} ({tuple(change.shape)}, {change.dtype}) does not fit "
                f"its reference ({tuple(ref.shape)}, {ref.dtype})"
            )
        if kind == "xor":
            out[key] = (bits_of(ref) ^ change).view(ref.dtype)
        else:
            out[key] = (ref.float() + change.float()).to(ref.dtype)
    return out


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A short hash of tensors (keys, shapes, bytes): names a downlink reference."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}{tuple(t.shape)}{t.dtype}".encode())
        h.update(bytes_of(t).tobytes())
    return h.hexdigest()[:16]


def seeded_generator(*parts: int) -> torch.Generator:
    """A torch generator seeded from integers (run seed, round, client) for stochastic rounding."""
    seed = int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(seed)
