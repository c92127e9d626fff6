"""Reading scenarios: files and bundled names, ``--set`` overrides, and the key reference."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path
from typing import Any

from fedpeft import scenarios
from fedpeft.config.fields import ScenarioError
from fedpeft.config.scenario import Scenario


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one ``--set KEY=VALUE``; VALUE is a TOML value, else a plain string."""
    if "=" not in item:
        raise ScenarioError(f"--set expects KEY=VALUE (e.g. train.lr=1e-3), got {item!r}")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ScenarioError(f"--set has an empty key in {item!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with every ``KEY=VALUE`` override applied."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ScenarioError(f"--set {'.'.join(path)}: '{part}' is not a table")
            node = child
        node[path[-1]] = value
    return raw


def read_toml(path: Path) -> dict[str, Any]:
    """Read a scenario file; a missing or malformed file raises ScenarioError."""
    if not path.is_file():
        raise ScenarioError(f"scenario file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"{path} is not valid TOML: {err}") from None


def resolve_scenario_path(name_or_path: str) -> Path:
    """Map a scenario argument to a file: a path that exists, or a bundled scenario name."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or "/" in name_or_path:
        if not path.is_file():
            raise ScenarioError(f"scenario file not found: {name_or_path}")
        return path
    bundled = scenarios.bundled()
    if name_or_path in bundled:
        return bundled[name_or_path]
    raise ScenarioError(
        f"unknown scenario {name_or_path!r}: not a .toml file and not a bundled scenario "
        f"(bundled: {', '.join(sorted(bundled))})"
    )


def load_scenario(name_or_path: str, overrides: list[str] | None = None) -> Scenario:
    """Load a scenario file or bundled name, apply ``--set`` overrides and validate."""
    path = resolve_scenario_path(name_or_path)
    raw = apply_overrides(read_toml(path), overrides or [])
    raw.setdefault("name", path.stem)
    return Scenario.from_dict(raw)


def help_lines(cls: type = Scenario, prefix: str = "") -> list[str]:
    """Return ``key = default  # help`` lines for every scenario key (used by docs)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(help_lines(typing.cast(type, tp), f"{prefix}{f.name}."))
        else:
            factory = typing.cast(Any, f.default_factory)
            default = f.default if f.default is not dataclasses.MISSING else factory()
            lines.append(f"{prefix}{f.name} = {default!r}  # {f.metadata.get('help', '')}")
    return lines
