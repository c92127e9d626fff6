"""Bundled scenario recipes: every ``*.toml`` file in this folder, by file stem."""

from __future__ import annotations

from pathlib import Path

SCENARIO_DIR = Path(__file__).resolve().parent


def bundled() -> dict[str, Path]:
    """Return ``{name: path}`` for every bundled scenario file."""
    return {p.stem: p for p in sorted(SCENARIO_DIR.glob("*.toml"))}


def describe(path: Path) -> str:
    """Return the scenario's one-line description (its first comment after the command)."""
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""
