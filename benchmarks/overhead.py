"""What fedpeft costs over the training it runs: a federated run against a plain loop.

    .venv/bin/python benchmarks/overhead.py [--scenario quickstart]

1. ``fedpeft run SCENARIO`` in a fresh process (Flower's Simulation Engine on Ray),
   timed from the command to its exit. Its metrics give each round's seconds.
2. The same local training in a plain in-process loop, with no Flower and no Ray. It
   uses the same model, data partitions, sampled-client count, local steps, batch size
   and seeds. Each client trains from the global adapter (``fedpeft.train.train_steps``),
   the loop averages the clients' states weighted by examples seen, and it evaluates on
   the same held-out split every round.

Both run as fresh processes, timed from the command to the exit. The ratios are taken
within one invocation: end to end, and per round after the first.
The parts: start-up (command to round 0), evaluation, and serialization of every
message's adapter (Flower's wire format, both ways, timed apart). Results go to
``benchmarks/results/overhead.{json,md}``. Targets (issue 8): at most 1.25x end to end,
and at most 5% per round after the first.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from common import fedpeft_run, machine, save_results  # noqa: E402


def federated(scenario: str, sets: list[str], out: Path) -> dict:
    """``fedpeft run`` in a fresh process: wall time and per-round seconds."""
    summary, rows, wall = fedpeft_run(scenario, sets, out)
    return {
        "wall_seconds": wall,
        "round_seconds": [r["round_seconds"] for r in rows],
        "eval_accuracy": summary["final"].get("eval_accuracy"),
    }


def plain_loop(scenario_name: str, sets: list[str]) -> dict:
    """The same rounds of local training and evaluation, in one process, no framework."""
    started = time.perf_counter()
    import torch

    from fedpeft.adapters import get_adapter_state, set_adapter_state, set_trainable
    from fedpeft.config import load_scenario
    from fedpeft.data import client_split, eval_split, load_task_data
    from fedpeft.models import cached_peft_model, load_processor, resolve_device
    from fedpeft.train import evaluate, scenario_collate, train_steps

    sc = load_scenario(scenario_name, sets)
    data = load_task_data(sc.data)
    test = eval_split(sc.data)
    device = resolve_device(sc.model.device)
    model = cached_peft_model(sc.model, sc.peft_for_rank(sc.max_rank), data.num_labels, sc.seed)
    model.to(device)
    processor = load_processor(sc.model)
    collate = scenario_collate(sc)
    random.seed(sc.seed)
    torch.manual_seed(sc.seed)
    evaluate(model, sc, test, processor=processor, device=device)  # round 0
    global_state = {k: v.clone() for k, v in get_adapter_state(model).items()}
    setup = time.perf_counter() - started
    rounds, evals = [], []
    t = sc.train
    for server_round in range(1, sc.federation.rounds + 1):
        round_started = time.perf_counter()
        chosen = random.sample(range(sc.data.num_clients), sc.federation.clients_per_round)
        states, weights = [], []
        for partition in chosen:
            set_adapter_state(model, global_state)
            set_trainable(model, None)
            train_part, _ = client_split(sc.data, sc.seed, partition)
            result = train_steps(
                model,
                collate,
                train_part,
                steps=t.local_steps,
                batch_size=t.batch_size,
                lr=t.lr,
                seed=(sc.seed * 1_000_003 + server_round) * 10_007 + partition,
                weight_decay=t.weight_decay,
                max_grad_norm=t.max_grad_norm,
                device=device,
                precision=t.precision,
            )
            states.append({k: v.detach().clone() for k, v in get_adapter_state(model).items()})
            weights.append(result.num_examples)
        total = sum(weights)
        global_state = {
            k: sum(w * s[k].double() for s, w in zip(states, weights, strict=True)) / total
            for k in states[0]
        }
        global_state = {k: v.float() for k, v in global_state.items()}
        set_adapter_state(model, global_state)
        eval_started = time.perf_counter()
        metrics = evaluate(model, sc, test, processor=processor, device=device)
        evals.append(time.perf_counter() - eval_started)
        rounds.append(time.perf_counter() - round_started)
    return {
        "wall_seconds": time.perf_counter() - started,
        "setup_seconds": setup,
        "round_seconds": rounds,
        "eval_seconds": evals,
        "eval_accuracy": metrics["eval_accuracy"],
    }


def serialization(scenario_name: str) -> dict:
    """Seconds to serialize and parse one adapter message, as Flower's wire format does."""
    from flwr.app import RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from fedpeft import records
    from fedpeft.codecs import arrayrecord_to_state, state_to_arrayrecord
    from fedpeft.config import load_scenario
    from fedpeft.data import load_task_data
    from fedpeft.models import initial_adapter_state

    sc = load_scenario(scenario_name)
    state = initial_adapter_state(
        sc.model, sc.peft_for_rank(sc.max_rank), load_task_data(sc.data).num_labels, sc.seed
    )
    repeats = 20
    started = time.perf_counter()
    for _ in range(repeats):
        content = RecordDict({records.ARRAYS: state_to_arrayrecord(state)})
        # every object the wire carries: the record and each of its arrays
        blobs = [obj.deflate() for obj in get_all_nested_objects(content).values()]
        arrayrecord_to_state(content.array_records[records.ARRAYS])
    per_message = (time.perf_counter() - started) / repeats
    return {
        "seconds_per_message": per_message,
        "bytes": sum(len(b) for b in blobs),
        "messages_per_round": 2 * sc.federation.clients_per_round,
    }


