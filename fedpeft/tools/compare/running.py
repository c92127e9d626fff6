"""Running a ``fedpeft compare`` sweep: each cell an ordinary ``fedpeft run`` of its own.

Every cell runs in its own subprocess (which keeps Ray and any failure inside that cell),
written to ``OUT/cells/<cell-id>/``; the table and plots are written at the end, and also
when the sweep is interrupted, from the cells finished by then. Rerun into the same
``--out``, a sweep keeps the cells that finished with the same settings.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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

from fedpeft.config import ScenarioError, load_scenario
from fedpeft.report import METRICS_FILE, SUMMARY_FILE, console
from fedpeft.tools.compare.planning import Cell, Sweep, plan_sweep
from fedpeft.tools.compare.tabulating import MD_FILE, plot_rows, summarise_cells, write_table

LOG_FILE = "log.txt"


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
    sweep = plan_sweep(scenario, strategies, seeds, vary, sets, out)
    cells = sweep.cells
    console.print(
        f"[bold]fedpeft compare[/] {escape(sweep.name)}: {len(cells)} cells -> {sweep.out}"
    )
    try:
        _run_cells(sweep)
    except KeyboardInterrupt:
        for cell in cells:
            if cell.error is None and not cell.ok:
                cell.error = "interrupted"
        _finish(sweep)
        console.print(f"partial comparison in {sweep.out / MD_FILE}")
        raise
    rows = _finish(sweep)
    failed = sum(1 for c in cells if not c.ok)
    console.print(
        f"[bold]done[/]: {len(cells) - failed}/{len(cells)} cells ok, {len(rows)} rows -> "
        f"{sweep.out / MD_FILE}"
    )
    return 0


def _run_cells(sweep: Sweep) -> None:
    """Run the sweep's valid cells in turn under a progress bar, a result line per cell."""
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    cells = sweep.cells
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("cells", total=len(cells))
        for i, cell in enumerate(cells, 1):
            progress.update(task, description=cell.cell_id)
            started = time.perf_counter()
            reused = cell.error is None and finished_before(sweep.scenario, cell)
            if cell.error is None and not reused:
                run_cell(sweep.scenario, cell)
            seconds = time.perf_counter() - started
            timing = "finished before, kept" if reused else f"{seconds:.0f}s"
            progress.console.print(
                f"[{i}/{len(cells)}] {cell.cell_id}: {_outcome(cell)} ({timing})"
            )
            progress.advance(task)


def finished_before(scenario: str, cell: Cell) -> bool:
    """Whether ``cell``'s folder holds a finished run of exactly this cell's scenario.

    A sweep rerun into the same ``--out`` (after Ctrl-C, a crash or a reboot) keeps such
    cells instead of running them again; a folder from other settings is run afresh.
    """
    path = cell.out_dir / SUMMARY_FILE
    if not path.is_file():
        return False
    try:
        summary = json.loads(path.read_text("utf-8"))
        wanted = load_scenario(scenario, cell.overrides)
    except (ValueError, ScenarioError):
        return False
    return bool(
        summary.get("scenario") == wanted.to_dict()
        and summary.get("rounds_completed") == wanted.federation.rounds
    )


def _outcome(cell: Cell) -> str:
    """A finished cell's result for its progress line: its accuracy, or why it failed."""
    if cell.error is not None:
        return f"[red]FAILED[/] {escape(cell.error)}"
    summary = json.loads((cell.out_dir / SUMMARY_FILE).read_text("utf-8"))
    acc = summary.get("final", {}).get("eval_accuracy", float("nan"))
    return f"eval_accuracy {acc:.4f}"


def run_cell(scenario: str, cell: Cell) -> None:
    """Run one cell as ``python -m fedpeft.tools.cli run`` in a subprocess; set ``cell.error``."""
    cell.out_dir.mkdir(parents=True, exist_ok=True)
    (cell.out_dir / SUMMARY_FILE).unlink(missing_ok=True)
    (cell.out_dir / METRICS_FILE).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "fedpeft.tools.cli", "run", scenario]
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


def _reason(log: Path, returncode: int) -> str:
    """The last non-empty stderr line of a failed cell, without the ``fedpeft:`` prefix."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
    return re.sub(r"^fedpeft: (error: )?", "", lines[-1])


def _finish(sweep: Sweep) -> list[dict[str, Any]]:
    """Write the sweep's table and plots from the cells as they are now."""
    rows = summarise_cells(sweep.cells)
    write_table(rows, sweep.out, sweep.name, sweep.command)
    plot_rows(sweep.cells, sweep.out, sweep.title)
    return rows
