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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

AdapterState = dict[str, torch.Tensor]

CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}
QUANTISERS = {"int8": 127, "int4": 7}  # largest integer level of each
STAGES = ("topk", *CASTS, *QUANTISERS)
FORMAT = 1
MAX_PAYLOAD_BYTES = 2**31  # inflated size a payload may claim (a 7B model's LoRA is ~40 MB)
UPLINK, DOWNLINK = 0, 1  # stream ids that seed stochastic rounding apart per direction


class CodecError(ValueError):
    """A malformed pipeline or payload; the message is one line meant for the user."""


def check_stages(stages: Sequence[str], key: str = "compression") -> tuple[str, ...]:
    """Validate a stage list: known names, ``topk`` first, at most one value stage."""
    stages = tuple(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise CodecError(
            f"unknown stage {unknown[0]!r} in {key}; accepted: {', '.join(STAGES)} "
            '(e.g. ["topk", "int8"])'
        )
    if len(set(stages)) != len(stages):
        raise CodecError(f"{key} lists a stage twice: {list(stages)}")
    values = [s for s in stages if s != "topk"]
    if len(values) > 1:
        raise CodecError(f"{key} has two value stages {values}; pick one of fp16, bf16, int8, int4")
    if "topk" in stages and stages[0] != "topk":
        raise CodecError(f"{key}: topk must come first (sparsify, then code the values)")
    return stages


@dataclass(frozen=True)
class Pipeline:
    """A validated list of stages and their settings; see the module docstring."""

    stages: tuple[str, ...] = ()
    topk_fraction: float = 0.1
    granularity: str = "tensor"  # int8/int4 scales: "tensor" or "row"
    stochastic_rounding: bool = False
    topk_scope: str = "global"  # one threshold over the whole update, or top-k per tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", check_stages(self.stages))
        if not 0 < self.topk_fraction <= 1:
            raise CodecError(f"topk_fraction must be in (0, 1], got {self.topk_fraction}")
        if self.granularity not in ("tensor", "row"):
            raise CodecError(
                f"scale granularity must be 'tensor' or 'row', not {self.granularity!r}"
            )
        if self.stochastic_rounding and self.quantiser is None:
            raise CodecError("stochastic_rounding needs an int8 or int4 stage")
        if self.topk_scope not in ("tensor", "global"):
            raise CodecError(f"topk scope must be 'tensor' or 'global', not {self.topk_scope!r}")

    @property
    def sparse(self) -> bool:
        """Whether the ``topk`` stage runs."""
        return "topk" in self.stages

    @property
    def quantiser(self) -> str | None:
        """``int8``, ``int4`` or ``None``."""
        return next((s for s in self.stages if s in QUANTISERS), None)

    @property
    def cast(self) -> str | None:
        """``fp16``, ``bf16`` or ``None``."""
        return next((s for s in self.stages if s in CASTS), None)

    @property
    def lossless(self) -> bool:
        """True when no stage drops information (only packing and deflate run)."""
        return not self.stages

    def without_topk(self) -> Pipeline:
        """The same pipeline minus ``topk`` (for sending a whole adapter, not a change)."""
        return dataclasses.replace(self, stages=tuple(s for s in self.stages if s != "topk"))

    # ------------------------------------------------------------------ encode / decode
    def encode(
        self,
        tensors: Mapping[str, torch.Tensor],
        meta: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
        dense: frozenset[str] = frozenset(),
        weights: Mapping[str, torch.Tensor] | None = None,
    ) -> np.ndarray:
        """Code ``tensors`` (and a JSON-able ``meta``) into one ``uint8`` array.

        Tensors named in ``dense`` keep every entry under ``topk`` (their gaps are all
        zero, which deflate removes): top-k suits a change, not a whole tensor. With
        ``weights`` (one non-negative tensor per key, of its shape), ``topk`` ranks entries
        by ``|x| * weight`` instead of ``|x|``. The payload lists the kept positions
        either way, so the receiver needs no weights.
        """
        header: dict[str, Any] = {
            "format": FORMAT,
            "stages": list(self.stages),
            "granularity": self.granularity,
            "tensors": [
                [k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in tensors.items()
            ],
            "meta": meta or {},
        }
        sections: dict[str, np.ndarray] = {}
        if self.lossless:  # raw bytes of each tensor, any dtype
            sections["raw"] = _concat_bytes([_bytes_of(v) for v in tensors.values()])
            return _pack(header, sections)
        flat = [v.detach().reshape(-1).float().cpu() for v in tensors.values()]
        rows = [_rows(v) for v in tensors.values()]
        if self.sparse:
            kept_idx, values, groups = [], [], []
            scores = (
                flat
                if weights is None
                else [
                    x * weights[k].detach().reshape(-1).float().cpu()
                    for k, x in zip(tensors, flat, strict=True)
                ]
            )
            chosen = self._topk(list(tensors), scores, dense)
            for t, (x, idx, (_, cols)) in enumerate(zip(flat, chosen, rows, strict=True)):
                kept_idx.append(idx)
                values.append(x[idx])
                groups.append(self._groups(t, idx, cols, rows))
            header["kept"] = [len(i) for i in kept_idx]
            gaps = [torch.diff(i, prepend=torch.tensor([-1])) - 1 for i in kept_idx]
            sections["gaps"] = varint_encode(torch.cat(gaps).numpy() if gaps else np.zeros(0))
            value_vec = torch.cat(values) if values else torch.zeros(0)
            group_vec = torch.cat(groups) if groups else torch.zeros(0, dtype=torch.long)
        else:
            value_vec = torch.cat(flat) if flat else torch.zeros(0)
            group_vec = (
                torch.cat(
                    [
                        self._groups(t, torch.arange(x.numel()), cols, rows)
                        for t, (x, (_, cols)) in enumerate(zip(flat, rows, strict=True))
                    ]
                )
                if flat
                else torch.zeros(0, dtype=torch.long)
            )
        num_groups = len(rows) if self.granularity == "tensor" else sum(r for r, _ in rows)
        sections.update(self._code_values(value_vec, group_vec, num_groups, generator))
        return _pack(header, sections)

    def _topk(
        self, keys: list[str], flat: list[torch.Tensor], dense: frozenset[str]
    ) -> list[torch.Tensor]:
        """Sorted indices of the largest ``|flat|`` (the scores): per tensor, or globally."""
        if self.topk_scope == "tensor":
            return [
                torch.arange(x.numel())
                if key in dense
                else torch.topk(x.abs(), topk_count(self.topk_fraction, x.numel()), sorted=False)
                .indices.sort()
                .values
                for key, x in zip(keys, flat, strict=True)
            ]
        pool = [i for i, key in enumerate(keys) if key not in dense and flat[i].numel()]
        chosen = {i: torch.arange(flat[i].numel()) for i in range(len(keys)) if i not in pool}
        if pool:
            magnitudes = torch.cat([flat[i].abs() for i in pool])
            k = topk_count(self.topk_fraction, magnitudes.numel())
            picked = torch.zeros(magnitudes.numel(), dtype=torch.bool)
            picked[torch.topk(magnitudes, k, sorted=False).indices] = True
            for i, part in zip(
                pool, torch.split(picked, [flat[i].numel() for i in pool]), strict=True
            ):
                chosen[i] = torch.nonzero(part).reshape(-1)
        return [chosen[i] for i in range(len(keys))]

    def _groups(
        self, t: int, idx: torch.Tensor, cols: int, rows: list[tuple[int, int]]
    ) -> torch.Tensor:
        """Scale group of each entry: its tensor, or its row across all tensors."""
        if self.granularity == "tensor":
            return torch.full_like(idx, t)
        row_offset = sum(r for r, _ in rows[:t])
        return row_offset + torch.div(idx, max(cols, 1), rounding_mode="floor")

    def _code_values(
        self,
        values: torch.Tensor,
        groups: torch.Tensor,
        num_groups: int,
        generator: torch.Generator | None,
    ) -> dict[str, np.ndarray]:
        if self.cast == "fp16":
            return {"values": values.half().numpy()}
        if self.cast == "bf16":  # numpy has no bfloat16: ship the 16-bit patterns
            return {"values": values.bfloat16().view(torch.int16).numpy().view(np.uint16)}
        if self.quantiser is None:
            return {"values": values.numpy()}
        levels = QUANTISERS[self.quantiser]
        scales = (
            torch.zeros(num_groups).scatter_reduce(
                0, groups, values.abs(), reduce="amax", include_self=True
            )
            / levels
        )
        scales[scales == 0] = 1.0  # an all-zero group codes as zeros with any scale
        y = values / scales[groups]
        if self.stochastic_rounding:
            q = torch.floor(y + torch.rand(y.shape, generator=generator))
        else:
            q = torch.round(y)
        q = q.clamp(-levels, levels).to(torch.int8)
        codes = q.numpy() if levels == 127 else _pack_int4(q.numpy())
        return {"values": codes, "scales": scales.numpy()}

    @staticmethod
    def decode(blob: np.ndarray | bytes) -> tuple[AdapterState, dict[str, Any]]:
        """Inverse of :meth:`encode`: the tensors (original dtypes and shapes) and ``meta``.

        Anything that is not a well-formed payload raises :class:`CodecError`, whatever
        is wrong with it: a payload comes from another machine and may be hostile.
        """
        try:
            return Pipeline._decode(blob)
        except CodecError:
            raise
        except (KeyError, IndexError, TypeError, AttributeError, ValueError, RuntimeError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise CodecError(f"malformed compressed payload ({reason})") from None

    @staticmethod
    def _decode(blob: np.ndarray | bytes) -> tuple[AdapterState, dict[str, Any]]:
        header, sections = _unpack(blob)
        stages = check_stages(header["stages"], "payload")
        specs = [(k, tuple(shape), getattr(torch, dtype)) for k, shape, dtype in header["tensors"]]
        sizes = [math.prod(shape) for _, shape, _ in specs]
        if not stages:
            out, offset = {}, 0
            raw = sections["raw"]
            for key, shape, dtype in specs:
                n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                if n == 0:
                    out[key] = torch.empty(shape, dtype=dtype)
                    continue
                chunk = np.array(raw[offset : offset + n], copy=True)
                if chunk.nbytes != n:
                    raise CodecError(f"malformed compressed payload ({key} is cut short)")
                out[key] = torch.frombuffer(bytearray(chunk.tobytes()), dtype=dtype).reshape(shape)
                offset += n
            return out, header["meta"]
        pipe = Pipeline(tuple(stages), granularity=header["granularity"])
        rows = [_rows_of_shape(shape) for _, shape, _ in specs]
        if pipe.sparse:
            counts = header["kept"]
            gaps = torch.from_numpy(varint_decode(sections["gaps"]).astype(np.int64))
            idx_parts = []
            for g in torch.split(gaps, counts):
                idx_parts.append(torch.cumsum(g + 1, 0) - 1)
            groups = (
                torch.cat(
                    [
                        pipe._groups(t, i, cols, rows)
                        for t, (i, (_, cols)) in enumerate(zip(idx_parts, rows, strict=True))
                    ]
                )
                if idx_parts
                else torch.zeros(0, dtype=torch.long)
            )
            n_values = sum(counts)
        else:
            groups = (
                torch.cat(
                    [
                        pipe._groups(t, torch.arange(n), cols, rows)
                        for t, (n, (_, cols)) in enumerate(zip(sizes, rows, strict=True))
                    ]
                )
                if sizes
                else torch.zeros(0, dtype=torch.long)
            )
            n_values = sum(sizes)
        values = pipe._decode_values(sections, groups, n_values)
        out = {}
        offset = 0
        for t, (key, shape, dtype) in enumerate(specs):
            if pipe.sparse:
                k = header["kept"][t]
                dense = torch.zeros(sizes[t])
                dense[idx_parts[t]] = values[offset : offset + k]
                offset += k
            else:
                dense = values[offset : offset + sizes[t]]
                offset += sizes[t]
            out[key] = dense.reshape(shape).to(dtype)
        return out, header["meta"]

    def _decode_values(
        self, sections: dict[str, np.ndarray], groups: torch.Tensor, n: int
    ) -> torch.Tensor:
        raw = sections["values"]
        if self.cast == "fp16":
            return torch.from_numpy(raw.copy()).float()
        if self.cast == "bf16":
            return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).float()
        if self.quantiser is None:
            return torch.from_numpy(raw.copy())
        codes = raw if self.quantiser == "int8" else _unpack_int4(raw, n)
        scales = torch.from_numpy(sections["scales"].copy())
        return torch.from_numpy(codes.astype(np.float32)) * scales[groups]


# ---------------------------------------------------------------------- updates


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
                changes[key] = _bits(value) ^ _bits(ref)
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
            out[key] = (_bits(ref) ^ change).view(ref.dtype)
        else:
            out[key] = (ref.float() + change.float()).to(ref.dtype)
    return out


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A short hash of tensors (keys, shapes, bytes): names a downlink reference."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}{tuple(t.shape)}{t.dtype}".encode())
        h.update(_bytes_of(t).tobytes())
    return h.hexdigest()[:16]


def seeded_generator(*parts: int) -> torch.Generator:
    """A torch generator seeded from integers (run seed, round, client) for stochastic rounding."""
    seed = int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------- helpers


def topk_count(fraction: float, numel: int) -> int:
    """Entries top-k keeps of ``numel``: ``ceil(fraction * numel)``, at least one.

    The product is rounded to 9 decimals first, so that 0.07 * 100 keeps 7, not 8.
    """
    return max(1, math.ceil(round(fraction * numel, 9))) if numel else 0


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a float tensor as an integer tensor of the same width."""
    t = t.detach().cpu().contiguous()
    width = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t if not t.is_floating_point() else t.view(width)


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)


def _concat_bytes(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def _rows(t: torch.Tensor) -> tuple[int, int]:
    return _rows_of_shape(tuple(t.shape))


def _rows_of_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of a tensor seen as a matrix: first dimension by the rest."""
    n = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 and shape[0] else 1
    return rows, n // rows if rows else 0


def _pack_int4(q: np.ndarray) -> np.ndarray:
    u = (q.astype(np.int16) + 8).astype(np.uint8)  # -7..7 -> 1..15
    if len(u) % 2:
        u = np.append(u, np.uint8(8))
    return u[0::2] | (u[1::2] << 4)


def _unpack_int4(packed: np.ndarray, n: int) -> np.ndarray:
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


def _pack(header: dict[str, Any], sections: dict[str, np.ndarray]) -> np.ndarray:
    """Header JSON + section bytes, deflated into one uint8 array."""
    header = {**header, "sections": [[name, a.dtype.str, a.nbytes] for name, a in sections.items()]}
    head = json.dumps(header, separators=(",", ":")).encode()
    body = b"".join(np.ascontiguousarray(a).tobytes() for a in sections.values())
    raw = len(head).to_bytes(4, "little") + head + body
    return np.frombuffer(zlib.compress(raw, 9), dtype=np.uint8).copy()


def _unpack(blob: np.ndarray | bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
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
