"""How a scenario key is declared and checked: a default, a help line and its bounds.

A key's numeric bounds sit in its field's metadata (``setting(8, "...", ge=1)``) and one
generic check, :func:`check_bounds`, refuses a value outside them with a sentence that
names the key and what is accepted. Rules that tie several keys together stay in the
section's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any, ClassVar


class ScenarioError(ValueError):
    """A user mistake in a scenario: the message is one line meant for the user."""


#: bound name -> (test the value must pass, how the bound reads in an error)
_BOUNDS: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "gt": (operator.gt, ">"),
    "ge": (operator.ge, ">="),
    "lt": (operator.lt, "<"),
    "le": (operator.le, "<="),
}
#: a field's annotation -> what its values are called in an error
_NOUNS = {"int": "an integer", "float": "a number", "list[int]": "a list of integers"}


def setting(
    default: Any,
    help: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    noun: str = "",
    note: str = "",
) -> Any:
    """Declare a scenario key: its default, a one-line help text and optional bounds.

    ``gt``/``ge``/``lt``/``le`` bound the value (each element of a list); ``noun`` says
    what the value is in an error (default: from the annotation), ``note`` adds a remark.
    """
    metadata: dict[str, Any] = {"help": help}
    bounds = {k: v for k, v in {"gt": gt, "ge": ge, "lt": lt, "le": le}.items() if v is not None}
    if bounds:
        metadata.update(bounds=bounds, noun=noun, note=note)
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def need(ok: bool, key: str, accepted: str, value: Any) -> None:
    """Raise a one-line ScenarioError unless ``ok``: ``key`` took ``value``, not ``accepted``."""
    if not ok:
        raise ScenarioError(f"invalid value {value!r} for '{key}': expected {accepted}")


def accepted(field: dataclasses.Field[Any]) -> str:
    """What a bounded field accepts, in words: ``an integer >= 1``, ``a number in (0, 1]``."""
    bounds = field.metadata["bounds"]
    noun = field.metadata["noun"] or _NOUNS.get(str(field.type), "a value")
    low = [(k, v) for k, v in bounds.items() if k in ("gt", "ge")]
    high = [(k, v) for k, v in bounds.items() if k in ("lt", "le")]
    if low and high:
        (lo_kind, lo), (hi_kind, hi) = low[0], high[0]
        text = (
            f"{noun} in {'[' if lo_kind == 'ge' else '('}{lo:g}, "
            f"{hi:g}{']' if hi_kind == 'le' else ')'}"
        )
    else:
        kind, limit = (low or high)[0]
        text = f"{noun} {_BOUNDS[kind][1]} {limit:g}"
    return f"{text} ({field.metadata['note']})" if field.metadata["note"] else text


def check_bounds(section: Any, table: str) -> None:
    """Refuse, in one line, any field of ``section`` outside the bounds it declares."""
    for field in dataclasses.fields(section):
        bounds = field.metadata.get("bounds")
        if not bounds:
            continue
        value = getattr(section, field.name)
        values = value if isinstance(value, list) else [value]
        ok = all(_BOUNDS[kind][0](v, limit) for v in values for kind, limit in bounds.items())
        need(ok, f"{table}.{field.name}", accepted(field), value)


@dataclasses.dataclass
class Section:
    """A table of a scenario (``[peft]``, ``[train]``, ...), named by ``table``.

    ``class PeftSection(Section, table="peft")``: its bounds are checked on creation.
    """

    table: ClassVar[str] = ""

    def __init_subclass__(cls, table: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.table = table

    def __post_init__(self) -> None:
        check_bounds(self, self.table)
