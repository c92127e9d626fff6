"""Turning raw TOML / ``--set`` values into typed section fields, or a one-line error."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, get_args, get_origin

from fedpeft.config.fields import ScenarioError


def type_name(tp: Any) -> str:
    """What an annotation accepts, in words (``an integer``, ``one of 'iid', ...``)."""
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {type_name(get_args(tp)[0])}"
    return {
        int: "an integer",
        float: "a finite number",
        str: "a string",
        bool: "true or false",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for option in get_args(tp):
            try:
                return coerce(key, value, option)
            except ScenarioError:
                continue
    elif origin is list:
        if isinstance(value, list):
            return [coerce(f"{key}[{i}]", v, get_args(tp)[0]) for i, v in enumerate(value)]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # no setting means anything with inf or nan: refuse them here, once for every key
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is type(None):
        if value is None:
            return value
    raise ScenarioError(f"invalid value {value!r} for '{key}': expected {type_name(tp)}")


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from nested dicts, coercing each value to its field's type.

    ``prefix`` is the dotted path of the table (``"peft."``), so errors name the full key.
    """
    section = prefix.rstrip(".") or "scenario"
    if not isinstance(raw, dict):
        raise ScenarioError(f"'{section}' must be a table of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ScenarioError(
            f"unknown key '{prefix}{unknown[0]}'; accepted keys in [{section}]: "
            + ", ".join(sorted(fields))
        )
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(typing.cast(type, tp), value, f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(f"{prefix}{name}", value, tp)
    return cls(**kwargs)
