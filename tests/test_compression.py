"""Tests of fedpeft.codecs.compression: exact numbers checked against independent formulas.

Every expected value here is computed in the test itself (numpy, plain Python, or torch
operations the codec's docstrings specify), never copied from a run of the codec.
"""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest
import torch

from fedpeft.codecs.compression import (
    CodecError,
    Pipeline,
    check_stages,
    decode_update,
    encode_update,
    seeded_generator,
    topk_count,
    varint_decode,
    varint_encode,
)
from fedpeft.config import ScenarioError, load_scenario

LEVELS = {"int8": 127, "int4": 7}


# ----------------------------------------------------------------------------- helpers


def _randn(seed: int, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _roundtrip(pipe: Pipeline, tensors: dict, generator=None) -> dict:
    decoded, _ = Pipeline.decode(pipe.encode(tensors, generator=generator))
    return decoded


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a_bytes = a.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    b_bytes = b.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return a_bytes == b_bytes


def _same_state(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(_same_bits(a[k], b[k]) for k in a)


def _wire(blob: np.ndarray) -> tuple[dict, dict[str, np.ndarray]]:
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


def _leb128(n: int) -> bytes:
    """Reference LEB128 (protobuf varint) of one non-negative integer."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _leb128_decode(data: bytes) -> list[int]:
    values, cur, shift = [], 0, 0
    for byte in data:
        cur |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            values.append(cur)
            cur, shift = 0, 0
    assert shift == 0
    return values


def _as_rows(x: np.ndarray) -> np.ndarray:
    """A tensor seen as a matrix: first dimension by the rest (1-D: one row)."""
    return x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)


def _distinct(seed: int, *shape: int) -> torch.Tensor:
    """Entries with distinct magnitudes (a permutation of 1..n, random signs, scaled)."""
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    mags = rng.permutation(n) + 1.0
    signs = rng.choice([-1.0, 1.0], size=n)
    return torch.from_numpy((mags * signs * 0.01).astype(np.float32)).reshape(shape)


# ------------------------------------------------------------------ 1. lossless pipeline

SHAPES = [(7,), (3, 5), (2, 3, 4), (), (1, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lossless_pipeline_round_trips_bit_exactly(dtype):
    tensors = {f"t{i}": _randn(i, *shape, dtype=dtype) * 3 for i, shape in enumerate(SHAPES)}
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-30])
    tensors["specials"] = specials.to(dtype)
    blob = Pipeline(()).encode(tensors, meta={"round": 3, "who": "x"})
    assert blob.dtype == np.uint8 and blob.ndim == 1
    decoded, meta = Pipeline.decode(blob)
    assert _same_state(decoded, tensors)
    assert meta == {"round": 3, "who": "x"}
    # bytes in, the same tensors out
    decoded_from_bytes, _ = Pipeline.decode(blob.tobytes())
    assert _same_state(decoded_from_bytes, tensors)


def test_lossless_pipeline_keeps_mixed_dtypes_and_order():
    tensors = {
        "z": _randn(0, 4, 3),
        "a": _randn(1, 5, dtype=torch.bfloat16),
        "m": _randn(2, 2, 2, dtype=torch.float16),
    }
    assert _same_state(_roundtrip(Pipeline(()), tensors), tensors)


# ------------------------------------------------------------- 2. int8 / int4 quantisation


@pytest.mark.parametrize("stage", ["int8", "int4"])
def test_per_tensor_quantisation_error_is_at_most_half_a_step(stage):
    levels = LEVELS[stage]
    tensors = {
        "a": _randn(0, 5, 7) * 4,
        "b": _randn(1, 11) * 0.01,
        "c": _randn(2, 2, 3, 4),
        "zero": torch.zeros(3, 2),
    }
    blob = Pipeline((stage,)).encode(tensors)
    decoded, _ = Pipeline.decode(blob)
    for key, x in tensors.items():
        got = decoded[key]
        assert got.shape == x.shape and got.dtype == x.dtype
        k = _on_the_grid(x.double().numpy(), got.double().numpy(), levels)
        if k is not None:
            assert np.abs(np.round(k)).max() == levels  # the largest entry hits the top level
    # one float32 scale per tensor; codes: 1 byte each (int8) or a nibble each (int4)
    header, sections = _wire(blob)
    assert header["stages"] == [stage] and header["granularity"] == "tensor"
    assert sections["scales"].dtype == np.float32 and len(sections["scales"]) == len(tensors)
    n = sum(x.numel() for x in tensors.values())
    assert sections["values"].nbytes == (n if stage == "int8" else (n + 1) // 2)
    expected_scales = [np.abs(x.numpy()).max() / np.float32(levels) for x in tensors.values()]
    expected_scales = [s if s > 0 else 1.0 for s in expected_scales]  # all-zero: any scale
    assert np.allclose(sections["scales"], expected_scales, rtol=1e-6)


def _on_the_grid(x: np.ndarray, got: np.ndarray, levels: int) -> np.ndarray | None:
    """Check a decoded block against its step ``max|x| / levels``; return its grid indices.

    All zero decodes to all zero. Otherwise every entry is within half a step, and every
    decoded value is a grid point ``k * step``.
    """
    step = np.abs(x).max() / levels
    if step == 0:
        assert np.array_equal(got, np.zeros_like(x))
        return None
    assert np.abs(got - x).max() <= step / 2 * (1 + 1e-5)
    k = got / step
    assert np.allclose(k, np.round(k), atol=1e-4)
    return k


@pytest.mark.parametrize("stage", ["int8", "int4"])
def test_per_row_quantisation_error_is_at_most_half_a_row_step(stage):
    levels = LEVELS[stage]
    # rows of very different magnitudes: a per-tensor step would be far too coarse for row 0
    a = _randn(0, 5, 7) * torch.tensor([1e-3, 1e-2, 1.0, 10.0, 0.0]).unsqueeze(1)
    tensors = {"a": a, "b": _randn(1, 3, 2, 4), "v": _randn(2, 6)}
    blob = Pipeline((stage,), granularity="row").encode(tensors)
    decoded, _ = Pipeline.decode(blob)
    for key, x in tensors.items():
        x_rows = _as_rows(x.double().numpy())
        got_rows = _as_rows(decoded[key].double().numpy())
        for x_row, got_row in zip(x_rows, got_rows, strict=True):
            _on_the_grid(x_row, got_row, levels)
    # row 0 of "a" is decoded far finer than a per-tensor step would allow
    tensor_step = a.abs().max().item() / levels
    row0_error = (decoded["a"][0] - a[0]).abs().max().item()
    assert row0_error < tensor_step / 1000
    # one scale per row: 5 + 3 + 1 rows
    header, sections = _wire(blob)
    assert header["granularity"] == "row"
    assert len(sections["scales"]) == 5 + 3 + 1
    expected = np.concatenate(
        [np.abs(_as_rows(x.numpy())).max(axis=1) / np.float32(levels) for x in tensors.values()]
    )
    expected[expected == 0] = 1.0
    assert np.allclose(sections["scales"], expected, rtol=1e-6)


def test_quantisation_keeps_the_original_dtype():
    tensors = {"h": _randn(0, 4, 4, dtype=torch.float16), "b": _randn(1, 9, dtype=torch.bfloat16)}
    decoded = _roundtrip(Pipeline(("int8",)), tensors)
    for key, x in tensors.items():
        assert decoded[key].dtype == x.dtype and decoded[key].shape == x.shape
        step = x.float().abs().max().item() / 127
        # half a step, plus the rounding of the decoded value back into the 16-bit dtype
        tol = step / 2 + x.float().abs().max().item() * 2**-7
        assert (decoded[key].float() - x.float()).abs().max().item() <= tol


# ------------------------------------------------------------------- 3. fp16 / bf16 casts


def test_fp16_and_bf16_casts_decode_to_the_cast_values_exactly():
    tensors = {
        "a": _randn(0, 6, 5) * 100,
        "b": _randn(1, 13) * 1e-3,
        "c": torch.tensor([1.0 + 2**-12, 65504.0, 1e-8, -3.14159265, 0.0]),
    }
    got16 = _roundtrip(Pipeline(("fp16",)), tensors)
    gotbf = _roundtrip(Pipeline(("bf16",)), tensors)
    for key, x in tensors.items():
        assert _same_bits(got16[key], x.half().float())
        assert _same_bits(gotbf[key], x.bfloat16().float())
    # and they really are lossy: 1 + 2**-12 is not representable in either
    assert got16["c"][0] != tensors["c"][0] and gotbf["c"][0] != tensors["c"][0]


# ----------------------------------------------------------------- 4. stochastic rounding


@pytest.mark.parametrize(("stage", "granularity"), [("int4", "tensor"), ("int8", "row")])
def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbouring_grid_point(stage, granularity):
    levels = LEVELS[stage]
    x = _randn(7, 3, 4)
    x[1] *= 0.05  # a small row: per-row steps differ from the per-tensor one
    pipe = Pipeline((stage,), granularity=granularity, stochastic_rounding=True)
    draws = 4000
    decodes = np.stack(
        [_roundtrip(pipe, {"x": x}, seeded_generator(i))["x"].numpy() for i in range(draws)]
    ).astype(np.float64)
    x64 = x.double().numpy()
    if granularity == "tensor":
        step = np.full_like(x64, np.abs(x64).max() / levels)
    else:
        step = np.broadcast_to(np.abs(x64).max(axis=1, keepdims=True) / levels, x64.shape)
    lo = np.floor(x64 / step) * step
    p = x64 / step - np.floor(x64 / step)  # chance of rounding up
    tol = 1e-5 * step
    on_lo = np.abs(decodes - lo) <= tol
    on_hi = np.abs(decodes - (lo + step)) <= tol
    assert (on_lo | on_hi).all()
    # unbiased: the mean of the draws is x within 5 standard errors
    standard_error = np.sqrt(p * (1 - p) / draws) * step
    assert (np.abs(decodes.mean(axis=0) - x64) <= 5 * standard_error + tol).all()
    # and genuinely random: entries far from the grid take both values
    mid = (p > 0.2) & (p < 0.8)
    assert mid.any()
    assert on_lo.any(axis=0)[mid].all() and on_hi.any(axis=0)[mid].all()


def test_stochastic_rounding_is_reproducible_from_the_generator_seed():
    pipe = Pipeline(("int8",), stochastic_rounding=True)
    x = {"x": _randn(0, 50)}
    first = pipe.encode(x, generator=seeded_generator(1, 2, 3))
    again = pipe.encode(x, generator=seeded_generator(1, 2, 3))
    other = pipe.encode(x, generator=seeded_generator(1, 2, 4))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_round_to_nearest_is_deterministic():
    pipe = Pipeline(("int4",))
    x = {"x": _randn(0, 8, 8)}
    expected = np.round(x["x"].double().numpy() / (x["x"].abs().max().item() / 7))
    got = _roundtrip(pipe, x)["x"].double().numpy() / (x["x"].abs().max().item() / 7)
    assert np.allclose(got, expected, atol=1e-4)


# ------------------------------------------------------------------------------- 5. top-k


def _top_indices(x: torch.Tensor, fraction: float) -> np.ndarray:
    flat = x.reshape(-1).numpy()
    k = max(1, math.ceil(fraction * flat.size))
    return np.sort(np.argsort(-np.abs(flat), kind="stable")[:k])


TOPK_SHAPES = {"a": (10, 10), "b": (37,), "c": (4, 5, 6), "d": (1,), "e": (3, 1)}


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0])
def test_topk_keeps_exactly_the_largest_entries(fraction):
    tensors = {k: _distinct(i, *shape) for i, (k, shape) in enumerate(TOPK_SHAPES.items())}
    blob = Pipeline(("topk",), topk_fraction=fraction, topk_scope="tensor").encode(tensors)
    decoded, _ = Pipeline.decode(blob)
    all_gaps = []
    for key, x in tensors.items():
        got = decoded[key].reshape(-1)
        flat = x.reshape(-1)
        expected_idx = _top_indices(x, fraction)
        assert np.array_equal(np.flatnonzero(got.numpy()), expected_idx)
        assert torch.equal(got[expected_idx], flat[expected_idx])  # values travel exactly
        dropped = np.setdiff1d(np.arange(flat.numel()), expected_idx)
        assert (got[dropped] == 0).all()
        all_gaps.extend(np.diff(expected_idx, prepend=-1) - 1)
    # positions travel as the varint-coded gaps between kept entries
    header, sections = _wire(blob)
    assert header["kept"] == [len(_top_indices(x, fraction)) for x in tensors.values()]
    assert _leb128_decode(sections["gaps"].tobytes()) == [int(g) for g in all_gaps]
    assert sections["gaps"].tobytes() == b"".join(_leb128(int(g)) for g in all_gaps)


@pytest.mark.parametrize(
    ("stage", "granularity"), [("int8", "tensor"), ("int4", "tensor"), ("int8", "row")]
)
def test_topk_then_quantise_keeps_the_same_positions_within_half_a_step(stage, granularity):
    levels = LEVELS[stage]
    fraction = 0.2
    tensors = {k: _distinct(i, *shape) for i, (k, shape) in enumerate(TOPK_SHAPES.items())}
    pipe = Pipeline(
        ("topk", stage), topk_fraction=fraction, granularity=granularity, topk_scope="tensor"
    )
    decoded = _roundtrip(pipe, tensors)
    for key, x in tensors.items():
        idx = _top_indices(x, fraction)
        got = decoded[key].double().numpy().reshape(-1)
        x64 = x.double().numpy().reshape(-1)
        assert (got[np.setdiff1d(np.arange(x64.size), idx)] == 0).all()
        if granularity == "tensor":
            step = np.full(x64.size, np.abs(x64[idx]).max() / levels)
        else:  # a row with a kept entry keeps its largest entry: row step = row max / levels
            rows = _as_rows(x.double().numpy())
            step = np.repeat(np.abs(rows).max(axis=1) / levels, rows.shape[1])
        assert (np.abs(got[idx] - x64[idx]) <= step[idx] / 2 * (1 + 1e-5)).all()
        if stage == "int8" and granularity == "tensor":
            # kept magnitudes are >= 80% of the max here, so none rounds to zero
            assert np.array_equal(np.flatnonzero(got), idx)


@pytest.mark.parametrize("fraction", [0.1, 0.3, 1.0])
def test_global_topk_keeps_exactly_the_largest_entries_of_the_whole_update(fraction):
    tensors = {
        k: _distinct(i, *shape) * (i + 1) for i, (k, shape) in enumerate(TOPK_SHAPES.items())
    }
    decoded = _roundtrip(Pipeline(("topk",), topk_fraction=fraction), tensors)
    everything = np.concatenate([x.reshape(-1).numpy() for x in tensors.values()])
    k = math.ceil(round(fraction * everything.size, 9))
    threshold = np.sort(np.abs(everything))[-k]  # magnitudes are distinct
    for key, x in tensors.items():
        flat, got = x.reshape(-1).numpy(), decoded[key].reshape(-1).numpy()
        keep = np.abs(flat) >= threshold
        assert np.array_equal(got[keep], flat[keep]) and (got[~keep] == 0).all()
    assert sum(int((v != 0).sum()) for v in decoded.values()) == k


def _kept_by_score(tensors: dict, scores: dict, fraction: float) -> dict[str, np.ndarray]:
    """Independent global top-k: which entries of each tensor have the k largest scores."""
    flat = np.concatenate([scores[k].reshape(-1).numpy() for k in tensors])
    k = math.ceil(round(fraction * flat.size, 9))
    threshold = np.sort(flat)[-k]  # scores are distinct
    return {key: scores[key].reshape(-1).numpy() >= threshold for key in tensors}


def test_gradient_ranked_topk_keeps_the_largest_change_times_gradient():
    """encode_update(gradient=g) keeps the entries of largest |change * g|, exactly: a set
    that differs from the largest changes, and whose values travel unchanged."""
    received = {k: torch.zeros(shape) for k, shape in TOPK_SHAPES.items()}  # changes stay exact
    change = {k: _randn(i, *shape) for i, (k, shape) in enumerate(TOPK_SHAPES.items())}
    gradient = {k: _randn(20 + i, *shape) for i, (k, shape) in enumerate(TOPK_SHAPES.items())}
    coded = encode_update(
        change, Pipeline(("topk",), topk_fraction=0.2), received, gradient=gradient
    )
    sent = {k: coded.decoded[k] - received[k] for k in received}
    wanted = _kept_by_score(change, {k: (change[k] * gradient[k]).abs() for k in change}, 0.2)
    by_magnitude = _kept_by_score(change, {k: change[k].abs() for k in change}, 0.2)
    assert any(not np.array_equal(wanted[k], by_magnitude[k]) for k in change)
    for key in change:
        got = sent[key].reshape(-1).numpy()
        assert np.array_equal(got != 0, wanted[key]), key
        assert np.array_equal(got[wanted[key]], change[key].reshape(-1).numpy()[wanted[key]])
    # error feedback's books: what travelled plus what was kept is the whole change
    for key in change:
        torch.testing.assert_close(sent[key] + coded.residual[key], change[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("broken", ["missing", "wrong-shape", "nan"])
def test_topk_ranks_by_magnitude_when_a_gradient_is_missing(broken):
    received = {k: torch.zeros(shape) for k, shape in TOPK_SHAPES.items()}
    change = {k: _randn(i, *shape) for i, (k, shape) in enumerate(TOPK_SHAPES.items())}
    gradient = {k: _randn(20 + i, *shape) for i, (k, shape) in enumerate(TOPK_SHAPES.items())}
    first = next(iter(gradient))
    if broken == "missing":
        del gradient[first]
    elif broken == "wrong-shape":
        gradient[first] = gradient[first].reshape(-1)[:-1]
    else:
        gradient[first] = gradient[first].clone().fill_(float("nan"))
    coded = encode_update(
        change, Pipeline(("topk",), topk_fraction=0.2), received, gradient=gradient
    )
    wanted = _kept_by_score(change, {k: change[k].abs() for k in change}, 0.2)
    for key in change:
        assert np.array_equal(coded.decoded[key].reshape(-1).numpy() != 0, wanted[key])


def test_topk_fraction_keeps_at_least_one_entry():
    x = {"x": _distinct(0, 3, 3)}
    got = _roundtrip(Pipeline(("topk",), topk_fraction=0.01, topk_scope="tensor"), x)["x"]
    got = got.reshape(-1)
    expected = int(np.argmax(np.abs(x["x"].reshape(-1).numpy())))
    assert np.flatnonzero(got.numpy()).tolist() == [expected]


# ------------------------------------------------------------------------------ 6. varint

VARINTS = [0, 1, 127, 128, 255, 300, 16383, 16384, 2**21 - 1, 2**21, 2**28, 2**35, 2**63 - 1]
VARINT_LENGTHS = [1, 1, 1, 2, 2, 2, 2, 3, 3, 4, 5, 6, 9]


def test_varint_round_trip_and_leb128_lengths():
    for value, length in zip(VARINTS, VARINT_LENGTHS, strict=True):
        encoded = varint_encode(np.array([value], dtype=np.uint64))
        assert encoded.dtype == np.uint8
        assert len(encoded) == length == max(1, math.ceil(value.bit_length() / 7))
        assert encoded.tobytes() == _leb128(value)
        assert varint_decode(encoded).tolist() == [value]
    stream = varint_encode(np.array(VARINTS, dtype=np.uint64))
    assert stream.tobytes() == b"".join(_leb128(v) for v in VARINTS)
    assert varint_decode(stream).tolist() == VARINTS
    assert varint_encode(np.array([300])).tobytes() == bytes([0xAC, 0x02])  # protobuf's example
    top = np.array([2**64 - 1], dtype=np.uint64)
    assert len(varint_encode(top)) == 10
    assert varint_decode(varint_encode(top)).tolist() == [2**64 - 1]


def test_varint_empty_negative_and_truncated():
    assert len(varint_encode(np.zeros(0, dtype=np.int64))) == 0
    assert len(varint_decode(np.zeros(0, dtype=np.uint8))) == 0
    with pytest.raises(CodecError):
        varint_encode(np.array([3, -1]))
    with pytest.raises(CodecError, match="truncated"):
        varint_decode(np.array([0x05, 0x80], dtype=np.uint8))


def test_varint_random_round_trip():
    rng = np.random.default_rng(0)
    values = (rng.integers(0, 2**62, size=500) >> rng.integers(0, 62, size=500)).astype(np.uint64)
    stream = varint_encode(values)
    assert stream.tobytes() == b"".join(_leb128(int(v)) for v in values)
    assert np.array_equal(varint_decode(stream), values)


# ---------------------------------------------------------------------- 7. error feedback

EF_SHAPES = {"a": (8, 16), "b": (16, 8), "c": (5,)}


@pytest.mark.parametrize("stages", [("topk", "int8"), ("int4",)])
@pytest.mark.parametrize("reference_kind", ["zeros", "fixed"])
def test_error_feedback_keeps_the_books(stages, reference_kind):
    pipe = Pipeline(stages, topk_fraction=0.1)
    if reference_kind == "zeros":
        reference = {k: torch.zeros(s) for k, s in EF_SHAPES.items()}
    else:
        reference = {k: _randn(100 + i, *s) for i, (k, s) in enumerate(EF_SHAPES.items())}
    total_u = {k: torch.zeros(s, dtype=torch.float64) for k, s in EF_SHAPES.items()}
    total_sent = {k: torch.zeros(s, dtype=torch.float64) for k, s in EF_SHAPES.items()}
    total_sent_no_feedback = {k: torch.zeros(s, dtype=torch.float64) for k, s in EF_SHAPES.items()}
    residual = None
    for t in range(6):
        u = {k: _randn(10 * t + i, *s) * 0.1 for i, (k, s) in enumerate(EF_SHAPES.items())}
        state = {k: reference[k] + u[k] for k in u}
        enc = encode_update(state, pipe, reference, residual, generator=seeded_generator(t))
        plain = encode_update(state, pipe, reference, generator=seeded_generator(t))
        for k in u:
            total_u[k] += u[k].double()
            total_sent[k] += (enc.decoded[k] - reference[k]).double()
            total_sent_no_feedback[k] += (plain.decoded[k] - reference[k]).double()
        assert set(enc.residual) == set(u)
        residual = enc.residual
    for k in EF_SHAPES:
        assert residual[k].abs().max() > 1e-3  # compression did drop something
        books = total_sent[k] + residual[k].double()
        assert torch.allclose(books, total_u[k], rtol=0, atol=1e-5)
    # without feedback, what was dropped is lost: the books do not balance
    lost = max((total_sent_no_feedback[k] - total_u[k]).abs().max().item() for k in EF_SHAPES)
    assert lost > 1e-3


def test_error_feedback_residual_is_exactly_change_minus_decoded_change():
    reference = {"w": _randn(0, 6, 6)}
    residual = {"w": _randn(1, 6, 6) * 0.01}
    state = {"w": reference["w"] + _randn(2, 6, 6) * 0.1}
    enc = encode_update(state, Pipeline(("int8",)), reference, residual)
    change = state["w"] - reference["w"] + residual["w"]
    decoded_change, _ = Pipeline.decode(enc.blob)
    assert torch.equal(enc.residual["w"], change - decoded_change["w"])
    assert _same_bits(enc.decoded["w"], reference["w"] + decoded_change["w"])


def test_residual_of_another_shape_is_dropped_and_lossless_has_no_residual():
    reference = {"w": _randn(0, 4, 4)}
    state = {"w": reference["w"] + _randn(1, 4, 4)}
    pipe = Pipeline(("int8",))
    with_bad_residual = encode_update(state, pipe, reference, {"w": torch.ones(2, 2)})
    without = encode_update(state, pipe, reference)
    assert np.array_equal(with_bad_residual.blob, without.blob)
    assert encode_update(state, Pipeline(()), reference, {"w": torch.ones(4, 4)}).residual == {}


# -------------------------------------------------------------- 8. updates with a reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lossless_update_against_a_reference_reconstructs_the_state_bit_exactly(dtype):
    reference = {k: _randn(i, *s, dtype=dtype) for i, (k, s) in enumerate(EF_SHAPES.items())}
    state = {k: (v.float() + _randn(50, *v.shape) * 0.01).to(dtype) for k, v in reference.items()}
    state["a"][0, 0] = float("nan")
    state["a"][0, 1] = -0.0
    state["c"] = reference["c"].clone()  # unchanged tensor: XOR is all zeros
    enc = encode_update(state, Pipeline(()), reference, meta={"round": 2})
    assert enc.residual == {}
    assert _same_state(enc.decoded, state)
    got, meta = decode_update(enc.blob, reference)
    assert _same_state(got, state)
    assert meta["round"] == 2 and meta["kinds"] == {k: "xor" for k in state}


@pytest.mark.parametrize(
    "pipe",
    [
        Pipeline(("topk", "int8"), topk_fraction=0.2),
        Pipeline(("int4",), granularity="row", stochastic_rounding=True),
        Pipeline(("bf16",)),
        Pipeline(("fp16",)),
        Pipeline(("topk",), topk_fraction=0.3),
        Pipeline(("topk", "int4"), granularity="row", stochastic_rounding=True),
    ],
    ids=["topk-int8", "int4-row-sr", "bf16", "fp16", "topk", "topk-int4-row-sr"],
)
def test_lossy_update_sender_and_receiver_agree_bit_for_bit(pipe):
    reference = {k: _randn(i, *s) for i, (k, s) in enumerate(EF_SHAPES.items())}
    reference["h"] = _randn(9, 4, 4, dtype=torch.bfloat16)
    state = {k: (v.float() + _randn(60, *v.shape) * 0.1).to(v.dtype) for k, v in reference.items()}
    residual = {k: _randn(70, *v.shape) * 0.01 for k, v in reference.items()}
    enc = encode_update(state, pipe, reference, residual, generator=seeded_generator(5))
    got, meta = decode_update(enc.blob, reference)
    assert _same_state(got, enc.decoded)
    assert meta["kinds"] == {k: "sub" for k in state}
    for k in state:
        assert got[k].dtype == reference[k].dtype


def test_tensor_of_another_shape_or_missing_from_the_reference_travels_whole():
    reference = {"a": _randn(0, 4, 8), "b": _randn(1, 3, 3)}
    state = {"a": _randn(2, 6, 8) * 2, "b": reference["b"] + 0.5, "new": _randn(3, 5)}
    lossless = encode_update(state, Pipeline(()), reference)
    got, meta = decode_update(lossless.blob, reference)
    assert meta["kinds"] == {"a": "abs", "b": "xor", "new": "abs"}
    assert _same_state(got, state)
    # under int8, the whole tensor is quantised on its own scale (not as a change)
    lossy = encode_update(state, Pipeline(("int8",)), reference)
    got, meta = decode_update(lossy.blob, reference)
    assert meta["kinds"] == {"a": "abs", "b": "sub", "new": "abs"}
    assert _same_state(got, lossy.decoded)
    for k in ("a", "new"):
        step = state[k].abs().max().item() / 127
        assert (got[k] - state[k]).abs().max().item() <= step / 2 * (1 + 1e-5)
    # "b" changed by a constant 0.5: int8 of a constant change is exact
    assert torch.allclose(got["b"], state["b"], rtol=0, atol=1e-6)
    # whole tensors decode without a reference; a change does not
    assert _same_state(
        decode_update(encode_update({"x": state["new"]}, Pipeline(())).blob)[0], {"x": state["new"]}
    )
    with pytest.raises(CodecError, match="reference"):
        decode_update(lossless.blob)


# ----------------------------------------------------------------- 9. downlink-delta exactness


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_downlink_delta_keeps_the_client_copy_exact(dtype):
    rng = torch.Generator().manual_seed(0)
    shapes = {"A": (4, 64), "B": (64, 4), "head": (3, 16)}
    globals_ = [{k: torch.randn(*s, generator=rng).to(dtype) for k, s in shapes.items()}]
    for t in range(4):
        prev = globals_[-1]
        nxt = {}
        for k, v in prev.items():
            mask = torch.rand(v.shape, generator=rng) < (0.5 if t < 3 else 0.01)
            nxt[k] = torch.where(mask, v + 0.01 * torch.randn(v.shape, generator=rng).to(dtype), v)
        globals_.append(nxt)
    held: dict | None = None  # the server's record of the client's copy
    client: dict = {}  # the client's copy
    sizes = []
    for g in globals_:
        enc = encode_update(g, Pipeline(()), reference=held)
        client, _ = decode_update(enc.blob, client)
        held = enc.decoded
        assert _same_state(client, g)
        assert _same_state(held, g)
        sizes.append(enc.blob.nbytes)
    # the last step changes 1% of the entries: its XOR delta deflates to far less than whole
    assert sizes[-1] < 0.3 * sizes[0]


def test_lossy_downlink_delta_keeps_server_and_client_in_sync():
    rng = torch.Generator().manual_seed(1)
    g = {"A": torch.randn(4, 32, generator=rng), "B": torch.randn(32, 4, generator=rng)}
    pipe = Pipeline(("int8",))
    held, client = None, {}
    for t in range(5):
        g = {k: v + 0.05 * torch.randn(v.shape, generator=rng) for k, v in g.items()}
        # int8 of the change since the client's copy: half a step of that change, per tensor
        steps = {k: (v - held[k] if held else v).abs().max().item() / 127 for k, v in g.items()}
        enc = encode_update(g, pipe, reference=held, generator=seeded_generator(t))
        client, _ = decode_update(enc.blob, client)
        held = enc.decoded
        assert _same_state(client, held)
        for k, v in g.items():
            assert (held[k] - v).abs().max().item() <= steps[k] / 2 * (1 + 1e-5) + 1e-6


# ------------------------------------------------------------------------ 10. refusals


def _one_line_codec_error(blob) -> str:
    with pytest.raises(CodecError) as info:
        Pipeline.decode(blob)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_malformed_payloads_raise_a_one_line_codec_error():
    rng = np.random.default_rng(0)
    good = Pipeline(("topk", "int8")).encode({"w": _randn(0, 20, 20)})
    for blob in [
        rng.integers(0, 256, size=200, dtype=np.uint8),
        good[: len(good) // 2],
        good[:-4],
        np.zeros(0, dtype=np.uint8),
        b"not a payload",
        np.frombuffer(zlib.compress(b"\x05\x00\x00\x00{}xyz"), dtype=np.uint8),  # bad JSON
        np.frombuffer(zlib.compress(b"\x02\x00\x00\x00{}"), dtype=np.uint8),  # no format
    ]:
        _one_line_codec_error(blob)
    wrong_format = b'{"format":99}'
    blob = zlib.compress(len(wrong_format).to_bytes(4, "little") + wrong_format)
    assert "format" in _one_line_codec_error(blob)
    with pytest.raises(CodecError):
        decode_update(good[:-4])


def _deflated(raw: bytes) -> np.ndarray:
    return np.frombuffer(zlib.compress(raw), dtype=np.uint8)


def _body_truncated() -> np.ndarray:
    good = Pipeline(("int8",)).encode({"w": _randn(0, 10, 10)})
    return _deflated(zlib.decompress(good.tobytes())[:-50])


@pytest.mark.parametrize(
    "make",
    [
        lambda: _deflated(b"\x03\x00\x00\x00[1]"),  # header is JSON but not an object
        lambda: _deflated(b'\x0c\x00\x00\x00{"format":1}'),  # header without sections
        _body_truncated,  # valid header, sections shorter than the header says
    ],
    ids=["json-list-header", "no-sections", "short-body"],
)
def test_inflatable_malformed_payloads_raise_codec_error(make):
    _one_line_codec_error(make())


def test_lossless_update_against_a_reference_of_another_dtype_travels_whole():
    reference = {"w": _randn(0, 4, 3)}  # float32
    state = {"w": _randn(1, 4, 3, dtype=torch.bfloat16)}
    enc = encode_update(state, Pipeline(()), reference)
    got, _ = decode_update(enc.blob, reference)
    assert torch.equal(got["w"].float(), state["w"].float())


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        (("fp8",), "unknown stage 'fp8'"),
        (("int8", "topk"), "topk must come first"),
        (("fp16", "int8"), "two value stages"),
        (("topk", "bf16", "int4"), "two value stages"),
        (("topk", "topk"), "twice"),
        (("int8", "int8"), "twice"),
    ],
)
def test_check_stages_refusals(stages, match):
    with pytest.raises(CodecError, match=match) as info:
        check_stages(stages, "compression.uplink")
    assert "\n" not in str(info.value)
    with pytest.raises(CodecError, match=match):
        Pipeline(stages)


def test_check_stages_accepts_valid_lists():
    for stages in [(), ("topk",), ("fp16",), ("bf16",), ("int8",), ("int4",), ("topk", "int4")]:
        assert check_stages(list(stages)) == stages


@pytest.mark.parametrize(
    "kwargs",
    [
        {"topk_fraction": 0.0},
        {"topk_fraction": 1.5},
        {"granularity": "column"},
        {"stochastic_rounding": True},
    ],
)
def test_pipeline_setting_refusals(kwargs):
    stages = ("fp16",) if kwargs.get("stochastic_rounding") else ("topk", "int8")
    with pytest.raises(CodecError):
        Pipeline(stages, **kwargs)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["compression.error_feedback=true"], "error_feedback"),
        (['compression.downlink=["topk", "int8"]'], "downlink_delta"),
        (
            ['compression.uplink=["fp16"]', "compression.stochastic_rounding=true"],
            "stochastic_rounding",
        ),
        (["compression.stochastic_rounding=true"], "stochastic_rounding"),
        (['compression.uplink=["int9"]'], "unknown stage 'int9'"),
        (['compression.downlink=["int8", "topk"]', "compression.downlink_delta=true"], "first"),
        (['compression.uplink=["topk"]', "compression.topk_fraction=0"], "topk_fraction"),
        (['compression.uplink=["int8"]', 'compression.quant_granularity="col"'], "granularity"),
    ],
)
def test_compression_config_refusals(overrides, match):
    with pytest.raises(ScenarioError, match=match) as info:
        load_scenario("smoke", overrides)
    assert "\n" not in str(info.value)


def test_compression_config_builds_the_pipelines():
    scenario = load_scenario(
        "smoke",
        [
            'compression.uplink=["topk", "int8"]',
            "compression.topk_fraction=0.05",
            "compression.error_feedback=true",
            'compression.downlink=["fp16"]',
            "compression.stochastic_rounding=true",
            'compression.quant_granularity="row"',
        ],
    )
    comp = scenario.compression
    assert comp.enabled
    assert comp.pipeline("uplink") == Pipeline(("topk", "int8"), 0.05, "row", True)
    assert comp.pipeline("downlink") == Pipeline(("fp16",), 0.05, "row", False)
    assert not load_scenario("smoke").compression.enabled


# ---------------------------------------------------------------- 11. compression is real


def test_topk_int8_shrinks_a_lora_like_update_at_least_15x():
    rng = torch.Generator().manual_seed(0)
    state = {}
    for layer in range(13):  # 13 (A, B) pairs of rank 4 on 808-wide modules: 84,032 entries
        state[f"l{layer}.A"] = torch.randn(4, 808, generator=rng)
        state[f"l{layer}.B"] = torch.randn(808, 4, generator=rng)
    assert len(state) == 26
    numel = sum(v.numel() for v in state.values())
    assert numel == 84_032
    float_bytes = 4 * numel
    assert float_bytes / Pipeline(("topk", "int8")).encode(state).nbytes >= 15
    assert float_bytes / Pipeline(("int8",)).encode(state).nbytes >= 3.5
    assert float_bytes / Pipeline(("int4",)).encode(state).nbytes >= 7
    assert float_bytes / Pipeline(("fp16",)).encode(state).nbytes >= 1.9
    # lossless random floats barely compress, but do not grow beyond the header
    assert Pipeline(()).encode(state).nbytes <= float_bytes * 1.01


def test_topk_count_is_the_ceiling_of_the_exact_fraction():
    from fedpeft.codecs.compression import topk_count

    assert [topk_count(0.07, n) for n in (100, 200, 1000)] == [7, 14, 70]
    assert [topk_count(0.1, n) for n in (0, 1, 9, 10, 11)] == [0, 1, 1, 1, 2]


def test_a_tensor_that_travels_whole_skips_topk():
    reference = {"a": torch.randn(8, 16)}
    state = {"a": reference["a"] + 0.01 * torch.randn(8, 16), "b": torch.randn(4, 32)}
    enc = encode_update(state, Pipeline(("topk", "int8")), reference)
    got, meta = decode_update(enc.blob, reference)
    assert meta["kinds"] == {"a": "sub", "b": "abs"}
    step = state["b"].abs().max().item() / 127
    assert (got["b"] - state["b"]).abs().max().item() <= step / 2 * 1.0001
    change = (got["a"] - reference["a"]) != 0
    assert int(change.sum()) == topk_count(0.1, 128)  # the change is still sparsified


def test_a_change_that_does_not_fit_its_reference_is_a_codec_error():
    reference = {"w": torch.randn(4)}
    wide = Pipeline(()).encode({"w": torch.zeros(4, 1)}, {"kinds": {"w": "sub"}})
    with pytest.raises(CodecError, match="does not fit"):
        decode_update(wide, reference)
    wrong_width = Pipeline(()).encode(
        {"w": torch.zeros(4, dtype=torch.int64)}, {"kinds": {"w": "xor"}}
    )
    with pytest.raises(CodecError, match="does not fit"):
        decode_update(wrong_width, reference)
    for kinds in ([], {"w": "rot13"}):
        bad = Pipeline(()).encode({"w": torch.zeros(4)}, {"kinds": kinds})
        with pytest.raises(CodecError, match="kinds"):
            decode_update(bad, reference)


def test_a_non_finite_update_does_not_poison_the_residual():
    state = {"w": torch.tensor([1.0, float("nan"), 2.0, 3.0])}
    enc = encode_update(state, Pipeline(("int8",)), residual={"w": torch.ones(4)})
    assert torch.equal(enc.residual["w"], torch.zeros(4))


def test_empty_and_zero_size_inputs_round_trip():
    for stages in [(), ("topk",), ("topk", "int8"), ("int4",)]:
        empty = Pipeline(stages).encode({})
        assert Pipeline.decode(empty)[0] == {}
        out, _ = Pipeline.decode(Pipeline(stages).encode({"z": torch.zeros(0, 3)}))
        assert out["z"].shape == (0, 3)


def test_a_payload_that_inflates_past_the_limit_is_refused(monkeypatch):
    import fedpeft.codecs.compression as compression

    blob = Pipeline(()).encode({"w": torch.zeros(1000)})
    monkeypatch.setattr(compression, "MAX_PAYLOAD_BYTES", 512)
    with pytest.raises(CodecError, match="inflates past 512"):
        Pipeline.decode(blob)
