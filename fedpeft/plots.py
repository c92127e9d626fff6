"""Every plot fedpeft draws, as PNG files in a ``plots/`` folder.

One run's curves (:func:`plot_run`, written by the ServerApp) and a comparison's rows
(:func:`plot_curves`, :func:`plot_points`, written by ``fedpeft compare``) share the
backend, the cumulative-megabytes axis and the way a figure is saved. They take plain
numbers, never a tool's objects, so the core draws what any command hands it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLOTS_DIR = "plots"


def _pyplot() -> Any:
    """Matplotlib's pyplot on the Agg backend: files only, no window, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Lay ``fig`` out, write it to ``path`` at 100 dpi and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def cumulative_megabytes(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[float]:
    """Per row, the megabytes of ``keys`` (e.g. ``bytes_up``) in it and every row before."""
    cumulative, total = [], 0.0
    for row in rows:
        total += sum(row.get(key, 0) for key in keys)
        cumulative.append(total / 1e6)
    return cumulative


# ---------------------------------------------------------------------------- one run


def plot_run(
    out_dir: Path, rows: Sequence[dict[str, Any]], initial: dict[str, Any] | None, title: str = ""
) -> list[Path]:
    """Write PNG plots of the run's metrics against rounds and against cumulative megabytes."""
    plots = out_dir / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    if not rows:
        return []
    rounds = [0] + [r["round"] for r in rows] if initial else [r["round"] for r in rows]

    def series(key: str) -> list[float]:
        head = [initial[key]] if initial and key in initial else []
        return head + [r.get(key) for r in rows]

    return [
        _plot_metrics_vs_round(plots, rows, rounds, series, title),
        _plot_run_accuracy_vs_megabytes(plots, rows, series("eval_accuracy"), initial, title),
    ]


def _plot_metrics_vs_round(
    plots: Path, rows: Sequence[dict[str, Any]], rounds: list[int], series: Any, title: str
) -> Path:
    """Held-out accuracy, and eval and train loss, against rounds: two panels side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(rounds, series("eval_accuracy"), marker="o")
    axes[0].set(xlabel="round", ylabel="eval_accuracy", title="held-out accuracy")
    axes[1].plot(rounds, series("eval_loss"), marker="o", label="eval_loss")
    train_rounds = [r["round"] for r in rows if r.get("train_loss") is not None]
    axes[1].plot(
        train_rounds,
        [r["train_loss"] for r in rows if r.get("train_loss") is not None],
        marker="s",
        label="train_loss",
    )
    axes[1].set(xlabel="round", ylabel="loss", title="loss")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, plots / "metrics_vs_round.png")


def _plot_run_accuracy_vs_megabytes(
    plots: Path,
    rows: Sequence[dict[str, Any]],
    accuracy: list[float],
    initial: dict[str, Any] | None,
    title: str,
) -> Path:
    """Accuracy against cumulative megabytes: both ways, uplink and downlink, a line each."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, keys in (
        ("up + down", ("bytes_up", "bytes_down")),
        ("uplink", ("bytes_up",)),
        ("downlink", ("bytes_down",)),
    ):
        cumulative = cumulative_megabytes(rows, keys)
        xs = ([0.0] + cumulative) if initial else cumulative
        ax.plot(xs, accuracy, marker="o", label=label)
    heading = f"{title}\naccuracy vs communication" if title else "accuracy vs communication"
    ax.set(xlabel="cumulative MB (all clients)", ylabel="eval_accuracy", title=heading)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, plots / "accuracy_vs_megabytes.png")


# ---------------------------------------------------------------------------- several runs


@dataclass
class Curve:
    """One line of a comparison: per round, accuracy and cumulative megabytes (means)."""

    label: str
    rounds: list[int]
    accuracy: list[float]
    megabytes: list[float]  # up + down, all clients
    uplink_megabytes: list[float]


#: the comparison's curve plots: (file name, x axis label, the Curve field on the x axis)
_CURVE_PLOTS = (
    ("accuracy_vs_round.png", "round", "rounds"),
    (
        "accuracy_vs_megabytes.png",
        "cumulative MB (up + down, all clients; log)",
        "megabytes",
    ),
    (
        "accuracy_vs_uplink_megabytes.png",
        "cumulative uplink MB (all clients; log)",
        "uplink_megabytes",
    ),
)


def plot_curves(curves: Sequence[Curve], plots: Path, title: str = "") -> list[Path]:
    """Write accuracy against rounds, cumulative MB (up + down) and cumulative uplink MB.

    One line per curve; the megabyte axes are logarithmic, since traffic differs by orders
    of magnitude between the rows of a comparison.
    """
    plt = _pyplot()
    written = []
    for name, xlabel, field in _CURVE_PLOTS:
        fig, ax = plt.subplots(figsize=(9, 4))
        for curve in curves:
            ax.plot(getattr(curve, field), curve.accuracy, marker="o", label=curve.label)
        ax.set(xlabel=xlabel, ylabel="eval_accuracy (mean over seeds)", title=title)
        if "MB" in xlabel:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # beside the axes, never over the curves
            ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
        written.append(_save(fig, plots / name))
    return written


def plot_points(points: Sequence[tuple[str, float, float]], plots: Path, title: str = "") -> Path:
    """Scatter final accuracy against uplink bytes per client-round, a labelled point each.

    ``points`` holds (label, bytes, accuracy). The x axis is logarithmic: methods differ by
    orders of magnitude.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, x, y in points:
        ax.scatter([x], [y])
        ax.annotate(label, (x, y), fontsize="x-small", xytext=(3, 3), textcoords="offset points")
    ax.set(
        xscale="log",
        xlabel="uplink bytes per client-round (log)",
        ylabel="final eval_accuracy (mean over seeds)",
        title=title,
    )
    ax.grid(alpha=0.3)
    return _save(fig, plots / "accuracy_vs_bytes_per_client_round.png")
