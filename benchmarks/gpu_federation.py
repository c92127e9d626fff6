"""The ``federation`` part of ``benchmarks/gpu.py``: clients sharing one device in a federation."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from gpu_common import (
    LLAMA_TARGETS,
    Sizes,
    instruction_rows,
    llama_folder,
    release,
    synthetic_words,
)


def federation_scenario(
    model: Path, data: Path, device: torch.device, sizes: Sizes, per_round: int
) -> Any:
    """The federation's scenario: the Llama, the synthetic file, FedAvg, ``per_round`` clients."""
    from fedpeft.config import Scenario

    return Scenario.from_dict(
        {
            "name": f"gpu-federation-{per_round}",
            "model": {"name": str(model), "task": "causal-lm", "device": str(device)},
            "peft": {
                "method": "lora",
                "r": sizes.rank,
                "alpha": 2 * sizes.rank,
                "target_modules": LLAMA_TARGETS,
            },
            "data": {
                "name": str(data),
                "partitioner": "iid",
                "num_clients": sizes.clients,
                "eval_examples": 32,
                "max_length": sizes.max_length,
            },
            "federation": {"rounds": sizes.rounds, "clients_per_round": per_round},
            "strategy": {"name": "fedavg"},
            "train": {
                "local_steps": sizes.local_steps,
                "batch_size": sizes.batch,
                "lr": sizes.lr,
                "precision": "auto",
                "eval_batch_size": 32,
                "eval_generate": 0,
            },
        }
    )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def federation_summary(rows: list[dict[str, Any]], per_round: int) -> dict[str, Any]:
    """Round time (later rounds when there are any) and what each client reported."""
    clients = [c for row in rows for c in row["client_metrics"]]
    later = [r["round_seconds"] for r in rows[1:]] or [r["round_seconds"] for r in rows]
    return {
        "clients_per_round": per_round,
        "round_seconds": [r["round_seconds"] for r in rows],
        "mean_round_seconds": _mean(later),
        "client_step_ms": 1e3 * _mean([float(c["step_seconds"]) for c in clients]),
        "client_peak_memory_mb": max(float(c["peak_memory_mb"]) for c in clients),
        "client_train_seconds": _mean([float(c["train_seconds"]) for c in clients]),
        "devices": sorted({str(c["device"]) for c in clients}),
        "train_loss": [r["train_loss"] for r in rows],
        "clients_failed": sum(r["clients_failed"] for r in rows),
    }


def federation_part(device: torch.device, sizes: Sizes, work: Path) -> dict[str, Any]:
    """``sizes.clients`` clients sharing ``device`` each round, against one client a round."""
    from fedpeft.clients.app import app as client_app
    from fedpeft.server.inprocess import InProcessGrid
    from fedpeft.server.run import run_federation

    words = synthetic_words(sizes.words)
    model = llama_folder(work, sizes)
    data = work / "instructions.jsonl"
    rows = instruction_rows(words, sizes.rows, seed=3)
    data.write_text(
        "".join(
            json.dumps({"text": t, "response": r}) + "\n"
            for t, r in zip(rows["text"], rows["response"], strict=True)
        )
    )
    runs = []
    for per_round in (sizes.clients, 1):
        scenario = federation_scenario(model, data, device, sizes, per_round)
        release(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out = work / f"federation-{per_round}"
        started = time.perf_counter()
        run_federation(InProcessGrid(client_app, sizes.clients), scenario, out, "in-process")
        wall = time.perf_counter() - started
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        run = {**federation_summary(metrics, per_round), "wall_seconds": wall}
        if device.type == "cuda":  # the whole run: server model, every client, evaluation
            run["process_peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        runs.append(run)
        print(
            f"federation {per_round}/{sizes.clients} clients a round: round "
            f"{run['mean_round_seconds']:.2f} s, client step {run['client_step_ms']:.1f} ms, "
            f"client peak {run['client_peak_memory_mb']:.0f} MiB",
            flush=True,
        )
    shared, alone = runs
    return {
        "engine": "in-process Grid (clients in turn, one shared base model)",
        "clients": sizes.clients,
        "rounds": sizes.rounds,
        "local_steps": sizes.local_steps,
        "runs": runs,
        "round_time_ratio": shared["mean_round_seconds"] / alone["mean_round_seconds"],
        "client_step_ratio": shared["client_step_ms"] / alone["client_step_ms"],
        "client_peak_ratio": shared["client_peak_memory_mb"] / alone["client_peak_memory_mb"],
    }
