"""Server memory and round time against the number of virtual clients.

    .venv/bin/python benchmarks/scale_memory.py [--clients 10,100,1000,10000] [--rounds 3]

Runs ``smoke`` (tiny BERT, LoRA r=4) on Flower's Simulation Engine with 10 clients sampled
per round and a growing federation, twice per size: FedAvg, and FedSA-LoRA with top-k +
int8 error feedback. The second keeps state for every client that has trained (its B
and its residual) in the per-client store under the run folder, not in memory. Each run
is a fresh ``fedpeft run`` process; its ``summary.json`` reports the server process's
peak resident memory (Flower's engine with every virtual node's bookkeeping, the
ServerApp, the server's model). Results go to ``benchmarks/results/scale_memory.{json,md}``.
The target (issue 9) is 10,000 clients within 1.2x the peak memory of 100.
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
    "fedavg": [],
    "fedsa_lora + top-k EF": [
        'strategy.name="fedsa_lora"',
        'compression.uplink=["topk","int8"]',
        "compression.error_feedback=true",
    ],
}


def run(clients: int, rounds: int, sets: list[str], out: Path) -> dict:
    """One ``fedpeft run smoke`` with ``clients`` virtual clients; its numbers."""
    args = [
        f"data.num_clients={clients}",
        "federation.clients_per_round=10",
        f"federation.rounds={rounds}",
        *sets,
    ]
    summary, rows, wall = fedpeft_run("smoke", args, out)
    stored = list((out / "client_state").rglob("*.safetensors"))
    return {
        "clients": clients,
        "server_peak_memory_mb": summary["server_peak_memory_mb"],
        "round_seconds_after_first": sum(r["round_seconds"] for r in rows[1:])
        / max(len(rows) - 1, 1),
        "wall_seconds": wall,
        "client_state_files": len(stored),
        "client_state_mb": sum(p.stat().st_size for p in stored) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100,1000,10000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="which of " + ", ".join(VARIANTS)
    )
    args = parser.parse_args()
    chosen = args.variants.split(",")
    sizes = [int(x) for x in args.clients.split(",")]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, sets in VARIANTS.items():
            if name not in chosen:
                continue
            results[name] = []
            for n in sizes:
                row = run(n, args.rounds, sets, Path(tmp) / f"{name.split()[0]}-{n}")
                results[name].append(row)
                print(
                    f"{name:24} {n:>6} clients: peak {row['server_peak_memory_mb']:.0f} MiB, "
                    f"{row['round_seconds_after_first']:.2f} s/round",
                    flush=True,
                )
    record = {
        "command": "python benchmarks/scale_memory.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "clients_per_round": 10,
        "results": results,
    }
    save_results("scale_memory", record, markdown(record))


def markdown(record: dict) -> str:
    """The results as a table, with each size's memory against 100 clients."""
    lines = [
        "# Server memory against the number of virtual clients",
        "",
        f"`{record['command']}` on {record['machine']}, {record['date']}. `smoke` (tiny BERT, "
        f"LoRA r=4), {record['clients_per_round']} clients per round, {record['rounds']} rounds, "
        "Flower's Simulation Engine. Peak memory is the server process's peak RSS.",
        "",
        "| strategy | clients | server peak MiB | vs 100 clients | s/round after the first "
        "| client state files | client state MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in record["results"].items():
        base = next((r["server_peak_memory_mb"] for r in rows if r["clients"] == 100), None)
        for r in rows:
            ratio = f"{r['server_peak_memory_mb'] / base:.3f}x" if base else "-"
            lines.append(
                f"| {name} | {r['clients']:,} | {r['server_peak_memory_mb']:.0f} | {ratio} | "
                f"{r['round_seconds_after_first']:.2f} | {r['client_state_files']} | "
                f"{r['client_state_mb']:.2f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
