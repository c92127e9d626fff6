"""``fedpeft compare``: sweep strategies x ``--vary`` values x seeds and tabulate the runs.

Every cell of the sweep is one ordinary ``fedpeft run`` in its own subprocess (which keeps
Ray and any failure inside that cell), written to ``OUT/cells/<cell-id>/``. The summary
functions below only read run folders, so they work on any folders of that format.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fedpeft.config import ScenarioError, load_scenario, parse_override
from fedpeft.report import METRICS_FILE, PLOTS_DIR, SUMMARY_FILE, console, read_metrics

CELLS_DIR = "cells"
LOG_FILE = "log.txt"
CSV_FILE = "comparison.csv"
MD_FILE = "comparison.md"
STAT_COLUMNS = [
    "final_eval_accuracy_mean",
    "final_eval_accuracy_std",
    "best_eval_accuracy_mean",
    "final_eval_loss_mean",
    "personal_accuracy_mean",
    "trainable_params_mean",
    "bytes_up_per_client_round_mean",
    "compression_ratio_up_mean",
    "bytes_up_total_mean",
    "bytes_down_total_mean",
    "wall_seconds_mean",
]
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


# ---------------------------------------------------------------------------- summary


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _pstd(values: Sequence[float]) -> float | None:
    """Population standard deviation (0 for one value)."""
    if not values:
        return None
    m = sum(values) / len(values)
    return float((sum((v - m) ** 2 for v in values) / len(values)) ** 0.5)


def _numbers(records: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in records if isinstance(r.get(key), int | float)]


def _groups(cells: Sequence[Cell]) -> dict[Any, list[Cell]]:
    groups: dict[Any, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.group, []).append(cell)
    return groups


def summarise_cells(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """One row per (strategy, vary combination), aggregated over that row's seeds.

    Parameters
    ----------
    cells
        Cells whose ``out_dir`` holds a run folder, or whose ``error`` says why not.

    Returns
    -------
    list of dict
        Keys ``strategy``, the vary keys, ``seeds`` (``"ok/total"``), the
        :data:`STAT_COLUMNS` (means and the population std over the ok seeds; ``None``
        where no ok seed has the value) and ``status``.
    """
    rows = []
    for (strategy, combo), members in _groups(cells).items():
        finals, bests, summaries = [], [], []
        reasons = []
        for cell in members:
            if not cell.ok:
                reasons.append(cell.error or f"no {SUMMARY_FILE} in {cell.out_dir}")
                continue
            summary = json.loads((cell.out_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
            final = summary.get("final", {})
            summaries.append(summary)
            finals.append(final)
            accs = _numbers(read_metrics(cell.out_dir), "eval_accuracy")
            accs += _numbers([final], "eval_accuracy") if not accs else []
            if accs:
                bests.append(max(accs))
        acc = _numbers(finals, "eval_accuracy")
        row: dict[str, Any] = {"strategy": strategy, **dict(combo)}
        row["seeds"] = f"{len(summaries)}/{len(members)}"
        row["final_eval_accuracy_mean"] = _mean(acc)
        row["final_eval_accuracy_std"] = _pstd(acc)
        row["best_eval_accuracy_mean"] = _mean(bests)
        row["final_eval_loss_mean"] = _mean(_numbers(finals, "eval_loss"))
        row["personal_accuracy_mean"] = _mean(_numbers(finals, "personal_accuracy"))
        keys = (
            "trainable_params",
            "bytes_up_per_client_round",
            "bytes_up_total",
            "bytes_down_total",
            "wall_seconds",
        )
        for key in keys:
            row[f"{key}_mean"] = _mean(_numbers(summaries, key))
        ratios = [s.get("compression", {}) for s in summaries]
        row["compression_ratio_up_mean"] = _mean(_numbers(ratios, "ratio_up_vs_uncompressed"))
        if not reasons:
            row["status"] = "ok"
        elif not summaries:
            row["status"] = f"failed: {reasons[0]}"
        else:
            row["status"] = f"{len(reasons)}/{len(members)} failed: {reasons[0]}"
        rows.append(row)
    return rows


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    vary_keys = [k for k in rows[0] if k not in {"strategy", "seeds", "status", *STAT_COLUMNS}]
    return ["strategy", *vary_keys, "seeds", *STAT_COLUMNS, "status"]


def _md_cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if key.startswith(("bytes_", "wall_", "trainable_")):
            return f"{value:.1f}" if key.startswith("wall_") else f"{value:.0f}"
        return f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_table(
    rows: Sequence[dict[str, Any]], out_dir: Path, scenario: str = "", command: str = ""
) -> list[Path]:
    """Write ``comparison.csv`` (full precision) and ``comparison.md`` to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not rows:
        raise ValueError("no rows to write")
    columns = _columns(rows)
    csv_path = out_dir / CSV_FILE
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    lines = [f"# compare {scenario}".rstrip(), ""]
    if command:
        lines += [f"`{command}`", ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(c, row.get(c)) for c in columns) + " |")
    md_path = out_dir / MD_FILE
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [csv_path, md_path]


