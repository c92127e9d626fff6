"""Round latency of a deployment against the same run in simulation.

    .venv/bin/python benchmarks/deploy_latency.py [--rounds 4] [--nodes 2] [--model minilm]

Runs one scenario with the same clients, data and rounds on Flower's Simulation Engine
(``fedpeft run``: Ray workers that live for the whole run) and as deployments on 127.0.0.1
(``fedpeft deploy local``: a SuperLink and SuperNodes): with each node's long-lived
trainer running the node's tasks itself (the default: ``--isolation process``, no process
per message), the same with a 0.2 s wait between a node's empty pulls
(``--poll-interval 0.2``; Flower's is a fixed 3 s), with ``--forwarder`` (Flower starts a
``flwr-clientapp`` process per message, which forwards it to the trainer), and with
``--no-trainer`` (that process loads the model itself). It then times what a fresh process pays:
the whole ClientApp's imports and loads, and the forwarder's own cost. Results go to
``benchmarks/results/deploy_latency.{json,md}``; the differences are measured within one
invocation because absolute times drift on shared machines.
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


FORWARDER = r"""
import json, sys, tempfile, threading, time
from pathlib import Path
t00 = time.perf_counter()
import flwr.supernode.cli  # what Flower's flwr-clientapp process imports before any app
t0 = time.perf_counter()
import fedpeft.clients.forwarder as forwarder  # what the app adds to it, with a trainer
t1 = time.perf_counter()
assert "torch" not in sys.modules, "the forwarder imported torch"
from flwr.app import ConfigRecord, Context, Message, RecordDict
from fedpeft import records
from fedpeft.clients.channel import private_socket_path
from fedpeft.clients.trainer import Trainer
from fedpeft.config import load_scenario
from fedpeft.strategies.testing import ensure_task_identity
ensure_task_identity()
sock = private_socket_path(Path(tempfile.mkdtemp(prefix="fedpeft-bench-")))
trainer = Trainer(sock, 600)
threading.Thread(target=trainer.serve_forever, daemon=True).start()
sc = load_scenario("smoke", json.loads(sys.argv[1]))
content = RecordDict({records.CONFIG: ConfigRecord({records.SCENARIO: sc.to_json()})})
node = {records.NODE_PARTITION_ID: 0, records.NODE_NUM_PARTITIONS: 2}
times = []
for _ in range(20):
    msg = Message(content, dst_node_id=1, message_type="query")
    msg.metadata.__dict__.update(_message_id="m", _run_id=1)
    ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    t = time.perf_counter()
    forwarder.ask_trainer(sock, msg, ctx)
    times.append(time.perf_counter() - t)
