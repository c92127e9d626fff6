"""Top-k 10% + int8 with error feedback against uncompressed LoRA on quickstart, per seed.

    .venv/bin/python docs/dev/compression_seeds.py [--seeds 0,1,2] [--out runs/seeds]

Runs ``quickstart`` three ways per seed (uncompressed; top-k ranked by magnitude; top-k
ranked by change x mean gradient, the default) through the in-process Grid (the real
server, strategy and ClientApp, without Ray: about 3 minutes a run on 2 cores), and
prints the final accuracies and the gaps as a markdown table. The in-process Grid numbers
its nodes in partition order, so its client draws differ from a Ray run's with the same
seed: compare rows with each other, not with ``fedpeft run``'s numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fedpeft.clients.app import app  # noqa: E402
from fedpeft.config import load_scenario  # noqa: E402
from fedpeft.server.inprocess import InProcessGrid  # noqa: E402
from fedpeft.server.run import run_federation  # noqa: E402

TOPK = ['compression.uplink=["topk","int8"]', "compression.error_feedback=true"]
WAYS = {
    "uncompressed": [],
    "magnitude": [*TOPK, 'compression.topk_score="magnitude"'],
    "loss": [*TOPK, 'compression.topk_score="loss"'],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/compression-seeds")
    args = parser.parse_args()
    results: dict[int, dict[str, float]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for way, sets in WAYS.items():
            scenario = load_scenario("quickstart", [f"seed={seed}", *sets])
            out = Path(args.out) / f"seed{seed}-{way}"
            grid = InProcessGrid(app, scenario.data.num_clients)
            summary = run_federation(grid, scenario, out, "in-process")
            results.setdefault(seed, {})[way] = summary["final"]["eval_accuracy"]
            print(json.dumps({"seed": seed, "way": way, **summary["final"]}), flush=True)
    print("| seed | uncompressed | top-k by magnitude | gap | top-k by loss score | gap |")
    print("|---|---|---|---|---|---|")
    for seed, acc in results.items():
        base = acc["uncompressed"]
        print(
            f"| {seed} | {base:.4f} | {acc['magnitude']:.4f} | {acc['magnitude'] - base:+.4f} "
            f"| {acc['loss']:.4f} | {acc['loss'] - base:+.4f} |"
        )


if __name__ == "__main__":
    main()
