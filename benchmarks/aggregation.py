"""Server-side aggregation cost per strategy, and factored against dense SVD.

    .venv/bin/python benchmarks/aggregation.py [--quick]

1. Every registered strategy aggregates K client updates through its real
   ``aggregate_train`` (the replies as Flower Messages; building them is not timed) for
   two adapter shapes: MiniLM's (6 layers, query and value, 384 x 384, r = 8, plus a
   26-class head) and a synthetic 7B-shaped adapter (32 layers, query and value,
   d = k = 4096, r = 16). K is 10, 100 and 1000 for MiniLM, and 10 and 100 for 7B: 1000
   7B-shaped updates are 33 GB, more than this machine's memory. Peak memory is the rise
   of this process's resident set over the call (sampled every 2 ms).
2. FlexLoRA's SVD of ``sum p_i B_i A_i`` and FedEx-LoRA's residual at d = 4096, factored
   (QR of the stacked factors, SVD of the small core; never forming d x d) against dense
   (forming the d x d sum, full SVD), on one module, with the difference of their results.

``--quick`` runs K = 10 and 100 for MiniLM, K = 10 for 7B, and one dense SVD.
Results go to ``benchmarks/results/aggregation.{json,md}``.

3. Replies folded as they arrive (``--shapes 7b --clients 100,1000 --strategies
   fedavg,fedit,flexlora,flora,fedex_lora``): each cell runs in a fresh process, whose
   client updates are generated one at a time while ``aggregate_train`` reads them from an
   iterator (never all in memory). ``seconds`` leaves out the time spent generating;
   ``peak_extra_mib`` is the resident set's rise during the call and ``peak_rss_mb`` the
   process's peak (Python, torch and Flower included). The rows go into the same JSON,
   under ``streaming``, next to the results of 1 and 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from common import machine, save_results  # noqa: E402

SHAPES = {  # name: (layers, d, rank, head classes)
    "minilm": (6, 384, 8, 26),
    "7b": (32, 4096, 16, 0),
}


def adapter(shape: str, seed: int) -> dict[str, torch.Tensor]:
    """One client's adapter of the given shape, in peft's key names."""
    layers, d, r, classes = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(layers):
        for module in ("query", "value"):
            prefix = f"base_model.model.encoder.layer.{layer}.attention.self.{module}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(r, d, generator=g) * 0.01
            state[f"{prefix}.lora_B.weight"] = torch.randn(d, r, generator=g) * 0.01
    if classes:
        state["base_model.model.classifier.modules_to_save.default.weight"] = torch.randn(
            classes, d, generator=g
        )
        state["base_model.model.classifier.modules_to_save.default.bias"] = torch.zeros(classes)
    return state


class PeakRSS:
    """The rise of this process's resident memory while the block runs, sampled every 2 ms."""

    def __enter__(self) -> PeakRSS:
        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self.done.wait(0.002):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.mib = (self.peak - self.start) / 2**20


def configured_strategy(name: str, shape: str, k: int, current: dict[str, torch.Tensor]):
    """The named strategy for K clients of ``shape``, after round 1's configure_train."""
    from flwr.app import ConfigRecord

    from fedpeft.codecs import state_to_arrayrecord
    from fedpeft.config import load_scenario
    from fedpeft.strategies import build_strategy
    from fedpeft.strategies.testing import StaticGrid

    r = SHAPES[shape][2]
    sets = [
        f'strategy.name="{name}"',
        f"peft.r={r}",
        f"peft.alpha={2 * r}",
        f"data.num_clients={k}",
        f"federation.clients_per_round={k}",
    ]
    strategy = build_strategy(load_scenario("smoke", sets))
    grid = StaticGrid(range(1, k + 1))
    list(strategy.configure_train(1, state_to_arrayrecord(current), ConfigRecord(), grid))
    return strategy


