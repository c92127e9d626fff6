"""Round latency of a deployment against the same run in simulation.

    .venv/bin/python benchmarks/deploy_latency.py [--rounds 4] [--nodes 2] [--model minilm]

Runs one scenario twice with the same clients, data and rounds: on Flower's Simulation
Engine (``fedpeft run``: Ray workers that live for the whole run) and as a deployment on
127.0.0.1 (``fedpeft deploy local``: a SuperLink, SuperNodes, and a fresh ``flwr-clientapp``
process for every message, as Flower 1.42 runs them). It then times what such a fresh
process pays before it trains, each part apart, with and without the node's partition
cache. Results go to ``benchmarks/results/deploy_latency.{json,md}``; the ratios are
measured within one invocation because absolute times drift on shared machines.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, save_results  # noqa: E402

COLD_START = r"""
import json, sys, tempfile, time
from pathlib import Path
t0 = time.perf_counter()
import fedpeft.clients.app  # everything a flwr-clientapp process imports to serve a message
t1 = time.perf_counter()
from fedpeft.config import load_scenario
from fedpeft.data import client_split, load_task_data
from fedpeft.models import cached_peft_model, load_processor
sc = load_scenario("smoke", json.loads(sys.argv[1]))
names = load_task_data(sc.data).label_names
t2 = time.perf_counter()
cache = Path(sys.argv[2])
client_split(sc.data, sc.seed, 0, cache_dir=cache if sys.argv[3] == "cached" else None)
t3 = time.perf_counter()
load_processor(sc.model)
cached_peft_model(sc.model, sc.peft_for_rank(sc.max_rank), len(names), sc.seed)
t4 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "data_set": t2 - t1, "partition": t3 - t2,
                  "model_and_tokenizer": t4 - t3, "total": t4 - t0}))
"""


def fedpeft(*args: str, cwd: Path) -> float:
    """Run the fedpeft console script; return its wall seconds (fails loudly)."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fedpeft.tools.cli", *args], cwd=cwd, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"fedpeft {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def rounds_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def cold_start(sets: list[str], cached: bool, cache: Path) -> dict[str, float]:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            COLD_START,
            json.dumps(sets),
            str(cache),
            "cached" if cached else "plain",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=HERE.parent,
    )
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the .md from the recorded .json"
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--model", default="minilm")
    args = parser.parse_args()
    if args.render:
        recorded = json.loads((RESULTS / "deploy_latency.json").read_text())
        (RESULTS / "deploy_latency.md").write_text(render(recorded))
        return
    nodes = args.nodes
    sets = [
        f"model.name={args.model}",
        f"federation.rounds={args.rounds}",
        f"data.num_clients={nodes}",
        f"federation.clients_per_round={nodes}",
    ]
    set_args = [a for s in sets for a in ("--set", s)]
    with tempfile.TemporaryDirectory(prefix="fedpeft-latency-") as tmp:
        work = Path(tmp)
        sim_wall = fedpeft("run", "smoke", *set_args, "--out", str(work / "sim"), cwd=work)
        dep_wall = fedpeft(
            "deploy",
            "local",
            "smoke",
            "--nodes",
            str(args.nodes),
            *set_args,
            "--out",
            str(work / "dep"),
            cwd=work,
        )
        sim, dep = rounds_of(work / "sim"), rounds_of(work / "dep")
        deployment = json.loads((work / "dep" / "deploy" / "deployment.json").read_text())
        cache = work / "cache"
        cold = {"uncached": cold_start(sets, False, cache)}
        cold_start(sets, True, cache)  # fills the node's partition cache
        cold["cached"] = cold_start(sets, True, cache)

    def later(rows: list[dict], key: str) -> float:
        return statistics.mean(r[key] for r in rows[1:]) if len(rows) > 1 else rows[0][key]

    def handler(rows: list[dict]) -> float:
        return statistics.mean(c["train_seconds"] for r in rows[1:] for c in r["client_metrics"])

    result = {
        "command": "python benchmarks/deploy_latency.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor()}; "
        f"python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "scenario": "smoke with " + ", ".join(sets),
        "simulation": {
            "wall_seconds": sim_wall,
            "round_seconds_after_first": later(sim, "round_seconds"),
            "client_handler_seconds": handler(sim),
        },
        "deployment": {
            "wall_seconds": dep_wall,
            "round_seconds_after_first": later(dep, "round_seconds"),
            "client_handler_seconds": handler(dep),
            "setup_seconds": deployment["setup_seconds"],
        },
        "clientapp_cold_start_seconds": cold,
    }
    result["overhead_per_round_seconds"] = (
        result["deployment"]["round_seconds_after_first"]
        - result["simulation"]["round_seconds_after_first"]
    )
    result["round_ratio"] = (
        result["deployment"]["round_seconds_after_first"]
        / result["simulation"]["round_seconds_after_first"]
    )
    save_results("deploy_latency", result, render(result))
    print(render(result))


def render(r: dict) -> str:
    sim, dep, cold = r["simulation"], r["deployment"], r["clientapp_cold_start_seconds"]
    rows = "\n".join(
        f"| {part} | {cold['uncached'][part]:.2f} | {cold['cached'][part]:.2f} |"
        for part in ("imports", "data_set", "partition", "model_and_tokenizer", "total")
    )
    return f"""# Deployment round latency against simulation

`{r["command"]}` on {r["machine"]}, {r["date"]}. Scenario: {r["scenario"]}.

| | simulation (Ray) | deployment (127.0.0.1, TLS + node auth) |
|---|---|---|
| seconds per round, after the first | {sim["round_seconds_after_first"]:.2f} | {dep["round_seconds_after_first"]:.2f} |
| client handler seconds (train message) | {sim["client_handler_seconds"]:.2f} | {dep["client_handler_seconds"]:.2f} |
| whole command, seconds | {sim["wall_seconds"]:.1f} | {dep["wall_seconds"]:.1f} (setup {dep["setup_seconds"]:.1f}) |

Deployment costs **{r["overhead_per_round_seconds"]:.2f} s more per round**
({r["round_ratio"]:.2f}x the simulated round).

What a fresh `flwr-clientapp` process pays before it trains (seconds; one process, in order):

| part | first message | later messages (partition cache) |
|---|---|---|
{rows}

Where a deployed round's time goes: Flower 1.42 starts a fresh `flwr-clientapp` process
for every message (no long-lived ClientApp outside its Kubernetes executor), which pays the
imports above, and a SuperNode waits a fixed 3 s between empty pulls. fedpeft cuts what is
its own: the node's partition cache, a lazy flwr-datasets import, memory-mapped weights,
reply polling every 0.05-0.5 s instead of Flower's 3 s (`PollingGrid`), a 0.1 s SuperExec
poll, and one core per node when `deploy local` runs several nodes on one machine.
"""  # noqa: E501


if __name__ == "__main__":
    main()
