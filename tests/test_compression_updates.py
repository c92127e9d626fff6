"""Tests of compressed updates: error feedback, references, downlink deltas, refusals.

Every expected value here is computed in the test itself (numpy, plain Python, or torch
operations the codec's docstrings specify), never copied from a run of the codec.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from codec_helpers import randn, same_bits, same_state

from fedpeft.codecs.compression import (
    CodecError,
    Pipeline,
    check_stages,
    decode_update,
    encode_update,
    seeded_generator,
    topk_count,
)
from fedpeft.config import ScenarioError, load_scenario

# ---------------------------------------------------------------------- 7. error feedback

EF_SHAPES = {"a": (8, 16), "b": (16, 8), "c": (5,)}


@pytest.mark.parametrize("stages", [("topk", "int8"), ("int4",)])
@pytest.mark.parametrize("reference_kind", ["zeros", "fixed"])
def test_error_feedback_keeps_the_books(stages, reference_kind):
    pipe = Pipeline(stages, topk_fraction=0.1)
    if reference_kind == "zeros":
        reference = {k: torch.zeros(s) for k, s in EF_SHAPES.items()}
    else:
        reference = {k: randn(100 + i, *s) for i, (k, s) in enumerate(EF_SHAPES.items())}
    total_u = {k: torch.zeros(s, dtype=torch.float64) for k, s in EF_SHAPES.items()}
    total_sent = {k: torch.zeros(s, dtype=torch.float64) for k, s in EF_SHAPES.items()}
    total_sent_no_feedback = {k: torch.zeros(s, dtype=torch.float64) for k, s in EF_SHAPES.items()}
    residual = None
    for t in range(6):
        u = {k: randn(10 * t + i, *s) * 0.1 for i, (k, s) in enumerate(EF_SHAPES.items())}
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
    reference = {"w": randn(0, 6, 6)}
    residual = {"w": randn(1, 6, 6) * 0.01}
    state = {"w": reference["w"] + randn(2, 6, 6) * 0.1}
    enc = encode_update(state, Pipeline(("int8",)), reference, residual)
    change = state["w"] - reference["w"] + residual["w"]
    decoded_change, _ = Pipeline.decode(enc.blob)
    assert torch.equal(enc.residual["w"], change - decoded_change["w"])
    assert same_bits(enc.decoded["w"], reference["w"] + decoded_change["w"])


def test_residual_of_another_shape_is_dropped_and_lossless_has_no_residual():
    reference = {"w": randn(0, 4, 4)}
    state = {"w": reference["w"] + randn(1, 4, 4)}
    pipe = Pipeline(("int8",))
    with_bad_residual = encode_update(state, pipe, reference, {"w": torch.ones(2, 2)})
    without = encode_update(state, pipe, reference)
    assert np.array_equal(with_bad_residual.blob, without.blob)
    assert encode_update(state, Pipeline(()), reference, {"w": torch.ones(4, 4)}).residual == {}


# -------------------------------------------------------------- 8. updates with a reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lossless_update_against_a_reference_reconstructs_the_state_bit_exactly(dtype):
    reference = {k: randn(i, *s, dtype=dtype) for i, (k, s) in enumerate(EF_SHAPES.items())}
    state = {k: (v.float() + randn(50, *v.shape) * 0.01).to(dtype) for k, v in reference.items()}
    state["a"][0, 0] = float("nan")
    state["a"][0, 1] = -0.0
    state["c"] = reference["c"].clone()  # unchanged tensor: XOR is all zeros
    enc = encode_update(state, Pipeline(()), reference, meta={"round": 2})
    assert enc.residual == {}
    assert same_state(enc.decoded, state)
    got, meta = decode_update(enc.blob, reference)
    assert same_state(got, state)
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
    reference = {k: randn(i, *s) for i, (k, s) in enumerate(EF_SHAPES.items())}
    reference["h"] = randn(9, 4, 4, dtype=torch.bfloat16)
    state = {k: (v.float() + randn(60, *v.shape) * 0.1).to(v.dtype) for k, v in reference.items()}
    residual = {k: randn(70, *v.shape) * 0.01 for k, v in reference.items()}
    enc = encode_update(state, pipe, reference, residual, generator=seeded_generator(5))
    got, meta = decode_update(enc.blob, reference)
    assert same_state(got, enc.decoded)
    assert meta["kinds"] == {k: "sub" for k in state}
    for k in state:
        assert got[k].dtype == reference[k].dtype


def test_tensor_of_another_shape_or_missing_from_the_reference_travels_whole():
    reference = {"a": randn(0, 4, 8), "b": randn(1, 3, 3)}
    state = {"a": randn(2, 6, 8) * 2, "b": reference["b"] + 0.5, "new": randn(3, 5)}
    lossless = encode_update(state, Pipeline(()), reference)
    got, meta = decode_update(lossless.blob, reference)
    assert meta["kinds"] == {"a": "abs", "b": "xor", "new": "abs"}
    assert same_state(got, state)
    # under int8, the whole tensor is quantised on its own scale (not as a change)
    lossy = encode_update(state, Pipeline(("int8",)), reference)
    got, meta = decode_update(lossy.blob, reference)
    assert meta["kinds"] == {"a": "abs", "b": "sub", "new": "abs"}
    assert same_state(got, lossy.decoded)
    for k in ("a", "new"):
        step = state[k].abs().max().item() / 127
        assert (got[k] - state[k]).abs().max().item() <= step / 2 * (1 + 1e-5)
    # "b" changed by a constant 0.5: int8 of a constant change is exact
    assert torch.allclose(got["b"], state["b"], rtol=0, atol=1e-6)
    # whole tensors decode without a reference; a change does not
    assert same_state(
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
        assert same_state(client, g)
        assert same_state(held, g)
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
        assert same_state(client, held)
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
    good = Pipeline(("topk", "int8")).encode({"w": randn(0, 20, 20)})
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
    good = Pipeline(("int8",)).encode({"w": randn(0, 10, 10)})
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
    reference = {"w": randn(0, 4, 3)}  # float32
    state = {"w": randn(1, 4, 3, dtype=torch.bfloat16)}
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
    import fedpeft.codecs.wire as wire_format

    blob = Pipeline(()).encode({"w": torch.zeros(1000)})
    monkeypatch.setattr(wire_format, "MAX_PAYLOAD_BYTES", 512)
    with pytest.raises(CodecError, match="inflates past 512"):
        Pipeline.decode(blob)