def _mean_curve(
    cells: Sequence[Cell],
) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per round: mean eval_accuracy, cumulative MB (up + down) and uplink MB over the cells."""
    acc: dict[int, list[float]] = {}
    mb: dict[int, list[float]] = {}
    up_mb: dict[int, list[float]] = {}
    for cell in cells:
        total = up = 0.0
        for r in read_metrics(cell.out_dir):
            total += r.get("bytes_up", 0) + r.get("bytes_down", 0)
            up += r.get("bytes_up", 0)
            if isinstance(r.get("eval_accuracy"), int | float):
                acc.setdefault(r["round"], []).append(float(r["eval_accuracy"]))
                mb.setdefault(r["round"], []).append(total / 1e6)
                up_mb.setdefault(r["round"], []).append(up / 1e6)
    rounds = sorted(acc)

    def mean(d: dict[int, list[float]]) -> list[float]:
        return [sum(d[r]) / len(d[r]) for r in rounds]

    return rounds, mean(acc), mean(mb), mean(up_mb)


def plot_rows(cells: Sequence[Cell], out_dir: Path, title: str = "") -> list[Path]:
    """Write accuracy against rounds, cumulative MB (up + down) and cumulative uplink MB.

    One line per table row (mean over its ok seeds), labelled by strategy and vary values.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out_dir / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    fig_r, ax_r = plt.subplots(figsize=(9, 4))
    fig_m, ax_m = plt.subplots(figsize=(9, 4))
    fig_u, ax_u = plt.subplots(figsize=(9, 4))
    strategies = {c.strategy for c in cells}
    for members in _groups(cells).values():
        rounds, acc, mb, up = _mean_curve([c for c in members if c.ok])
        if rounds:
            label = members[0].label
            if len(strategies) == 1:  # one strategy: the vary values tell the rows apart
                label = label.removeprefix(members[0].strategy).strip() or label
            ax_r.plot(rounds, acc, marker="o", label=label)
            ax_m.plot(mb, acc, marker="o", label=label)
            ax_u.plot(up, acc, marker="o", label=label)
    written = [_plot_accuracy_vs_bytes(cells, plots, title)]
    for fig, ax, xlabel, name in (
        (fig_r, ax_r, "round", "accuracy_vs_round.png"),
        (fig_m, ax_m, "cumulative MB (up + down, all clients; log)", "accuracy_vs_megabytes.png"),
        (
            fig_u,
            ax_u,
            "cumulative uplink MB (all clients; log)",
            "accuracy_vs_uplink_megabytes.png",
        ),
    ):
        ax.set(xlabel=xlabel, ylabel="eval_accuracy (mean over seeds)", title=title)
        if "MB" in xlabel:  # traffic differs by orders of magnitude between rows
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # beside the axes, never over the curves
            ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        written.append(plots / name)
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def _plot_accuracy_vs_bytes(cells: Sequence[Cell], plots: Path, title: str) -> Path:
    """Scatter final accuracy against uplink bytes per client-round, a point per table row.

    The x axis is logarithmic: methods differ by orders of magnitude.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in summarise_cells(cells):
        x, y = row["bytes_up_per_client_round_mean"], row["final_eval_accuracy_mean"]
        if x and y is not None:
            label = " ".join(str(v) for k, v in row.items() if k not in _NOT_LABEL)
            ax.scatter([x], [y])
            ax.annotate(
                label, (x, y), fontsize="x-small", xytext=(3, 3), textcoords="offset points"
            )
    ax.set(
        xscale="log",
        xlabel="uplink bytes per client-round (log)",
        ylabel="final eval_accuracy (mean over seeds)",
        title=title,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = plots / "accuracy_vs_bytes_per_client_round.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


_NOT_LABEL = {"seeds", "status", *STAT_COLUMNS}


# ---------------------------------------------------------------------------- running


def _reason(log: Path, returncode: int) -> str:
    """The last non-empty stderr line of a failed cell, without the ``fedpeft:`` prefix."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
    return re.sub(r"^fedpeft: (error: )?", "", lines[-1])