print("RESULT", json.dumps({"flower_imports": t0 - t00, "imports": t1 - t0,
                            "exchange": sorted(times)[len(times) // 2]}))
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
    variants = {
        "trainer": [],
        "trainer, --poll-interval 0.2": ["--poll-interval", "0.2"],
        "trainer, --forwarder": ["--forwarder"],
        "--no-trainer": ["--no-trainer"],
    }
    with tempfile.TemporaryDirectory(prefix="fedpeft-latency-") as tmp:
        work = Path(tmp)
        sim_wall = fedpeft("run", "smoke", *set_args, "--out", str(work / "sim"), cwd=work)
        sim = rounds_of(work / "sim")
        deployments = {}
        for i, (name, options) in enumerate(variants.items()):
            out = work / f"dep{i}"
            wall = fedpeft(
                "deploy", "local", "smoke", "--nodes", str(nodes), *options, *set_args,
                "--out", str(out), cwd=work,
            )  # fmt: skip
            deployments[name] = deployment_result(rounds_of(out), out, wall, sim)
        cache = work / "cache"
        cold = {"uncached": cold_start(sets, False, cache)}
        cold_start(sets, True, cache)  # fills the node's partition cache
        cold["cached"] = cold_start(sets, True, cache)
        forwarder = forwarder_cost(sets)

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
        "deployments": deployments,
        # the default deployment (with trainers), as the acceptance figures read it
        "extra_seconds_per_round": deployments["trainer"]["extra_seconds_per_round"],
        "model_loads_per_node": deployments["trainer"]["model_loads_per_node"],
        "forwarder_seconds_per_message": forwarder,
        "clientapp_cold_start_seconds": cold,
    }
    save_results("deploy_latency", result, render(result))
    print(render(result))


def later(rows: list[dict], key: str) -> float:
    """Mean of ``key`` over the rounds after the first (the first loads models)."""
    return statistics.mean(r[key] for r in rows[1:]) if len(rows) > 1 else rows[0][key]


def handler(rows: list[dict]) -> float:
    """Mean seconds of the training handler, over the rounds after the first."""
    return statistics.mean(c["train_seconds"] for r in rows[1:] for c in r["client_metrics"])


def deployment_result(rows: list[dict], out: Path, wall: float, sim: list[dict]) -> dict:
    """One deployment's figures, against the simulated run ``sim``."""
    record = json.loads((out / "deploy" / "deployment.json").read_text())
    loads: dict[int, int] = {}
    for row in rows:
        for c in row["client_metrics"]:
            loads[c["partition-id"]] = max(loads.get(c["partition-id"], 0), c["model_loads"])
    per_round = later(rows, "round_seconds")
    return {
        "wall_seconds": wall,
        "setup_seconds": record["setup_seconds"],
        "round_seconds_after_first": per_round,
        "client_handler_seconds": handler(rows),
        "extra_seconds_per_round": per_round - later(sim, "round_seconds"),
        "round_ratio": per_round / later(sim, "round_seconds"),
        # a process without a trainer loads once per message: count the messages then
        "model_loads_per_node": max(loads.values()) if record.get("trainers") else len(rows),
    }


def forwarder_cost(sets: list[str]) -> dict[str, float]:
    """What the forwarder costs a message: its imports, and one exchange with a trainer."""
    proc = subprocess.run(
        [sys.executable, "-c", FORWARDER, json.dumps(sets)],
        capture_output=True,
        text=True,
        check=True,
        cwd=HERE.parent,
    )
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    result: dict[str, float] = json.loads(line.removeprefix("RESULT "))
    return result


def render(r: dict) -> str:
    sim, cold, fwd = (
        r["simulation"],
        r["clientapp_cold_start_seconds"],
        r["forwarder_seconds_per_message"],
    )
    rows = "\n".join(
        f"| {part} | {cold['uncached'][part]:.2f} | {cold['cached'][part]:.2f} |"
        for part in ("imports", "data_set", "partition", "model_and_tokenizer", "total")
    )
    deployed = "\n".join(
        f"| deployment, {name} | {d['round_seconds_after_first']:.2f} | "
        f"{d['extra_seconds_per_round']:+.2f} | {d['round_ratio']:.2f}x | "
        f"{d['client_handler_seconds']:.2f} | {d['model_loads_per_node']} | "
        f"{d['wall_seconds']:.1f} (setup {d['setup_seconds']:.1f}) |"
        for name, d in r["deployments"].items()
    )
    return f"""# Deployment round latency against simulation

`{r["command"]}` on {r["machine"]}, {r["date"]}. Scenario: {r["scenario"]}.

| engine | seconds per round, after the first | extra vs simulation | ratio | train handler seconds | model loads per node | whole command, seconds |
|---|---|---|---|---|---|---|
| simulation (Ray) | {sim["round_seconds_after_first"]:.2f} | | | {sim["client_handler_seconds"]:.2f} | 1 | {sim["wall_seconds"]:.1f} |
{deployed}

With its trainer running the node's tasks, a deployed round costs
**{r["extra_seconds_per_round"]:.2f} s more** than a simulated one and each node loads its
model **{r["model_loads_per_node"]}** time(s) per run. No process starts per message: the
trainer acquires each task from its SuperNode (`flower-supernode --isolation process`)
and runs it in place. It asks for the task's message while the node is still fetching
the message's objects, and retries after 0.05 s where Flower's own pull waits 1 s (that
wait cost about a second per message). Each message's adapter crosses every hop as one
Array (`fedpeft/codecs/packing.py`) instead of an HTTP request per tensor. What remains is
mostly Flower's own waits. A SuperNode pulls again as soon as it has pushed its reply,
finds nothing (the server is still aggregating and evaluating) and sleeps a fixed 3 s,
so the next message waits out the rest of that sleep (`--poll-interval` shortens it; its
row is one invocation, and rounds scatter by about half a second). The node also waits
for a task's reply in 0.5 s steps.

With `--forwarder`, Flower starts a fresh `flwr-clientapp` process per message (its
start, its imports, the FAB it unpacks, the task it pulls and pushes, and
`flower-superexec`'s 1 s between polls); the forwarder adds {fwd["imports"]:.2f} s of
imports (no torch, no transformers) to the {fwd["flower_imports"]:.2f} s that Flower's
process imports before it loads any app, and hands a message to the trainer and back in
{fwd["exchange"] * 1000:.1f} ms. Two nodes and the server share this machine's 2 cores.

Without a trainer (`--no-trainer`), each fresh `flwr-clientapp` process pays this before
it trains (seconds; one process, in order):

| part | first message | later messages (partition cache) |
|---|---|---|
{rows}
"""  # noqa: E501


if __name__ == "__main__":
    main()
