"""Crash-safe checkpoints: everything a run needs to carry on after round k, written atomically.

After each round the server writes ``checkpoint/`` in the run folder (docs/reliability.md):

- ``arrays.safetensors``: the global adapter after round k;
- ``strategy.pkl``: the strategy object (server optimiser moments, FLoRA's and FedEx-LoRA's
  base delta, ...);
- ``progress.pkl``: the round, the server's RNG states (Flower samples clients with
  ``random``), the metrics rows so far and the privacy books (by partition: node ids are
  new in every attempt, so a resumed run learns them, and each node's rank, afresh);
- ``client_state/`` and ``server_state/``: the per-client store (personal factors,
  error-feedback residuals, the downlink copies). Its files are hard links: a store
  replaces a client's file instead of writing into it, so the links keep round k's
  tensors while round k+1 writes new ones, and a checkpoint costs no copies;
- ``scenario.json``: the resolved scenario, so ``fedpeft run --resume DIR`` needs nothing else.

It is built in ``checkpoint.tmp/`` and swapped in by renames; a crash between the two
renames leaves ``checkpoint.old/``, which :func:`load_checkpoint` falls back to.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy
from safetensors import safe_open
from safetensors.torch import save_file

from fedpeft.codecs import arrayrecord_to_state, state_to_arrayrecord
from fedpeft.config import Scenario, ScenarioError

CHECKPOINT = "checkpoint"
#: per-client folders of a run that a checkpoint restores
STATE_DIRS = ("client_state", "server_state")


@dataclass
class Progress:
    """The run's books after round ``round``."""

    round: int
    run_tag: int  # stamps the client state store (fedpeft.state); kept across a resume
    rows: list[dict[str, Any]]  # metrics.jsonl so far
    initial_metrics: dict[str, float]
    wall_seconds: float  # time spent on the run so far, over every attempt
    privacy: dict[str, Any] = field(default_factory=dict)  # PrivacyGrid.books()
    rng: dict[str, Any] = field(default_factory=dict)
    resumed_after: list[int] = field(default_factory=list)  # rounds earlier attempts resumed at


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    scenario: Scenario
    arrays: ArrayRecord
    strategy: Strategy
    progress: Progress


def rng_states() -> dict[str, Any]:
    """The states of the RNGs the server draws from."""
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` saved."""
    random.setstate(states["random"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def _link_tree(src: Path, dst: Path) -> None:
    """Mirror ``src`` into ``dst`` with hard links (copies where linking is refused)."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link, ignore=shutil.ignore_patterns("*.tmp*"))


def save_checkpoint(
    out_dir: Path,
    scenario: Scenario,
    arrays: ArrayRecord,
    strategy: Strategy,
    progress: Progress,
) -> None:
    """Write the checkpoint of round ``progress.round`` (replacing the previous one)."""
    final, tmp, old = (out_dir / f"{CHECKPOINT}{s}" for s in ("", ".tmp", ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = arrayrecord_to_state(arrays)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(tmp / "arrays.safetensors"),
        metadata={"order": json.dumps(list(state))},
    )
    with (tmp / "strategy.pkl").open("wb") as f:
        pickle.dump(strategy, f)
    with (tmp / "progress.pkl").open("wb") as f:
        pickle.dump(progress, f)
    (tmp / "scenario.json").write_text(scenario.to_json(), encoding="utf-8")
    for name in STATE_DIRS:
        if (out_dir / name).is_dir():
            _link_tree(out_dir / name, tmp / name)
    for path in tmp.iterdir():
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    if final.exists():  # else .old is the last complete one: it stays until tmp is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(out_dir: Path) -> Path | None:
    """The run folder's last complete checkpoint, if it has one."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):  # .old: killed between the two renames
        if (out_dir / name / "progress.pkl").is_file():
            return out_dir / name
    return None


def _read(out_dir: Path) -> tuple[Path, Scenario, Progress]:
    """The last checkpoint's folder, scenario and progress; one line if there is none."""
    where = checkpoint_dir(out_dir)
    if where is None:
        raise ScenarioError(
            f"{out_dir} holds no checkpoint to resume from (a run writes {CHECKPOINT}/ there "
            "after each round it finishes)"
        )
    with (where / "progress.pkl").open("rb") as f:
        progress: Progress = pickle.load(f)  # noqa: S301 - the run folder's own checkpoint
    scenario = Scenario.from_json((where / "scenario.json").read_text(encoding="utf-8"))
    return where, scenario, progress


def checkpointed(out_dir: Path) -> tuple[Scenario, int]:
    """The scenario a run folder was started with and the last round it checkpointed.

    One line (ScenarioError) if the folder has no checkpoint.
    """
    _, scenario, progress = _read(out_dir)
    return scenario, progress.round


def load_checkpoint(out_dir: Path) -> Checkpoint:
    """Load the last checkpoint and put its per-client folders back in the run folder.

    Anything round k+1 wrote to ``client_state/`` and ``server_state/`` before the crash
    is discarded. Only checkpoints written by fedpeft itself should be loaded: the
    strategy is unpickled.
    """
    where, scenario, progress = _read(out_dir)
    with safe_open(str(where / "arrays.safetensors"), framework="pt") as f:
        order = json.loads(f.metadata()["order"])  # the ArrayRecord's own key order
        arrays = state_to_arrayrecord({key: f.get_tensor(key) for key in order})
    with (where / "strategy.pkl").open("rb") as f:
        strategy = pickle.load(f)  # noqa: S301 - the run folder's own checkpoint
    for name in STATE_DIRS:
        shutil.rmtree(out_dir / name, ignore_errors=True)
        if (where / name).is_dir():
            _link_tree(where / name, out_dir / name)
    return Checkpoint(scenario, arrays, strategy, progress)
