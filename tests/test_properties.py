"""Property-based tests: random scenarios and random updates give a result or one clear error.

Hypothesis builds inputs from the real schema (every section and key, with values of every
type) and from junk; the properties are that parsing returns a valid Scenario or raises one
ScenarioError of one line, never another exception, and that update validation returns a
reason or None, never raises, and accepts only what is sound.
"""

from __future__ import annotations

import dataclasses
import math
import typing

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft.config import Scenario, ScenarioError, parse_override
from fedpeft.server.reliability import check_update

SECTIONS = {
    f.name: typing.get_type_hints(Scenario)[f.name]
    for f in dataclasses.fields(Scenario)
    if dataclasses.is_dataclass(typing.get_type_hints(Scenario)[f.name])
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
DEFAULTS = {name: dataclasses.asdict(cls()) for name, cls in SECTIONS.items()}


def near_default(default: object) -> st.SearchStrategy:
    """Values of the default's own type (often valid), or anything at all."""
    if isinstance(default, bool):
        typed: st.SearchStrategy = st.booleans()
    elif isinstance(default, int):
        typed = st.integers(-3, 3000)
    elif isinstance(default, float):
        typed = st.floats(allow_nan=True, allow_infinity=True)
    elif isinstance(default, str):
        typed = st.sampled_from([default, "", "none", "auto", "x"])
    elif isinstance(default, list):
        typed = st.lists(st.integers(-2, 9) | st.text(max_size=4), max_size=3)
    else:
        typed = values
    return st.one_of(typed, typed, values)


@st.composite
def raw_scenarios(draw: st.DrawFn) -> dict:
    raw: dict = {}
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "junk"]), max_size=4, unique=True)):
        defaults = DEFAULTS.get(section, {"x": None})
        table = {}
        for _ in range(draw(st.integers(1, 4))):
            key = draw(st.sampled_from([*defaults, "nonsense"]))
            table[key] = draw(near_default(defaults.get(key)))
        raw[section] = table if draw(st.integers(0, 9)) else draw(values)
    if draw(st.booleans()):
        raw["seed"] = draw(values)
    return raw


def _one_line_error_or_scenario(build: typing.Callable[[], object]) -> None:
    try:
        result = build()
    except ScenarioError as err:
        assert "\n" not in str(err) and str(err)
        return
    assert isinstance(result, Scenario)
    for section in SECTIONS:  # nothing non-finite slipped into a number
        for value in dataclasses.asdict(getattr(result, section)).values():
            if isinstance(value, float):
                assert math.isfinite(value), (section, value)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_scenarios())
def test_any_scenario_table_is_valid_or_one_clear_error(raw: dict) -> None:
    _one_line_error_or_scenario(lambda: Scenario.from_dict(raw))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_override_parses_or_is_one_clear_error(item: str) -> None:
    try:
        path, _ = parse_override(item)
    except ScenarioError as err:
        assert "\n" not in str(err)
        return
    assert path and all(path)


REFERENCE = {
    "m.lora_A.w": torch.zeros(4, 6),
    "m.lora_B.w": torch.zeros(5, 4),
    "h.w": torch.zeros(3),
}


@st.composite
def updates(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    out = {}
    for key in draw(st.lists(st.sampled_from([*REFERENCE, "extra"]), max_size=4, unique=True)):
        shape = draw(st.lists(st.integers(0, 7), min_size=0, max_size=3))
        if draw(st.booleans()) and key in REFERENCE:
            shape = list(REFERENCE[key].shape)
        dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.int64, torch.float16]))
        fill = draw(st.floats(allow_nan=True, allow_infinity=True, width=16))
        out[key] = (
            torch.full(shape, fill).to(dtype)
            if dtype.is_floating_point
            else torch.zeros(shape, dtype=dtype)
        )
    return out


@settings(max_examples=400, deadline=None)
@given(updates(), st.floats(0, 10))
def test_update_validation_never_raises_and_accepts_only_sound_updates(update, bound) -> None:
    reason = check_update(update, REFERENCE, set(), {}, max_norm=bound)
    if reason is None:
        assert set(update) == set(REFERENCE)
        for value in update.values():
            assert value.dtype == torch.float32 and bool(torch.isfinite(value).all())
        norm = math.sqrt(sum(float(v.double().square().sum()) for v in update.values()))
        assert bound == 0 or norm <= bound
    else:
        assert isinstance(reason, str) and "\n" not in reason


def test_no_number_setting_takes_inf_or_nan() -> None:
    for section, defaults in DEFAULTS.items():
        for key, default in defaults.items():
            if isinstance(default, float):
                for bad in (math.nan, math.inf, -math.inf):
                    try:
                        Scenario.from_dict({section: {key: bad}})
                    except ScenarioError as err:
                        assert f"{section}.{key}" in str(err)
                    else:
                        raise AssertionError(f"{section}.{key} = {bad} accepted")
