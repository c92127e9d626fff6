"""Run outputs: ``metrics.jsonl`` (one line per round), ``summary.json``, console lines."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from fedpeft.tracking import Trackers, scalars

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"

console = Console(stderr=True, highlight=False, soft_wrap=True)
# what a command is doing before its rounds (start-up steps): stdout, so that a command
# refused before any round leaves exactly its one error line on stderr
narrator = Console(highlight=False, soft_wrap=True)

# When this process's command started: ``fedpeft.tools.cli.main`` restarts it; a process that
# runs no command (a ServerApp under ``flwr run``) keeps its import time.
_command_started = [time.monotonic()]


def start_command_clock() -> None:
    """Mark now as the start of the command this process runs (``done in`` counts from it)."""
    _command_started[0] = time.monotonic()


def command_seconds() -> float:
    """Seconds since the command started: what the user waited for."""
    return time.monotonic() - _command_started[0]


def step(text: str) -> None:
    """Print one start-up step, stamped with the seconds since the command started."""
    narrator.print(f"[dim]{command_seconds():5.1f}s[/] {text}")


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` through a temporary file, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    """Read the per-round records of a run folder."""
    path = out_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


class RoundLog:
    """Appends one JSON object per round to ``metrics.jsonl`` and prints progress with an ETA."""

    def __init__(
        self,
        out_dir: Path,
        total_rounds: int,
        metric: str = "eval_accuracy",
        trackers: Trackers | None = None,
    ) -> None:
        self.path = out_dir / METRICS_FILE
        self.trackers = trackers  #: TensorBoard, W&B (see fedpeft.tracking), when on
        self.total_rounds = total_rounds
        self.metric = metric
        self.started = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.earlier = 0  # rounds finished before a resume (not timed by this attempt)

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Start from a checkpoint's rows: ``metrics.jsonl`` is rewritten to hold just those."""
        self.rows = list(rows)
        self.earlier = len(rows)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        os.replace(tmp, self.path)

    def append(self, row: dict[str, Any]) -> None:
        """Record one finished round (flushed to disk at once) and print a progress line."""
        self.rows.append(row)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.trackers is not None:
            self.trackers.log(row["round"], scalars(row))
        done = row["round"]
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(done - self.earlier, 1) * (self.total_rounds - done)
        value = row.get(self.metric, float("nan"))
        console.print(
            f"round {done}/{self.total_rounds}  {self.metric} {value:.4f}"
            f"  eval_loss {row.get('eval_loss', float('nan')):.4f}"
            f"  train_loss {_fmt(row.get('train_loss'))}"
            f"  clients {row['clients_sampled'] - row['clients_failed']}/{row['clients_sampled']}"
            f"  up {row['bytes_up'] / 1e6:.2f} MB  down {row['bytes_down'] / 1e6:.2f} MB"
            f"  {row['round_seconds']:.1f}s  ETA {_clock(eta)}"
            + (f"  epsilon {row['epsilon']:.2f}" if "epsilon" in row else "")
        )
        if row.get("failures"):
            rejected = (
                f" ({row['updates_rejected']} rejected)" if row.get("updates_rejected") else ""
            )
            console.print(
                f"  [yellow]{len(row['failures'])} failed{rejected}:[/] {row['failures'][0]}"
            )
        if row.get("aggregated") is False:
            console.print("  [yellow]not aggregated: too few valid replies; the global stays[/]")


class RoundProgress:
    """Within a long round: how many sampled clients have answered, and when the rest should.

    A console line at most every ``every_s`` seconds, the first after ``every_s``, so a
    round shorter than that prints none. The polling Grid calls it as replies arrive.
    """

    def __init__(self, total_rounds: int, every_s: float = 10.0) -> None:
        self.total_rounds, self.every_s = total_rounds, every_s
        self.round, self.printed_at = 0, 0.0

    def __call__(self, server_round: int, answered: int, sampled: int, seconds: float) -> None:
        """``answered`` of ``sampled`` replies are in, ``seconds`` into the exchange."""
        if server_round != self.round:
            self.round, self.printed_at = server_round, 0.0
        if seconds - self.printed_at < self.every_s:
            return
        self.printed_at = seconds
        line = (
            f"  round {server_round}/{self.total_rounds}: {answered}/{sampled} clients answered "
            f"after {_clock(seconds)}"
        )
        if answered < sampled:  # the rest at the pace so far
            line += f", the rest in ~{_clock(seconds / answered * (sampled - answered))}"
        console.print(line)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