def plain_process(scenario: str, sets: list[str]) -> dict:
    """:func:`plain_loop` in a fresh process, timed from its command to its exit like
    ``fedpeft run`` (so both pay Python's start-up and the library imports)."""
    started = time.perf_counter()
    rounds = [f"--rounds={s.split('=')[1]}" for s in sets]
    proc = subprocess.run(
        [sys.executable, __file__, "--scenario", scenario, *rounds, "--plain"],
        capture_output=True,
        text=True,
        timeout=7200,
    )
    if proc.returncode:
        raise SystemExit(f"plain loop failed: {proc.stderr[-2000:]}")
    result: dict = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="quickstart")
    parser.add_argument("--rounds", type=int, help="override federation.rounds")
    parser.add_argument("--plain", action="store_true", help="run only the plain loop (JSON)")
    args = parser.parse_args()
    sets = [f"federation.rounds={args.rounds}"] if args.rounds else []
    if args.plain:
        print(json.dumps(plain_loop(args.scenario, sets)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        fed = federated(args.scenario, sets, Path(tmp) / "run")
    plain = plain_process(args.scenario, sets)
    ser = serialization(args.scenario)
    later_fed = sum(fed["round_seconds"][1:]) / max(len(fed["round_seconds"]) - 1, 1)
    later_plain = sum(plain["round_seconds"][1:]) / max(len(plain["round_seconds"]) - 1, 1)
    record = {
        "command": "python benchmarks/overhead.py --scenario "
        + args.scenario
        + (f" --rounds {args.rounds}" if args.rounds else ""),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "federated": fed,
        "plain": plain,
        "serialization": ser,
        "end_to_end_ratio": fed["wall_seconds"] / plain["wall_seconds"],
        "later_round_ratio": later_fed / later_plain,
        "startup_seconds": fed["wall_seconds"] - sum(fed["round_seconds"]),
    }
    save_results("overhead", record, markdown(record))
    print(markdown(record))


def markdown(r: dict) -> str:
    """The comparison as a table, with the targets."""
    fed, plain, ser = r["federated"], r["plain"], r["serialization"]
    later = (
        sum(fed["round_seconds"][1:]) / max(len(fed["round_seconds"]) - 1, 1),
        sum(plain["round_seconds"][1:]) / max(len(plain["round_seconds"]) - 1, 1),
    )
    eval_s = sum(plain["eval_seconds"]) / len(plain["eval_seconds"])
    ser_round = ser["seconds_per_message"] * ser["messages_per_round"]
    e2e, per_round = r["end_to_end_ratio"], r["later_round_ratio"]
    return "\n".join(
        [
            "# Framework overhead: fedpeft against a plain training loop",
            "",
            f"`{r['command']}` on {r['machine']}, {r['date']}.",
            "",
            "| | fedpeft (Flower simulation, Ray) | plain loop | ratio | target |",
            "|---|---|---|---|---|",
            f"| end to end, s | {fed['wall_seconds']:.1f} | {plain['wall_seconds']:.1f} | "
            f"{e2e:.2f}x | <= 1.25x: {'met' if e2e <= 1.25 else 'not met'} |",
            f"| start-up to round 1, s | {r['startup_seconds']:.1f} | "
            f"{plain['setup_seconds']:.1f} | | |",
            f"| round 1, s | {fed['round_seconds'][0]:.2f} | {plain['round_seconds'][0]:.2f} | | |",
            f"| later rounds, mean s | {later[0]:.2f} | {later[1]:.2f} | {per_round:.3f}x | "
            f"<= 1.05x: {'met' if per_round <= 1.05 else 'not met'} |",
            f"| evaluation per round, s | | {eval_s:.2f} | | |",
            f"| serialization per round, s ({ser['messages_per_round']} messages of "
            f"{ser['bytes']:,} B) | {ser_round:.3f} | - | | |",
            f"| final eval accuracy | {fed['eval_accuracy']} | {plain['eval_accuracy']:.4f} | | |",
            "",
        ]
    )


if __name__ == "__main__":
    main()
