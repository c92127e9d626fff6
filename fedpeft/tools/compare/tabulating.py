"""Tabulating a ``fedpeft compare`` sweep: a row per strategy and ``--vary`` values, and plots.

These functions only read run folders (``summary.json``, ``metrics.jsonl``), so they work
on any folders of that format, finished or not.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedpeft.plots import PLOTS_DIR, Curve, cumulative_megabytes, plot_curves, plot_points
from fedpeft.report import SUMMARY_FILE, read_metrics
from fedpeft.tools.compare.planning import Cell

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
#: row keys that are not part of a row's label in the plots
_NOT_LABEL = {"seeds", "status", *STAT_COLUMNS}


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
        rows = read_metrics(cell.out_dir)
        both = cumulative_megabytes(rows, ("bytes_up", "bytes_down"))
        uplink = cumulative_megabytes(rows, ("bytes_up",))
        for r, total, up in zip(rows, both, uplink, strict=True):
            if isinstance(r.get("eval_accuracy"), int | float):
                acc.setdefault(r["round"], []).append(float(r["eval_accuracy"]))
                mb.setdefault(r["round"], []).append(total)
                up_mb.setdefault(r["round"], []).append(up)
    rounds = sorted(acc)

    def mean(d: dict[int, list[float]]) -> list[float]:
        return [sum(d[r]) / len(d[r]) for r in rounds]

    return rounds, mean(acc), mean(mb), mean(up_mb)


def plot_rows(cells: Sequence[Cell], out_dir: Path, title: str = "") -> list[Path]:
    """Write the comparison's plots: final accuracy against uplink bytes, then curves.

    The curves are accuracy against rounds, cumulative MB (up + down) and cumulative uplink
    MB. One point or line per table row (mean over its ok seeds), labelled by strategy and
    vary values.
    """
    plots = out_dir / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    points = []
    for row in summarise_cells(cells):
        x, y = row["bytes_up_per_client_round_mean"], row["final_eval_accuracy_mean"]
        if x and y is not None:
            points.append((" ".join(str(v) for k, v in row.items() if k not in _NOT_LABEL), x, y))
    written = [plot_points(points, plots, title)]
    return written + plot_curves(_curves(cells), plots, title)


def _curves(cells: Sequence[Cell]) -> list[Curve]:
    """A curve per table row that has a finished round; one strategy: labelled by values."""
    strategies = {c.strategy for c in cells}
    curves = []
    for members in _groups(cells).values():
        rounds, acc, mb, up = _mean_curve([c for c in members if c.ok])
        if rounds:
            label = members[0].label
            if len(strategies) == 1:  # one strategy: the vary values tell the rows apart
                label = label.removeprefix(members[0].strategy).strip() or label
            curves.append(Curve(label, rounds, acc, mb, up))
    return curves
