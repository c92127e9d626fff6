"""``fedpeft eval RUN_DIR``: benchmarks and generations of a finished run's adapter.

The adapter is rebuilt from ``RUN_DIR/adapter`` (:func:`fedpeft.adapter_files.load_adapter`,
the same files lm-evaluation-harness and FlowerTune's scripts read). Benchmark scores go
to ``RUN_DIR/eval.json``, merged with what earlier calls wrote there; answers to a prompts
file go to a JSONL (``RUN_DIR/answers.jsonl`` unless told otherwise).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedpeft.adapter_files import META_FILE, load_adapter
from fedpeft.config import GENERATIVE_TASKS, ScenarioError
from fedpeft.evaluation.generation import Sampling, read_prompts, write_answers
from fedpeft.evaluation.multiple_choice import load_benchmark, score_benchmark
from fedpeft.model_sources import load_tokenizer
from fedpeft.models import resolve_device
from fedpeft.report import console, write_json_atomic

EVAL_FILE = "eval.json"
ANSWERS_FILE = "answers.jsonl"


def load_run_model(run_dir: Path, device: str = "auto") -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, adapter meta) of a finished run; one error line if it is not one."""
    adapter = run_dir / "adapter"
    if not (adapter / META_FILE).is_file():
        raise ScenarioError(
            f"{run_dir} has no {adapter.name}/{META_FILE}: not the folder of a finished fedpeft run"
        )
    meta = json.loads((adapter / META_FILE).read_text())
    task = meta["model"]["task"]
    if task not in GENERATIVE_TASKS:
        raise ScenarioError(
            f"{run_dir} fine-tuned a {task} model; benchmarks and generations need one of "
            f"{', '.join(GENERATIVE_TASKS)}"
        )
    model = load_adapter(adapter).to(resolve_device(device))
    return model, load_tokenizer(meta["model"]["name"]), meta


def evaluate_run(
    run_dir: Path,
    benchmarks: list[str],
    *,
    questions: int = 0,
    few_shot: int = 0,
    chat_template: bool = False,
    batch_size: int = 16,
    prompts: Path | None = None,
    answers: Path | None = None,
    sampling: Sampling | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Score ``benchmarks`` and answer ``prompts`` with the run's adapter; return eval.json."""
    if not benchmarks and prompts is None:
        raise ScenarioError("nothing to do: give --benchmark NAME_OR_PATH and/or --generate FILE")
    loaded = [load_benchmark(name, questions) for name in benchmarks]  # bad input fails first
    if prompts is not None:
        read_prompts(prompts)
    model, tokenizer, meta = load_run_model(run_dir, device)
    target = run_dir / EVAL_FILE
    record = json.loads(target.read_text()) if target.is_file() else {"benchmarks": {}}
    record.update(adapter=str(run_dir / "adapter"), base_model=meta["model"]["name"])
    for bench in loaded:
        started = time.perf_counter()
        result = score_benchmark(
            model,
            tokenizer,
            bench,
            few_shot=few_shot,
            chat_template=chat_template,
            batch_size=batch_size,
        )
        result["seconds"] = time.perf_counter() - started
        record["benchmarks"][bench.name] = result
        console.print(
            f"{bench.name}: accuracy {result['accuracy']:.4f} on {result['questions']} questions "
            f"(chance {result['chance']:.2f}, {len(result['subjects'])} subjects, "
            f"{result['seconds']:.0f}s)"
        )
    if loaded:
        write_json_atomic(target, record)
        console.print(f"scores: {target}")
    if prompts is not None:
        out = answers or run_dir / ANSWERS_FILE
        count = write_answers(
            model,
            tokenizer,
            prompts,
            out,
            model_id=run_dir.name,
            sampling=sampling or Sampling(),
            device=next(model.parameters()).device,
        )
        console.print(f"answers to {count} prompts: {out}")
    return record
