"""What every benchmark script shares: where results go and how they are written."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """The machine a result was measured on, in one line."""
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{platform.platform()}, {psutil.cpu_count()} CPUs, {memory:.0f} GiB, "
        f"Python {platform.python_version()}"
    )


def save_results(name: str, record: dict, markdown: str) -> None:
    """Write ``results/<name>.json`` and ``.md`` (``fedpeft bench`` reads both).

    Under ``fedpeft bench --quick`` (``FEDPEFT_BENCH_QUICK=1``) the files are
    ``<name>.quick.json`` and ``.md``, so a quick run never replaces a full one's results.
    """
    import os

    stem = f"{name}.quick" if os.environ.get("FEDPEFT_BENCH_QUICK") == "1" else name
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown)
    print(f"wrote {RESULTS / stem}.{{json,md}}")


def fedpeft_run(scenario: str, sets: list[str], out: Path) -> tuple[dict, list[dict], float]:
    """``fedpeft run SCENARIO --set ...`` in a fresh process: (summary, metrics rows, wall s)."""
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "fedpeft.tools.cli", "run", scenario, "--out", str(out)]
    for item in sets:
        command += ["--set", item]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=7200)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"fedpeft run {scenario} {sets} failed: {proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, wall