def strategy_costs(shape: str, counts: list[int]) -> list[dict]:
    """Time and memory of each registered strategy's aggregate_train on K updates."""

    from fedpeft.strategies import STRATEGIES
    from fedpeft.strategies.testing import ensure_task_identity, train_reply

    ensure_task_identity()  # Messages need a run identity outside a running app
    rows = []
    layers, d, r, _ = SHAPES[shape]
    for k in counts:
        states = [adapter(shape, seed) for seed in range(k)]
        current = adapter(shape, 10_000)
        for name, spec in sorted(STRATEGIES.items()):
            strategy = configured_strategy(name, shape, k, current)
            replies = [train_reply(s, 8 + i % 5, i + 1) for i, s in enumerate(states)]
            gc.collect()
            with PeakRSS() as memory:
                started = time.perf_counter()
                strategy.aggregate_train(1, replies)
                seconds = time.perf_counter() - started
            rows.append(
                {
                    "shape": shape,
                    "clients": k,
                    "strategy": name,
                    "seconds": seconds,
                    "peak_extra_mib": memory.mib,
                    "factored": spec.heterogeneous_ranks or name == "fedex_lora",
                }
            )
            print(
                f"{shape:6} K={k:<5} {name:14} {seconds:8.3f} s  +{memory.mib:7.0f} MiB", flush=True
            )
            del strategy, replies
        del states
        gc.collect()
    return rows


def stream_cell(shape: str, k: int, name: str) -> dict:
    """One strategy's ``aggregate_train`` over K lazily generated replies (a child process)."""
    from collections.abc import Iterator

    from flwr.app import Message

    from fedpeft.strategies.testing import ensure_task_identity, train_reply

    ensure_task_identity()
    strategy = configured_strategy(name, shape, k, adapter(shape, 10**6))
    generating = 0.0

    def replies() -> Iterator[Message]:
        nonlocal generating
        for i in range(k):
            started = time.perf_counter()
            reply = train_reply(adapter(shape, i), 8 + i % 5, i + 1)
            generating += time.perf_counter() - started
            yield reply
            del reply

    gc.collect()
    start_mb = psutil.Process().memory_info().rss / 2**20
    with PeakRSS() as memory:
        started = time.perf_counter()
        strategy.aggregate_train(1, replies())
        seconds = time.perf_counter() - started - generating
    method = getattr(strategy, "svd_methods", None)
    return {
        "shape": shape,
        "clients": k,
        "strategy": name,
        "seconds": seconds,
        "generating_seconds": generating,
        "peak_extra_mib": memory.mib,
        "start_rss_mb": start_mb,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "svd": ", ".join(f"{m} x{n}" for m, n in sorted(method.items())) if method else "",
    }


def streaming(shapes: list[str], counts: list[int], names: list[str]) -> list[dict]:
    """Every (shape, K, strategy) cell in its own process, so each peak is its own."""
    rows = []
    for shape in shapes:
        for k in counts:
            for name in names:
                cell = f"{shape}:{k}:{name}"
                proc = subprocess.run(
                    [sys.executable, __file__, "--cell", cell], capture_output=True, text=True
                )
                if proc.returncode:
                    row = {"shape": shape, "clients": k, "strategy": name}
                    row["error"] = (proc.stderr.strip().splitlines() or ["killed"])[-1][:300]
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"{shape:4} K={k:<5} {name:11} "
                    + (
                        f"{row['seconds']:7.2f} s  +{row['peak_extra_mib']:6.0f} MiB  "
                        f"peak {row['peak_rss_mb']:6.0f} MB  {row['svd']}"
                        if "error" not in row
                        else f"failed: {row['error']}"
                    ),
                    flush=True,
                )
    return rows