# the transformers class that loads each task's base model (the card's loading snippet)
AUTO_CLASSES = {
    "seq-cls": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "dpo": "AutoModelForCausalLM",
    "image-cls": "AutoModelForImageClassification",
}


def model_card(
    summary: dict[str, Any], base: dict[str, str], command: str, folder: Path, peft: bool
) -> str:
    """The adapter folder's README.md: what it was trained from, how, to what metrics.

    ``summary`` is the run's summary.json; ``base`` says what the base model is
    (``name``, ``hub_id`` when it has one, ``source``: where its weights load from, empty
    for a random test model, ``about``); ``command`` made the run (empty when unknown);
    ``folder`` is the adapter's; ``peft``: whether it is a Hugging Face peft checkpoint.
    """
    scn = summary["scenario"]
    model, pft, data, fed = scn["model"], scn["peft"], scn["data"], scn["federation"]
    methods = pft["method"] if isinstance(pft["method"], list) else [pft["method"]]
    label = "+".join(methods)
    final = ", ".join(f"{k} {v:.4f}" for k, v in summary["final"].items() if _number(v))
    partition = data["partitioner"] + (
        f" (alpha {data['alpha']})" if data["partitioner"] == "dirichlet" else ""
    )
    rank = f", r={pft['r']}, alpha={pft['alpha']:g}" + (", rsLoRA" if pft["use_rslora"] else "")
    targets = ", ".join(pft["target_modules"]) or "peft's default for the model"
    trainable, total = summary["trainable_params"], summary["total_params"]
    labels = len(summary.get("label_names") or [])
    front = [
        "---",
        f"base_model: {base.get('hub_id') or base['source'] or model['name']}",
        *(["library_name: peft"] if peft else []),
        "tags:",
        *(f"- {tag}" for tag in ("fedpeft", "flower", "federated-learning", *methods)),
        "---",
    ]
    rows = [
        (
            "base model",
            f"`{model['name']}`: {base['about']}"
            + (f" (`{base['source']}`)" if base["source"] else ""),
        ),
        ("task", model["task"] + (f", {labels} labels" if labels else "")),
        ("PEFT method", f"{label}{rank if 'lora' in methods else ''}; target modules: {targets}"),
        ("strategy", scn["strategy"]["name"]),
        (
            "rounds",
            f"{summary['rounds_completed']} of {fed['rounds']}, with "
            f"{fed['clients_per_round']} of {data['num_clients']} clients a round",
        ),
        (
            "data",
            f"{data['name']}, {partition} partition over {data['num_clients']} clients; "
            f"evaluated on {summary['eval_data']['examples']} held-out examples",
        ),
        ("final metrics", final or "none recorded"),
        ("trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"),
        ("engine", summary["engine"]),
    ]
    lines = [
        *front,
        "",
        f"# {scn['name']}: a federated {label} adapter for {model['name']}",
        "",
        "Trained with fedpeft, federated on [Flower](https://flower.ai): each client "
        "fine-tuned only this adapter on its own data, and the server aggregated the "
        "clients' adapters every round.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in rows),
        "",
        "## How it was made",
        "",
        "```bash",
        command or f"# through Flower ({summary['engine']}); scenario {scn['name']!r}",
        "```",
        "",
        "The resolved scenario, per-round metrics and byte counts are in the run folder "
        "(`summary.json`, `metrics.jsonl`).",
        "",
        "## Load it",
        "",
        *_loading(model["task"], base, labels, str(folder), peft),
    ]
    return "\n".join(lines) + "\n"


def _loading(task: str, base: dict[str, str], labels: int, folder: str, peft: bool) -> list[str]:
    """The card's loading instructions: plain peft where it can, else fedpeft's loader."""
    fedpeft = [
        "```python",
        "from fedpeft.adapter_files import load_adapter",
        "",
        f'model = load_adapter("{folder}")  # rebuilds the base from fedpeft_adapter.json',
        "```",
    ]
    if not (peft and base["source"]):  # a random test model is rebuilt by fedpeft only
        return fedpeft
    auto = AUTO_CLASSES.get(task, "AutoModel")
    heads = f", num_labels={labels}" if labels else ""
    return [
        "```python",
        "from peft import PeftModel",
        f"from transformers import {auto}",
        "",
        f'base = {auto}.from_pretrained("{base.get("hub_id") or base["source"]}"{heads})',
        f'model = PeftModel.from_pretrained(base, "{folder}")',
        "```",
        "",
        "or, with fedpeft installed:",
        "",
        *fedpeft,
    ]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
