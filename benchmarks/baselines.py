"""What a user would pick instead: plain FedAvg of the full model against fedpeft's options.

    .venv/bin/python benchmarks/baselines.py [--quick]

Runs one scenario (``quickstart``; ``--quick``: ``smoke``) four or more ways, with the
same data, clients, rounds and local steps:

- full fine-tuning with plain FedAvg (``peft.method = "full"``: every weight trains and
  travels, the quickstart-pytorch way), at its own usual learning rate, 5e-5
  (transformers' ``Trainer`` default): at LoRA's 5e-3, full fine-tuning of quickstart's
  MiniLM collapses to one class (0.141 accuracy after 6 rounds, measured);
- LoRA with FedIT (weighted averaging of the adapter);
- LoRA with top-k 10% + int8 uplink and error feedback;
- LoRA with PEFT-aware strategies (FFA-LoRA, FlexLoRA, FedEx-LoRA; ``--quick``: FFA-LoRA),
  the best of them reported.

For each it reports bytes per client per round (up and down), final accuracy, wall time,
and peak memory (the server process, and the largest client process). Results go to
``benchmarks/results/baselines.{json,md}``.
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

VARIANTS = {
    "full fine-tuning, FedAvg": ['peft.method="full"', "train.lr=5e-5"],
    "LoRA, FedIT": [],
    "LoRA + top-k 10% + int8 + EF": [
        'compression.uplink=["topk","int8"]',
        "compression.error_feedback=true",
    ],
    "LoRA, FFA-LoRA": ['strategy.name="ffa_lora"'],
    "LoRA, FlexLoRA": ['strategy.name="flexlora"'],
    "LoRA, FedEx-LoRA": ['strategy.name="fedex_lora"'],
}
QUICK = (
    "full fine-tuning, FedAvg",
    "LoRA, FedIT",
    "LoRA + top-k 10% + int8 + EF",
    "LoRA, FFA-LoRA",
)


def measure(scenario: str, name: str, sets: list[str], out: Path) -> dict:
    summary, rows, wall = fedpeft_run(scenario, sets, out)
    replies = sum(r["clients_sampled"] - r["clients_failed"] for r in rows)
    sent = sum(r["clients_sampled"] for r in rows)
    clients = [c.get("peak_memory_mb", 0.0) for r in rows for c in r["client_metrics"]]
    return {
        "variant": name,
        "final_accuracy": summary["final"].get("eval_accuracy"),
        "bytes_up_per_client_round": summary["bytes_up_total"] / max(replies, 1),
        "bytes_down_per_client_round": summary["bytes_down_total"] / max(sent, 1),
        "trainable_params": summary["trainable_params"],
        "wall_seconds": wall,
        "server_peak_memory_mb": summary["server_peak_memory_mb"],
        "client_peak_memory_mb": max(clients, default=0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke instead of quickstart")
    args = parser.parse_args()
    scenario = "smoke" if args.quick else "quickstart"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, sets) in enumerate(VARIANTS.items()):
            if args.quick and name not in QUICK:
                continue
            rows.append(measure(scenario, name, sets, Path(tmp) / str(i)))
            last = rows[-1]
            print(
                f"{name:32} acc {last['final_accuracy']:.4f}  up "
                f"{last['bytes_up_per_client_round']:,.0f} B  {last['wall_seconds']:.0f} s",
                flush=True,
            )
    record = {
        "command": "python benchmarks/baselines.py" + (" --quick" if args.quick else ""),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "scenario": scenario,
        "results": rows,
    }
    save_results("baselines", record, markdown(record))


def markdown(record: dict) -> str:
    rows = record["results"]
    full = next(r for r in rows if r["variant"].startswith("full"))
    aware = [r for r in rows if r["variant"].startswith("LoRA, ") and "FedIT" not in r["variant"]]
    best = max(aware, key=lambda r: r["final_accuracy"] or 0.0, default=None)
    lines = [
        "# Against plain Flower FedAvg of the full model",
        "",
        f"`{record['command']}` on {record['machine']}, {record['date']}. Scenario "
        f"`{record['scenario']}`; bytes are per client per round, on the wire.",
        "",
        "| variant | final accuracy | trainable params | up B | down B | up vs full | wall s "
        "| server peak MiB | client peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " (best PEFT-aware)" if best is r else ""
        lines.append(
            f"| {r['variant']}{mark} | {r['final_accuracy']:.4f} | {r['trainable_params']:,} | "
            f"{r['bytes_up_per_client_round']:,.0f} | {r['bytes_down_per_client_round']:,.0f} | "
            f"{full['bytes_up_per_client_round'] / r['bytes_up_per_client_round']:.0f}x less | "
            f"{r['wall_seconds']:.0f} | {r['server_peak_memory_mb']:.0f} | "
            f"{r['client_peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
