"""The stages of a compression :class:`Pipeline` and their coding of a dict of tensors.

See :mod:`fedpeft.codecs.compression` for the stages, their order and what an update adds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedpeft.codecs.wire import (
    FORMAT,
    CodecError,
    bytes_of,
    concat_bytes,
    pack_int4,
    pack_payload,
    rows_of,
    rows_of_shape,
    unpack_int4,
    unpack_payload,
    varint_decode,
    varint_encode,
)

AdapterState = dict[str, torch.Tensor]

CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}
QUANTISERS = {"int8": 127, "int4": 7}  # largest integer level of each
STAGES = ("topk", *CASTS, *QUANTISERS)


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
            sections["raw"] = concat_bytes([bytes_of(v) for v in tensors.values()])
            return pack_payload(header, sections)
        flat = [v.detach().reshape(-1).float().cpu() for v in tensors.values()]
        rows = [rows_of(v) for v in tensors.values()]
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
        return pack_payload(header, sections)

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
        codes = q.numpy() if levels == 127 else pack_int4(q.numpy())
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
        header, sections = unpack_payload(blob)
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
        rows = [rows_of_shape(shape) for _, shape, _ in specs]
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
        codes = raw if self.quantiser == "int8" else unpack_int4(raw, n)
        scales = torch.from_numpy(sections["scales"].copy())
        return torch.from_numpy(codes.astype(np.float32)) * scales[groups]


def topk_count(fraction: float, numel: int) -> int:
    """Entries top-k keeps of ``numel``: ``ceil(fraction * numel)``, at least one.

    The product is rounded to 9 decimals first, so that 0.07 * 100 keeps 7, not 8.
    """
    return max(1, math.ceil(round(fraction * numel, 9))) if numel else 0