def dense_against_factored(counts: list[int], d: int = 4096, r: int = 16) -> list[dict]:
    """One module: FlexLoRA's SVD and FedEx-LoRA's residual, factored and dense."""
    from fedpeft.strategies.lora_math import factored_svd, fedex_residual, stack_factors

    rows = []
    for k in counts:
        g = torch.Generator().manual_seed(k)
        bs = [torch.randn(d, r, generator=g, dtype=torch.float64) * 0.01 for _ in range(k)]
        as_ = [torch.randn(r, d, generator=g, dtype=torch.float64) * 0.01 for _ in range(k)]
        weights = [float(8 + i % 5) for i in range(k)]
        p = [w / sum(weights) for w in weights]

        started = time.perf_counter()
        u, s, v = factored_svd(*stack_factors(bs, as_, weights, None), rank=r)
        factored_s = time.perf_counter() - started
        started = time.perf_counter()
        dense = sum(pi * b @ a for pi, b, a in zip(p, bs, as_, strict=True))
        du, ds, dvh = torch.linalg.svd(dense, full_matrices=False)
        dense_s = time.perf_counter() - started
        best_f = (u * s) @ v.mT
        best_d = (du[:, :r] * ds[:r]) @ dvh[:r]
        flex_diff = ((best_f - best_d).norm() / best_d.norm()).item()

        started = time.perf_counter()
        rb, ra = fedex_residual(bs, as_, weights, 1.0)
        fedex_factored_s = time.perf_counter() - started
        started = time.perf_counter()
        mean_b = sum(pi * b for pi, b in zip(p, bs, strict=True))
        mean_a = sum(pi * a for pi, a in zip(p, as_, strict=True))
        residual = dense - mean_b @ mean_a  # type: ignore[operator]
        fedex_dense_s = time.perf_counter() - started + 0.0
        fedex_diff = ((rb @ ra - residual).norm() / residual.norm()).item()
        rows.append(
            {
                "clients": k,
                "d": d,
                "r": r,
                "flexlora_factored_s": factored_s,
                "flexlora_dense_s": dense_s,
                "flexlora_speedup": dense_s / factored_s,
                "flexlora_rel_diff": flex_diff,
                "fedex_factored_s": fedex_factored_s,
                "fedex_dense_s": fedex_dense_s,
                "fedex_rel_diff": fedex_diff,
            }
        )
        print(
            f"d={d} K={k}: FlexLoRA factored {factored_s:.3f} s, dense {dense_s:.2f} s "
            f"({dense_s / factored_s:.0f}x), diff {flex_diff:.1e}",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes (a few minutes)")
    parser.add_argument("--shapes", help="streaming cells: shapes, e.g. 7b or minilm,7b")
    parser.add_argument("--clients", default="100,1000", help="streaming cells: K values")
    parser.add_argument(
        "--strategies",
        default="fedavg,fedit,flexlora,flora,fedex_lora",
        help="streaming cells: registered strategy names",
    )
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # SHAPE:K:STRATEGY, in a child
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # no per-call INFO lines
    if args.cell:
        shape, k, name = args.cell.split(":")
        print(json.dumps(stream_cell(shape, int(k), name)))
        return
    if args.shapes:
        rows = streaming(
            args.shapes.split(","),
            [int(k) for k in args.clients.split(",")],
            args.strategies.split(","),
        )
        path = HERE / "results" / "aggregation.json"
        record = json.loads(path.read_text()) if path.exists() else {}
        # cells of earlier invocations stay unless rerun (1,000 updates run apart, say)
        cells = {(r["shape"], r["clients"], r["strategy"]): r for r in record.get("streaming", [])}
        cells.update({(r["shape"], r["clients"], r["strategy"]): r for r in rows})
        record["streaming"] = sorted(cells.values(), key=lambda r: (r["shape"], r["clients"]))
        command = "python benchmarks/aggregation.py " + " ".join(sys.argv[1:])
        commands = [c for c in record.get("streaming_commands", []) if c != command]
        record["streaming_commands"] = [*commands, command]
        record["streaming_date"] = time.strftime("%Y-%m-%d")
        record.setdefault("machine", f"{machine()}, torch {torch.__version__}")
        save_results("aggregation", record, markdown(record))
        return
    minilm = [10, 100] if args.quick else [10, 100, 1000]
    seven_b = [10] if args.quick else [10, 100]
    rows = strategy_costs("minilm", minilm) + strategy_costs("7b", seven_b)
    svd = dense_against_factored([10] if args.quick else [10, 100])
    path = HERE / "results" / "aggregation.json"
    earlier = json.loads(path.read_text()) if path.exists() and not args.quick else {}
    record = {
        "command": "python benchmarks/aggregation.py" + (" --quick" if args.quick else ""),
        "machine": f"{machine()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "strategies": rows,
        "svd": svd,
        **{k: v for k, v in earlier.items() if k.startswith("streaming")},
    }
    save_results("aggregation", record, markdown(record))


def markdown(record: dict) -> str:
    """Tables: seconds and extra MiB per strategy x shape x K; dense against factored."""
    cells = {(r["shape"], r["clients"], r["strategy"]): r for r in record["strategies"]}
    columns = sorted(
        {(r["shape"], r["clients"]) for r in record["strategies"]},
        key=lambda c: (c[0] != "minilm", c[1]),
    )
    names = sorted({r["strategy"] for r in record["strategies"]})
    head = " | ".join(f"{s} K={k}" for s, k in columns)
    lines = [
        "# Aggregation cost on the server",
        "",
        f"`{record['command']}` on {record['machine']}, {record['date']}.",
        "",
        "Seconds for one `aggregate_train` call, and in brackets the MiB the process grew",
        "during it. MiniLM: 6 layers x (query, value), d = 384, r = 8, and the head. 7B: 32",
        "layers x (query, value), d = k = 4096, r = 16.",
        "",
        f"| strategy | {head} |",
        "|---|" + "---|" * len(columns),
    ]
    for name in names:
        row = []
        for shape, k in columns:
            c = cells.get((shape, k, name))
            row.append(f"{c['seconds']:.3f} (+{c['peak_extra_mib']:.0f})" if c else "-")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines += [
        "",
        "## Factored against dense, one d = 4096 module, r = 16",
        "",
        "| clients | FlexLoRA factored s | dense SVD s | speed-up | relative difference | "
        "FedEx residual factored s | dense s | relative difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["svd"]:
        lines.append(
            f"| {r['clients']} | {r['flexlora_factored_s']:.3f} | {r['flexlora_dense_s']:.2f} | "
            f"{r['flexlora_speedup']:.0f}x | {r['flexlora_rel_diff']:.1e} | "
            f"{r['fedex_factored_s']:.4f} | {r['fedex_dense_s']:.3f} | {r['fedex_rel_diff']:.1e} |"
        )
    return "\n".join(lines + streaming_markdown(record)) + "\n"


def streaming_markdown(record: dict) -> list[str]:
    """The streaming cells' table, when the record has them."""
    if not record.get("streaming"):
        return []
    lines = [
        "",
        "## Replies folded as they arrive",
        "",
        " and ".join(f"`{c}`" for c in record["streaming_commands"])
        + f", {record['streaming_date']}: one process per cell; the updates are generated one"
        " at a time (time not counted) and read from an iterator.",
        "",
        "| shape | clients | strategy | seconds | MiB grown in the call | process peak MB | SVD |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["streaming"]:
        if "error" in r:
            lines.append(
                f"| {r['shape']} | {r['clients']} | {r['strategy']} | failed: {r['error']} | | | |"
            )
            continue
        lines.append(
            f"| {r['shape']} | {r['clients']} | {r['strategy']} | {r['seconds']:.1f} | "
            f"{r['peak_extra_mib']:.0f} | {r['peak_rss_mb']:.0f} | {r['svd'] or '-'} |"
        )
    return lines


if __name__ == "__main__":
    main()
