"""The LoRA-aware strategies ranked under non-IID data with heterogeneous ranks.

    .venv/bin/python benchmarks/ranking.py [--rounds N]

Runs ``fedpeft compare compare-noniid`` (MiniLM + LoRA, 10 clients split by
Dirichlet 0.1, all 10 every round, ranks 4/8/16 cycled over the clients, 6 rounds) for
the strategies that take heterogeneous ranks (FLoRA, FlexLoRA, HetLoRA), and ranks them
by final accuracy on the fixed held-out split. Results go to
``benchmarks/results/ranking.{json,md}``; docs/compare-noniid.md explains the scenario.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, save_results  # noqa: E402

SCENARIO = "compare-noniid"
STRATEGIES = ("flora", "flexlora", "hetlora")  # the registry's heterogeneous-rank rules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=0, help="override the scenario's 6")
    args = parser.parse_args()
    command = [
        sys.executable,
        "-m",
        "fedpeft.tools.cli",
        "compare",
        SCENARIO,
        "--strategies",
        ",".join(STRATEGIES),
    ]
    if args.rounds:
        command += ["--set", f"federation.rounds={args.rounds}"]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        proc = subprocess.run([*command, "--out", tmp], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"fedpeft compare failed: {proc.stderr[-2000:]}")
        with open(Path(tmp) / "comparison.csv", newline="") as f:
            table = list(csv.DictReader(f))
        wall = time.perf_counter() - started
    rows = sorted(
        (
            {
                "strategy": r["strategy"],
                "final_accuracy": float(r["final_eval_accuracy_mean"]),
                "best_accuracy": float(r["best_eval_accuracy_mean"]),
                "final_loss": float(r["final_eval_loss_mean"]),
                "megabytes_up": float(r["bytes_up_total_mean"]) / 1e6,
                "megabytes_down": float(r["bytes_down_total_mean"]) / 1e6,
                "wall_seconds": float(r["wall_seconds_mean"]),
            }
            for r in table
            if r["status"] == "ok"
        ),
        key=lambda r: -r["final_accuracy"],
    )
    record = {
        "command": "python benchmarks/ranking.py"
        + (f" --rounds {args.rounds}" if args.rounds else ""),
        "compare": " ".join(["fedpeft", *command[3:]]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "wall_seconds": wall,
        "results": rows,
    }
    save_results("ranking", record, markdown(record))


def markdown(record: dict) -> str:
    lines = [
        "# Strategies ranked under non-IID data with heterogeneous ranks",
        "",
        f"`{record['command']}` (that is, `{record['compare']}`) on {record['machine']}, "
        f"{record['date']}. 10 clients split by Dirichlet 0.1, LoRA ranks 4/8/16, all "
        "clients every round; accuracy on 1,000 fixed held-out glosses "
        "(see docs/compare-noniid.md). One seed.",
        "",
        "| rank | strategy | final accuracy | best accuracy | final loss | MB up | MB down "
        "| wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(record["results"], 1):
        lines.append(
            f"| {i} | {r['strategy']} | {r['final_accuracy']:.4f} | {r['best_accuracy']:.4f} | "
            f"{r['final_loss']:.3f} | {r['megabytes_up']:.1f} | {r['megabytes_down']:.1f} | "
            f"{r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
