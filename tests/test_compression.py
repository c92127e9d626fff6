"""Tests of the compression stages: lossless packing, quantisation, casts, top-k, varints.

Every expected value here is computed in the test itself (numpy, plain Python, or torch
operations the codec's docstrings specify), never copied from a run of the codec.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from codec_helpers import (
    LEVELS,
    as_rows,
    distinct,
    leb128,
    leb128_decode,
    randn,
    roundtrip,
    same_bits,
    same_state,
    wire,
)

from fedpeft.codecs.compression import (
    CodecError,
    Pipeline,
    encode_update,
    seeded_generator,
    varint_decode,
    varint_encode,
)

# ------------------------------------------------------------------ 1. lossless pipeline

SHAPES = [(7,), (3, 5), (2, 3, 4), (), (1, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lossless_pipeline_round_trips_bit_exactly(dtype):
    tensors = {f"t{i}": randn(i, *shape, dtype=dtype) * 3 for i, shape in enumerate(SHAPES)}
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-30])
    tensors["specials"] = specials.to(dtype)
    blob = Pipeline(()).encode(tensors, meta={"round": 3, "who": "x"})
    assert blob.dtype == np.uint8 and blob.ndim == 1
    decoded, meta = Pipeline.decode(blob)
    assert same_state(decoded, tensors)
    assert meta == {"round": 3, "who": "x"}
    # bytes in, the same tensors out
    decoded_from_bytes, _ = Pipeline.decode(blob.tobytes())
    assert same_state(decoded_from_bytes, tensors)


def test_lossless_pipeline_keeps_mixed_dtypes_and_order():
    tensors = {
        "z": randn(0, 4, 3),
        "a": randn(1, 5, dtype=torch.bfloat16),
        "m": randn(2, 2, 2, dtype=torch.float16),
    }
    assert same_state(roundtrip(Pipeline(()), tensors), tensors)


# ------------------------------------------------------------- 2. int8 / int4 quantisation


@pytest.mark.parametrize("stage", ["int8", "int4"])
def test_per_tensor_quantisation_error_is_at_most_half_a_step(stage):
    levels = LEVELS[stage]
    tensors = {
        "a": randn(0, 5, 7) * 4,
        "b": randn(1, 11) * 0.01,
        "c": randn(2, 2, 3, 4),
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
    header, sections = wire(blob)
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
    a = randn(0, 5, 7) * torch.tensor([1e-3, 1e-2, 1.0, 10.0, 0.0]).unsqueeze(1)
    tensors = {"a": a, "b": randn(1, 3, 2, 4), "v": randn(2, 6)}
    blob = Pipeline((stage,), granularity="row").encode(tensors)
    decoded, _ = Pipeline.decode(blob)
    for key, x in tensors.items():
        x_rows = as_rows(x.double().numpy())
        got_rows = as_rows(decoded[key].double().numpy())
        for x_row, got_row in zip(x_rows, got_rows, strict=True):
            _on_the_grid(x_row, got_row, levels)
    # row 0 of "a" is decoded far finer than a per-tensor step would allow
    tensor_step = a.abs().max().item() / levels
    row0_error = (decoded["a"][0] - a[0]).abs().max().item()
    assert row0_error < tensor_step / 1000
    # one scale per row: 5 + 3 + 1 rows
    header, sections = wire(blob)
    assert header["granularity"] == "row"
    assert len(sections["scales"]) == 5 + 3 + 1
    expected = np.concatenate(
        [np.abs(as_rows(x.numpy())).max(axis=1) / np.float32(levels) for x in tensors.values()]
    )
    expected[expected == 0] = 1.0
    assert np.allclose(sections["scales"], expected, rtol=1e-6)


def test_quantisation_keeps_the_original_dtype():
    tensors = {"h": randn(0, 4, 4, dtype=torch.float16), "b": randn(1, 9, dtype=torch.bfloat16)}
    decoded = roundtrip(Pipeline(("int8",)), tensors)
    for key, x in tensors.items():
        assert decoded[key].dtype == x.dtype and decoded[key].shape == x.shape
        step = x.float().abs().max().item() / 127
        # half a step, plus the rounding of the decoded value back into the 16-bit dtype
        tol = step / 2 + x.float().abs().max().item() * 2**-7
        assert (decoded[key].float() - x.float()).abs().max().item() <= tol


# ------------------------------------------------------------------- 3. fp16 / bf16 casts


def test_fp16_and_bf16_casts_decode_to_the_cast_values_exactly():
    tensors = {
        "a": randn(0, 6, 5) * 100,
        "b": randn(1, 13) * 1e-3,
        "c": torch.tensor([1.0 + 2**-12, 65504.0, 1e-8, -3.14159265, 0.0]),
    }
    got16 = roundtrip(Pipeline(("fp16",)), tensors)
    gotbf = roundtrip(Pipeline(("bf16",)), tensors)
    for key, x in tensors.items():
        assert same_bits(got16[key], x.half().float())
        assert same_bits(gotbf[key], x.bfloat16().float())
    # and they really are lossy: 1 + 2**-12 is not representable in either
    assert got16["c"][0] != tensors["c"][0] and gotbf["c"][0] != tensors["c"][0]


# ----------------------------------------------------------------- 4. stochastic rounding


@pytest.mark.parametrize(("stage", "granularity"), [("int4", "tensor"), ("int8", "row")])
def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbouring_grid_point(stage, granularity):
    levels = LEVELS[stage]
    x = randn(7, 3, 4)
    x[1] *= 0.05  # a small row: per-row steps differ from the per-tensor one
    pipe = Pipeline((stage,), granularity=granularity, stochastic_rounding=True)
    draws = 4000
    decodes = np.stack(
        [roundtrip(pipe, {"x": x}, seeded_generator(i))["x"].numpy() for i in range(draws)]
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
    x = {"x": randn(0, 50)}
    first = pipe.encode(x, generator=seeded_generator(1, 2, 3))
    again = pipe.encode(x, generator=seeded_generator(1, 2, 3))
    other = pipe.encode(x, generator=seeded_generator(1, 2, 4))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_round_to_nearest_is_deterministic():
    pipe = Pipeline(("int4",))
    x = {"x": randn(0, 8, 8)}
    expected = np.round(x["x"].double().numpy() / (x["x"].abs().max().item() / 7))
    got = roundtrip(pipe, x)["x"].double().numpy() / (x["x"].abs().max().item() / 7)
    assert np.allclose(got, expected, atol=1e-4)


# ------------------------------------------------------------------------------- 5. top-k


def _top_indices(x: torch.Tensor, fraction: float) -> np.ndarray:
    flat = x.reshape(-1).numpy()
    k = max(1, math.ceil(fraction * flat.size))
    return np.sort(np.argsort(-np.abs(flat), kind="stable")[:k])


TOPK_SHAPES = {"a": (10, 10), "b": (37,), "c": (4, 5, 6), "d": (1,), "e": (3, 1)}


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0])
def test_topk_keeps_exactly_the_largest_entries(fraction):
    tensors = {k: distinct(i, *shape) for i, (k, shape) in enumerate(TOPK_SHAPES.items())}
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
    header, sections = wire(blob)
    assert header["kept"] == [len(_top_indices(x, fraction)) for x in tensors.values()]
    assert leb128_decode(sections["gaps"].tobytes()) == [int(g) for g in all_gaps]
    assert sections["gaps"].tobytes() == b"".join(leb128(int(g)) for g in all_gaps)


@pytest.mark.parametrize(
    ("stage", "granularity"), [("int8", "tensor"), ("int4", "tensor"), ("int8", "row")]
)
def test_topk_then_quantise_keeps_the_same_positions_within_half_a_step(stage, granularity):
    levels = LEVELS[stage]
    fraction = 0.2
    tensors = {k: distinct(i, *shape) for i, (k, shape) in enumerate(TOPK_SHAPES.items())}
    pipe = Pipeline(
        ("topk", stage), topk_fraction=fraction, granularity=granularity, topk_scope="tensor"
    )
    decoded = roundtrip(pipe, tensors)
    for key, x in tensors.items():
        idx = _top_indices(x, fraction)
        got = decoded[key].double().numpy().reshape(-1)
        x64 = x.double().numpy().reshape(-1)
        assert (got[np.setdiff1d(np.arange(x64.size), idx)] == 0).all()
        if granularity == "tensor":
            step = np.full(x64.size, np.abs(x64[idx]).max() / levels)
        else:  # a row with a kept entry keeps its largest entry: row step = row max / levels
            rows = as_rows(x.double().numpy())
            step = np.repeat(np.abs(rows).max(axis=1) / levels, rows.shape[1])
        assert (np.abs(got[idx] - x64[idx]) <= step[idx] / 2 * (1 + 1e-5)).all()
        if stage == "int8" and granularity == "tensor":
            # kept magnitudes are >= 80% of the max here, so none rounds to zero
            assert np.array_equal(np.flatnonzero(got), idx)


@pytest.mark.parametrize("fraction", [0.1, 0.3, 1.0])
def test_global_topk_keeps_exactly_the_largest_entries_of_the_whole_update(fraction):
    tensors = {k: distinct(i, *shape) * (i + 1) for i, (k, shape) in enumerate(TOPK_SHAPES.items())}
    decoded = roundtrip(Pipeline(("topk",), topk_fraction=fraction), tensors)
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
    change = {k: randn(i, *shape) for i, (k, shape) in enumerate(TOPK_SHAPES.items())}
    gradient = {k: randn(20 + i, *shape) for i, (k, shape) in enumerate(TOPK_SHAPES.items())}
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
    change = {k: randn(i, *shape) for i, (k, shape) in enumerate(TOPK_SHAPES.items())}
    gradient = {k: randn(20 + i, *shape) for i, (k, shape) in enumerate(TOPK_SHAPES.items())}
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
    x = {"x": distinct(0, 3, 3)}
    got = roundtrip(Pipeline(("topk",), topk_fraction=0.01, topk_scope="tensor"), x)["x"]
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
        assert encoded.tobytes() == leb128(value)
        assert varint_decode(encoded).tolist() == [value]
    stream = varint_encode(np.array(VARINTS, dtype=np.uint64))
    assert stream.tobytes() == b"".join(leb128(v) for v in VARINTS)
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
    assert stream.tobytes() == b"".join(leb128(int(v)) for v in values)
    assert np.array_equal(varint_decode(stream), values)
