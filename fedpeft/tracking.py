"""Each round's metrics to TensorBoard and Weights & Biases, besides metrics.jsonl.

Both are optional (``pip install 'fedpeft[tracking]'``) and off by default; the scenario's
``[report]`` section turns them on. ``tensorboard = true`` writes event files under
``OUT/tb/``; ``wandb = "offline"`` writes a W&B run folder under ``OUT/wandb/`` (``wandb
sync`` uploads it later), ``"online"`` logs to the W&B server as the run goes. Each round is
one step: every number of its metrics.jsonl row by name, and every client's numbers as
``client/<partition>/<metric>``; step 0 holds the initial adapter's evaluation.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from fedpeft.config import ReportSection, ScenarioError

TB_DIR = "tb"
WANDB_DIR = "wandb"


def check_tracking(report: ReportSection) -> None:
    """Refuse, in one line and before any round, a tracker whose package is missing."""
    for wanted, package, key in (
        (report.tensorboard, "tensorboard", "report.tensorboard=true"),
        (report.wandb != "off", "wandb", f"report.wandb={report.wandb!r}"),
    ):
        if wanted and importlib.util.find_spec(package) is None:
            raise ScenarioError(
                f"{key} needs the {package} package, which is not installed: "
                "pip install 'fedpeft[tracking]'"
            )


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl row, clients' under ``client/<partition>/<metric>``."""
    out = {key: float(value) for key, value in row.items() if key != "round" and _is_number(value)}
    for client in row.get("client_metrics", []):
        partition = client.get("partition-id")
        if not _is_number(partition):
            continue
        for key, value in client.items():
            if key != "partition-id" and _is_number(value):
                out[f"client/{int(partition)}/{key}"] = float(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Trackers:
    """The trackers ``report`` turns on, for the run writing to ``out_dir``."""

    def __init__(self, report: ReportSection, out_dir: Path, config: dict[str, Any]) -> None:
        check_tracking(report)
        self.writers: list[Any] = []
        self.run: Any = None
        if report.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writers.append(SummaryWriter(log_dir=str(out_dir / TB_DIR)))
        if report.wandb != "off":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=report.wandb_project,
                name=report.wandb_run_name or out_dir.name,
                mode=report.wandb,
                dir=str(out_dir),
                config=config,
                settings=wandb.Settings(console="off", silent=True),
            )

    def log(self, step: int, values: dict[str, float]) -> None:
        """Record ``values`` at round ``step``, written out at once."""
        for writer in self.writers:
            for key, value in values.items():
                writer.add_scalar(key, value, global_step=step)
            writer.flush()
        if self.run is not None:
            self.run.log(values, step=step)

    def close(self) -> None:
        """Close the event files and finish the W&B run."""
        for writer in self.writers:
            writer.close()
        if self.run is not None:
            self.run.finish()
