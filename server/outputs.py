"""What a finished run leaves in its folder: the adapter, its model card, summary.json, plots."""

from __future__ import annotations

import dataclasses
import resource
from pathlib import Path
from typing import Any

import torch
from flwr.serverapp.strategy import Strategy

from fedpeft.adapter_files import save_adapter
from fedpeft.adapters import count_trainable, set_adapter_state
from fedpeft.config import Scenario
from fedpeft.data import BUNDLED, bundled_path, partition_summary
from fedpeft.methods import get_method
from fedpeft.models import cached_peft_model, describe_base, total_params
from fedpeft.plots import plot_run
from fedpeft.report import SUMMARY_FILE, console, model_card, write_json_atomic
from fedpeft.strategies.adapter_strategy import AdapterStrategy

ADAPTER_DIR = "adapter"


def eval_data_record(scenario: Scenario, examples: int) -> dict[str, Any]:
    """Where the held-out examples come from, so a user can re-evaluate without fedpeft."""
    path = str(bundled_path(scenario.data.name)) if scenario.data.name in BUNDLED else None
    return {
        "name": scenario.data.name,
        "path": path,  # datasets.load_from_disk(path)[split]
        "split": "test",
        "examples": examples,  # the first N examples of that split
        "max_length": scenario.data.max_length,
    }


def save_final_adapter(
    strategy: Strategy, model: torch.nn.Module, scenario: Scenario, num_labels: int, where: Path
) -> None:
    """Save the final global adapter (see :func:`fedpeft.adapter_files.save_adapter` for formats).

    A strategy that changed the base weights (FLoRA, FedEx-LoRA) exports an adapter that
    carries the change too; it is saved from a fresh copy of the untouched base model. The
    saved config keeps the scenario's ``use_rslora``: the export's ``lora_alpha`` is the one
    that gives its tensors their scaling under it (``fedpeft.lora.lora_alpha_for``).
    """
    if not isinstance(strategy, AdapterStrategy):
        save_adapter(model, where)
        return
    state, rank, alpha = strategy.export()
    server_peft = scenario.peft_for_rank(scenario.max_rank)
    if (rank, alpha) == (server_peft.r, server_peft.alpha) and not strategy.base_delta:
        set_adapter_state(model, state)
        save_adapter(model, where)
        return
    export_peft = dataclasses.replace(server_peft, r=rank, alpha=alpha)
    fresh = cached_peft_model(scenario.model, export_peft, num_labels, scenario.seed)
    set_adapter_state(fresh, state)
    save_adapter(fresh, where)


def write_model_card(
    where: Path, summary: dict[str, Any], scenario: Scenario, command: str
) -> None:
    """Replace peft's empty model card in the adapter folder with this run's own."""
    peft_format = (where / "adapter_config.json").is_file()
    card = model_card(summary, describe_base(scenario.model.name), command, where, peft_format)
    (where / "README.md").write_text(card, encoding="utf-8")


def compression_summary(
    scenario: Scenario, rows: list[dict[str, Any]], full_model_bytes: int
) -> dict[str, Any]:
    """Compression settings and ratios of the run.

    Wire bytes against the same traffic uncoded, and against full fine-tuning (each
    client sending and receiving every base weight).
    """
    up = sum(r["bytes_up"] for r in rows)
    down = sum(r["bytes_down"] for r in rows)
    replies = sum(r["clients_sampled"] - r["clients_failed"] for r in rows)
    sent = sum(r["clients_sampled"] for r in rows)

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    return {
        **dataclasses.asdict(scenario.compression),
        "ratio_up_vs_uncompressed": ratio(sum(r["bytes_up_uncompressed"] for r in rows), up),
        "ratio_down_vs_uncompressed": ratio(sum(r["bytes_down_uncompressed"] for r in rows), down),
        "ratio_up_vs_full": ratio(full_model_bytes * replies, up),
        "ratio_down_vs_full": ratio(full_model_bytes * sent, down),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    The server's: in simulation that includes Flower's engine and its virtual nodes.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_summary(
    scenario: Scenario,
    rows: list[dict[str, Any]],
    initial: dict[str, float],
    model: torch.nn.Module,
    **facts: Any,
) -> dict[str, Any]:
    """summary.json's content: the scenario, final and initial metrics, bytes, sizes, clients.

    ``facts`` are the run's own: ``engine``, ``secure``, ``resumed_after_rounds``,
    ``wall_seconds``, ``adapter_bytes``, ``full_model_bytes``, ``epsilon``,
    ``eval_examples`` and ``label_names``.
    """
    full_model_bytes = facts["full_model_bytes"]
    sent = [r["bytes_up"] / max(r["clients_sampled"] - r["clients_failed"], 1) for r in rows]
    per_client_up = sum(sent) / max(len(sent), 1)
    return {
        "scenario": scenario.to_dict(),
        "engine": facts["engine"],
        "secure": facts["secure"],
        "methods": [
            {"name": name, "family": get_method(name).family} for name in scenario.peft.methods
        ],
        "final": {
            k: v for k, v in rows[-1].items() if k.startswith(("eval_", "train_", "personal_"))
        },
        "initial": initial,
        "benchmarks": rows[-1].get("benchmarks", {}),  # eval.benchmarks after the last round
        "rounds_completed": len(rows),
        "resumed_after_rounds": facts["resumed_after_rounds"],
        "bytes_up_total": sum(r["bytes_up"] for r in rows),
        "bytes_down_total": sum(r["bytes_down"] for r in rows),
        "wall_seconds": facts["wall_seconds"],  # every attempt
        "server_peak_memory_mb": peak_rss_mb(),
        "trainable_params": count_trainable(model),
        "total_params": total_params(model),
        "adapter_bytes": facts["adapter_bytes"],
        "full_model_bytes": full_model_bytes,
        "bytes_up_per_client_round": per_client_up,
        "saving_vs_full": full_model_bytes / per_client_up if per_client_up else None,
        "compression": compression_summary(scenario, rows, full_model_bytes),
        "privacy": {**dataclasses.asdict(scenario.privacy), "epsilon": facts["epsilon"]},
        "clients": [
            {**row, "rank": scenario.rank_of(row["client"])}
            for row in partition_summary(scenario.data, scenario.seed)
        ],
        "eval_data": eval_data_record(scenario, facts["eval_examples"]),
        "label_names": facts["label_names"],
    }


def write_outputs(
    out_dir: Path,
    scenario: Scenario,
    summary: dict[str, Any],
    rows: list[dict[str, Any]],
    *,
    command: str,
    rounds_seconds: float,
) -> None:
    """Write summary.json, the adapter's model card and the plots; say where they are."""
    write_json_atomic(out_dir / SUMMARY_FILE, summary)
    write_model_card(out_dir / ADAPTER_DIR, summary, scenario, command)
    title = f"{scenario.name}: {scenario.peft.label} + {scenario.strategy.name}"
    plot_run(out_dir, rows, summary["initial"] or None, title)
    rounds = summary["rounds_completed"]
    final = summary["final"]
    console.print(
        f"[bold]finished[/] {rounds} round{'s' * (rounds != 1)} "
        f"({rounds_seconds:.0f}s of rounds here): "
        f"eval_accuracy {final.get('eval_accuracy', float('nan')):.4f}; each client sent "
        f"{summary['bytes_up_per_client_round'] / 1e3:.0f} kB per round vs "
        f"{summary['full_model_bytes'] / 1e6:.1f} MB for full "
        f"fine-tuning ({summary['saving_vs_full'] or 0:.0f}x less). Outputs: {out_dir}"
    )
