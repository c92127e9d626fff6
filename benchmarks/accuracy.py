"""Federated against centralised LoRA at the same number of examples seen.

    .venv/bin/python benchmarks/accuracy.py [--quick]

``quickstart`` (MiniLM, LoRA r=8, 10 clients, 5 per round, 20 local steps of 16
examples) federated with IID, Dirichlet 0.5 and Dirichlet 0.1 partitions, against
centralised training: one client that holds all the data and takes the 5 x 20 steps of a
round itself, for the same rounds. Both see the same number of examples, and both restart
AdamW every round. ``--quick`` runs 2 rounds instead of 6. Results go to
``benchmarks/results/accuracy.{json,md}``. Target (issue 8): federated IID at least 0.95
of centralised.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import fedpeft_run, machine, save_results  # noqa: E402

SCENARIO = "quickstart"
STEPS, PER_ROUND = 20, 5  # quickstart's train.local_steps and federation.clients_per_round
SETTINGS = {
    "centralised": [
        "data.num_clients=1",
        "federation.clients_per_round=1",
        f"train.local_steps={STEPS * PER_ROUND}",
        'data.partitioner="iid"',
    ],
    "federated IID": ['data.partitioner="iid"'],
    "federated Dirichlet 0.5": ['data.partitioner="dirichlet"', "data.alpha=0.5"],
    "federated Dirichlet 0.1": ['data.partitioner="dirichlet"', "data.alpha=0.1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 6")
    args = parser.parse_args()
    rounds = ["federation.rounds=2"] if args.quick else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, sets) in enumerate(SETTINGS.items()):
            summary, metrics, wall = fedpeft_run(SCENARIO, [*sets, *rounds], Path(tmp) / str(i))
            seen = sum(c.get("num-examples", 0) for r in metrics for c in r["client_metrics"])
            accuracy = summary["final"]["eval_accuracy"]
            rows.append(
                {
                    "setting": name,
                    "final_accuracy": accuracy,
                    "examples_seen": seen,
                    "rounds": len(metrics),
                    "wall_seconds": wall,
                    "accuracy_per_round": [r["eval_accuracy"] for r in metrics],
                }
            )
            print(f"{name:26} acc {rows[-1]['final_accuracy']:.4f}  examples {seen}", flush=True)
    central = rows[0]["final_accuracy"]
    for r in rows:
        r["vs_centralised"] = r["final_accuracy"] / central if central else None
    record = {
        "command": "python benchmarks/accuracy.py" + (" --quick" if args.quick else ""),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "results": rows,
    }
    save_results("accuracy", record, markdown(record))


def markdown(record: dict) -> str:
    lines = [
        "# Federated against centralised LoRA, same examples seen",
        "",
        f"`{record['command']}` on {record['machine']}, {record['date']}. `quickstart`; "
        "centralised = one client with all the data taking every round's steps.",
        "",
        "| setting | rounds | examples seen | final accuracy | vs centralised |",
        "|---|---|---|---|---|",
    ]
    for r in record["results"]:
        lines.append(
            f"| {r['setting']} | {r['rounds']} | {r['examples_seen']:,} | "
            f"{r['final_accuracy']:.4f} | {r['vs_centralised']:.3f} |"
        )
    central = record["results"][0].get("accuracy_per_round")
    if central:  # the ratio round by round: does federated catch up as rounds go on?
        rounds = range(1, len(central) + 1)
        lines += [
            "",
            "Accuracy against centralised, round by round:",
            "",
            "| setting | " + " | ".join(f"round {i}" for i in rounds) + " |",
            "|---|" + "---|" * len(central),
        ]
        for r in record["results"][1:]:
            ratios = [
                f / c if c else float("nan")
                for f, c in zip(r["accuracy_per_round"], central, strict=True)
            ]
            lines.append(f"| {r['setting']} | " + " | ".join(f"{x:.3f}" for x in ratios) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
