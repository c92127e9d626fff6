"""Planning a ``fedpeft compare`` sweep: its flags parsed, its cells named and checked.

A cell is one run of the sweep (a strategy, one value per ``--vary`` key, a seed). Every
cell is planned and its scenario validated before any of them runs, so a mistake in the
sweep is reported at once, not after the first hours of runs.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from fedpeft.config import ScenarioError, load_scenario, parse_override
from fedpeft.report import SUMMARY_FILE

CELLS_DIR = "cells"
_BRACKETS = {"[": "]", "{": "}"}


# ---------------------------------------------------------------------------- parsing


def split_top_level(text: str) -> list[str]:
    """Split ``text`` on commas outside brackets, braces and quoted strings.

    Parameters
    ----------
    text
        E.g. ``'[2,4],[4,8]'`` or ``'1e-3,"a,b"'``.

    Returns
    -------
    list of str
        The stripped items, e.g. ``['[2,4]', '[4,8]']``.

    Raises
    ------
    ScenarioError
        On unbalanced brackets, an unterminated string or an empty item.
    """
    items: list[str] = []
    stack: list[str] = []
    quote = ""
    start = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 1  # skip the escaped character
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in _BRACKETS:
            stack.append(_BRACKETS[ch])
        elif ch in "]}":
            if not stack or stack.pop() != ch:
                raise ScenarioError(f"unbalanced {ch!r} in {text!r}")
        elif ch == "," and not stack:
            items.append(text[start:i])
            start = i + 1
        i += 1
    if quote or stack:
        raise ScenarioError(f"unterminated {quote or stack[-1]!r} in {text!r}")
    items.append(text[start:])
    items = [item.strip() for item in items]
    if any(not item for item in items):
        raise ScenarioError(f"empty value in {text!r}")
    return items


def parse_names(text: str | Sequence[str], what: str) -> list[str]:
    """Split a comma-separated list of names; duplicates or an empty list raise."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    if not names or any(not n for n in names):
        raise ScenarioError(f"--{what} expects a comma-separated list, got {text!r}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ScenarioError(f"--{what} lists {dupes[0]!r} twice")
    return names


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    """Parse ``--seeds 0,1,2`` into integers."""
    if not isinstance(text, str):
        seeds = [int(s) for s in text]
    else:
        try:
            seeds = [int(s) for s in parse_names(text, "seeds")]
        except ValueError:
            raise ScenarioError(f"--seeds expects integers like 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ScenarioError(f"--seeds expects distinct integers like 0,1,2, got {text!r}")
    return seeds


def parse_vary(items: Sequence[str]) -> dict[str, list[str]]:
    """Parse every ``--vary KEY=v1,v2``; the values are kept as their TOML text."""
    vary: dict[str, list[str]] = {}
    for item in items:
        path, _ = parse_override(item)  # checks KEY=VALUE and the key's shape
        key = ".".join(path)
        if key in ("strategy.name", "seed"):
            raise ScenarioError(f"--vary {key}: use --strategies / --seeds for that")
        if key in vary:
            raise ScenarioError(f"--vary {key} is given twice; list every value in one --vary")
        values = split_top_level(item.split("=", 1)[1])
        if len(set(values)) != len(values):
            raise ScenarioError(f"--vary {key} lists a value twice: {item!r}")
        vary[key] = values
    return vary


# ---------------------------------------------------------------------------- cells


@dataclass
class Cell:
    """One run of the sweep: a strategy, one value per ``--vary`` key, and a seed."""

    strategy: str
    vary: dict[str, str]
    seed: int
    out_dir: Path
    overrides: list[str] = field(default_factory=list)
    error: str | None = None  # why the cell failed; None while it is ok or not yet run

    @property
    def cell_id(self) -> str:
        """The cell's folder name (``out_dir.name``)."""
        return self.out_dir.name

    @property
    def group(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        """The table row this cell belongs to: strategy and vary values, not the seed."""
        return self.strategy, tuple(self.vary.items())

    @property
    def label(self) -> str:
        """Row label for plots, e.g. ``fedprox train.lr=1e-3``."""
        return " ".join([self.strategy, *(f"{k}={v}" for k, v in self.vary.items())])

    @property
    def ok(self) -> bool:
        """Whether the cell finished and wrote its ``summary.json``."""
        return self.error is None and (self.out_dir / SUMMARY_FILE).is_file()


def _safe(text: str) -> str:
    """Keep letters, digits and ``. _ - =``; anything else becomes one ``_``."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_") or "_"


def cell_id(strategy: str, vary: dict[str, str], seed: int) -> str:
    """Filesystem-safe id ``<strategy>[-<key>=<value>...]-seed<seed>``."""
    parts = [strategy, *(f"{_safe(k)}={_safe(v)}" for k, v in vary.items()), f"seed{seed}"]
    return "-".join(parts)


def plan_cells(
    strategies: Sequence[str],
    vary: dict[str, list[str]],
    seeds: Sequence[int],
    sets: Sequence[str],
    cells_dir: Path,
) -> list[Cell]:
    """Cartesian product strategies x vary combinations x seeds, seeds innermost."""
    combos: list[dict[str, str]] = [{}]
    for key, values in vary.items():
        combos = [{**combo, key: v} for combo in combos for v in values]
    cells, taken = [], set()
    for strategy in strategies:
        for combo in combos:
            for seed in seeds:
                name = base = cell_id(strategy, combo, seed)
                n = 2
                while name in taken:  # e.g. [2,4] and "2,4" sanitise alike
                    name, n = f"{base}-{n}", n + 1
                taken.add(name)
                overrides = [
                    *sets,
                    f"strategy.name={json.dumps(strategy)}",
                    f"seed={seed}",
                    *(f"{k}={v}" for k, v in combo.items()),
                ]
                cells.append(Cell(strategy, combo, seed, cells_dir / name, overrides))
    return cells


def validate_cells(scenario: str, cells: Sequence[Cell]) -> None:
    """Load every cell's scenario and build its strategy; a refusal marks that cell failed."""
    from fedpeft.strategies import build_strategy

    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # Flower warns on every build; the runs log it
    try:
        for cell in cells:
            try:
                build_strategy(load_scenario(scenario, cell.overrides))
            except ScenarioError as err:
                cell.error = str(err)
            except Exception:  # noqa: BLE001 - not a scenario mistake: let the run report it
                pass
    finally:
        flwr_logger.setLevel(level)


# ---------------------------------------------------------------------------- the sweep


@dataclass
class Sweep:
    """A planned and validated sweep: its cells, its folder, and how its outputs are titled."""

    scenario: str  # as given: a scenario TOML path or a bundled name
    name: str  # the scenario's own name
    cells: list[Cell]
    out: Path
    command: str  # the ``fedpeft compare`` command line that makes this sweep
    title: str  # the plots' title


def plan_sweep(
    scenario: str,
    strategies: str | Sequence[str] | None,
    seeds: str | Sequence[int] | None,
    vary: Sequence[str],
    sets: Sequence[str],
    out: str | Path | None,
) -> Sweep:
    """Parse the sweep's flags, plan its cells in ``out`` and validate every one of them.

    Raises ScenarioError when the base scenario, a strategy name, ``--seeds`` or ``--vary``
    is invalid, or when no cell passes validation; a cell that alone fails is marked.
    """
    from fedpeft.strategies import get_strategy

    sets = list(sets)
    base = load_scenario(scenario, sets)
    names = parse_names(strategies or [base.strategy.name], "strategies")
    for name in names:
        get_strategy(name)
    seed_list = parse_seeds(seeds) if seeds is not None else [base.seed]
    vary_values = parse_vary(vary)
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"compare-{base.name}-{stamp}"
    out = Path(out)
    cells = plan_cells(names, vary_values, seed_list, sets, out / CELLS_DIR)
    validate_cells(scenario, cells)
    if all(cell.error for cell in cells):
        raise ScenarioError(f"no cell of the sweep is valid: {cells[0].cell_id}: {cells[0].error}")
    command = _command(scenario, names, seed_list, vary_values, sets, out)
    return Sweep(scenario, base.name, cells, out, command, f"{base.name}: {base.peft.label}")


def _command(
    scenario: str,
    strategies: Sequence[str],
    seeds: Sequence[int],
    vary: dict[str, list[str]],
    sets: Sequence[str],
    out: Path,
) -> str:
    """The ``fedpeft compare`` command line, every default spelled out, for the table."""
    args = ["fedpeft", "compare", scenario, "--strategies", ",".join(strategies)]
    args += ["--seeds", ",".join(str(s) for s in seeds)]
    for key, values in vary.items():
        args += ["--vary", f"{key}={','.join(values)}"]
    for item in sets:
        args += ["--set", item]
    return shlex.join([*args, "--out", str(out)])