def run_cell(scenario: str, cell: Cell) -> None:
    """Run one cell as ``python -m fedpeft.cli run`` in a subprocess; set ``cell.error``."""
    cell.out_dir.mkdir(parents=True, exist_ok=True)
    (cell.out_dir / SUMMARY_FILE).unlink(missing_ok=True)
    (cell.out_dir / METRICS_FILE).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "fedpeft.cli", "run", scenario]
    for item in cell.overrides:
        cmd += ["--set", item]
    cmd += ["--out", str(cell.out_dir)]
    log = cell.out_dir / LOG_FILE
    with log.open("w", encoding="utf-8") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        try:
            returncode = proc.wait()
        except KeyboardInterrupt:  # the child got the same SIGINT: let it stop Ray itself
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    if returncode != 0:
        cell.error = _reason(log, returncode)
    elif not (cell.out_dir / SUMMARY_FILE).is_file():
        cell.error = f"the run wrote no {SUMMARY_FILE}"


def _command(
    scenario: str,
    strategies: Sequence[str],
    seeds: Sequence[int],
    vary: dict[str, list[str]],
    sets: Sequence[str],
    out: Path,
) -> str:
    args = ["fedpeft", "compare", scenario, "--strategies", ",".join(strategies)]
    args += ["--seeds", ",".join(str(s) for s in seeds)]
    for key, values in vary.items():
        args += ["--vary", f"{key}={','.join(values)}"]
    for item in sets:
        args += ["--set", item]
    return shlex.join([*args, "--out", str(out)])


def _finish(
    cells: Sequence[Cell], out: Path, scenario: str, command: str, title: str
) -> list[dict[str, Any]]:
    rows = summarise_cells(cells)
    write_table(rows, out, scenario, command)
    plot_rows(cells, out, title)
    return rows


def run_compare(
    scenario: str,
    strategies: str | Sequence[str] | None,
    seeds: str | Sequence[int] | None = None,
    vary: Sequence[str] = (),
    sets: Sequence[str] = (),
    out: str | Path | None = None,
) -> int:
    """Validate the whole sweep, run every cell, then write the table and plots to ``out``.

    Parameters
    ----------
    scenario
        Scenario TOML path or bundled name.
    strategies
        ``"a,b,c"`` or a list of strategy names; ``None``: the scenario's own strategy.
    seeds
        ``"0,1,2"`` or a list of seeds; default: the scenario's own seed.
    vary
        ``KEY=v1,v2`` items; values are TOML, split on top-level commas.
    sets
        ``KEY=VALUE`` overrides applied to every cell.
    out
        Output folder; default ``runs/compare-<scenario>-<timestamp>/``.

    Returns
    -------
    int
        0 once the sweep ran, even when some cells failed.

    Raises
    ------
    ScenarioError
        When the base scenario, a strategy name, ``--seeds`` or ``--vary`` is invalid, or
        when no cell passes validation (the CLI exits with status 2).
    """
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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
    title = f"{base.name}: {base.peft.label}"

    console.print(f"[bold]fedpeft compare[/] {escape(base.name)}: {len(cells)} cells -> {out}")
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("cells", total=len(cells))
            for i, cell in enumerate(cells, 1):
                progress.update(task, description=cell.cell_id)
                started = time.perf_counter()
                if cell.error is None:
                    run_cell(scenario, cell)
                seconds = time.perf_counter() - started
                if cell.error is None:
                    summary = json.loads((cell.out_dir / SUMMARY_FILE).read_text("utf-8"))
                    acc = summary.get("final", {}).get("eval_accuracy", float("nan"))
                    line = f"eval_accuracy {acc:.4f}"
                else:
                    line = f"[red]FAILED[/] {escape(cell.error)}"
                progress.console.print(
                    f"[{i}/{len(cells)}] {cell.cell_id}: {line} ({seconds:.0f}s)"
                )
                progress.advance(task)
    except KeyboardInterrupt:
        for cell in cells:
            if cell.error is None and not cell.ok:
                cell.error = "interrupted"
        _finish(cells, out, base.name, command, title)
        console.print(f"partial comparison in {out / MD_FILE}")
        raise
    rows = _finish(cells, out, base.name, command, title)
    failed = sum(1 for c in cells if not c.ok)
    console.print(
        f"[bold]done[/]: {len(cells) - failed}/{len(cells)} cells ok, {len(rows)} rows -> "
        f"{out / MD_FILE}"
    )
    return 0
