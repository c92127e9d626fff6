"""EleutherAI's lm-evaluation-harness scores a fedpeft adapter as ``fedpeft eval`` does.

Offline: the base model is a saved local folder, the task a local YAML over the bundled
``wordnet-mc`` written to a jsonl, and the harness reads the adapter with
``--model hf --model_args pretrained=BASE,peft=ADAPTER`` as docs/evaluation.md says.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedpeft.adapter_files import save_adapter
from fedpeft.config import ModelSection, PeftSection
from fedpeft.evaluation import multiple_choice as mc
from fedpeft.model_sources import load_tokenizer
from fedpeft.models import cached_peft_model, load_base_model
from fedpeft.tools.cli import main
from fedpeft.tools.evaluate import load_run_model

QUESTIONS = 60

LETTERS = "ABCD"
#: the harness's MMLU task, over a local file (YAML takes JSON, so it is written as that)
TASK = {
    "task": "fedpeft_wordnet_mc",
    "dataset_path": "json",
    "test_split": "test",
    "output_type": "multiple_choice",
    "description": "The following are multiple choice questions (with answers) about "
    "{{subject}}.\n\n",
    "doc_to_text": "{{question.strip()}}\n"
    + "".join(f"{x}. {{{{choices[{i}]}}}}\n" for i, x in enumerate(LETTERS))
    + "Answer:",
    "doc_to_choice": list(LETTERS),
    "doc_to_target": "answer",
    "metric_list": [{"metric": "acc"}],
}


@pytest.mark.slow(35)
def test_the_harness_agrees_with_fedpeft_eval(tmp_path: Path, monkeypatch) -> None:
    import lm_eval  # a dev dependency (pyproject.toml), so CI runs this
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # a base model the harness can name: fedpeft's tiny Llama, saved with its tokenizer
    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    load_base_model(ModelSection(name="tiny-llama", task="causal-lm"), 0).save_pretrained(base_dir)
    load_tokenizer("tiny-llama").save_pretrained(base_dir)
    # a run folder: a LoRA adapter on that base, moved away from its zero start
    peft = PeftSection(method="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    model = cached_peft_model(ModelSection(name=str(base_dir), task="causal-lm"), peft, 0, 0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
    run = tmp_path / "run"
    save_adapter(model, run / "adapter")
    # the benchmark as a local file, read by both
    data = tmp_path / "wordnet_mc.jsonl"
    bench = mc.load_benchmark("wordnet-mc", QUESTIONS)
    data.write_text(
        "".join(
            json.dumps(
                {
                    "question": q.question,
                    "choices": list(q.choices),
                    "answer": q.answer,
                    "subject": q.subject,
                }
            )
            + "\n"
            for q in bench.questions
        )
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    task = {**TASK, "dataset_kwargs": {"data_files": {"test": str(data)}}}
    (tasks / "fedpeft_wordnet_mc.yaml").write_text(json.dumps(task))

    sep = load_tokenizer("tiny-llama").sep_token_id
    assert main(["eval", str(run), "--benchmark", str(data)]) == 0
    ours = json.loads((run / "eval.json").read_text())["benchmarks"][str(data)]["accuracy"]
    results = lm_eval.simple_evaluate(
        model="hf",
        # MiniLM's tokenizer (BERT's) wraps a text in [CLS] ... [SEP] by default, which would
        # end every continuation in [SEP]; and it has no BOS for an empty context's prefix
        model_args=(
            f"pretrained={base_dir},peft={run / 'adapter'},add_bos_token=False,"
            f"prefix_token_id={sep}"
        ),
        tasks=["fedpeft_wordnet_mc"],
        task_manager=TaskManager(include_path=str(tasks)),
        batch_size=8,
        device="cpu",
        log_samples=True,
    )
    theirs = results["results"]["fedpeft_wordnet_mc"]["acc,none"]

    assert ours == pytest.approx(theirs, abs=1 / QUESTIONS + 1e-9)  # at most one near-tie apart
    # and question by question, choice by choice, the same log-likelihoods
    model, tokenizer, _ = load_run_model(run)
    requests = [mc.prompt_text(q, [], tokenizer, False) for q in bench.questions]
    mine = mc.choice_loglikelihoods(
        model, tokenizer, requests, batch_size=8, device=torch.device("cpu")
    )
    samples = sorted(results["samples"]["fedpeft_wordnet_mc"], key=lambda x: x["doc_id"])
    harness = [[resp[0][0] for resp in sample["resps"]] for sample in samples]
    assert len(harness) == QUESTIONS
    for got, want in zip(mine, harness, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    assert len({round(x, 3) for row in mine for x in row}) > QUESTIONS  # not all alike
    assert 0.0 < ours < 1.0
