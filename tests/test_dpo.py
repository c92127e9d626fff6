"""Federated DPO: the loss against TRL's, the reference model, preference data, a run."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from fedpeft.config import DataSection, ModelSection, PeftSection, ScenarioError
from fedpeft.data import load_task_data, wordnet
from fedpeft.methods import build_peft_model
from fedpeft.model_sources import load_tokenizer
from fedpeft.models import load_base_model
from fedpeft.tasks import get_task
from fedpeft.tasks.dpo import dpo_loss, dpo_objective, pair_logps, sequence_logps
from fedpeft.tools.cli import main


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return load_base_model(ModelSection(name="tiny-llama", task="dpo"), 0)


def moved(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its LoRA B factors drawn at random: the policy differs from the base."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model


def test_dpo_loss_is_the_papers_formula_on_fixed_numbers() -> None:
    chosen, rejected = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-4.0, -9.0]), torch.tensor([-4.0, -3.0])

    losses, good, bad = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)

    # -log sigmoid(beta * ((c - rc) - (r - rr))), written out with exp
    margins = [0.1 * ((-3 + 4) - (-5 + 4)), 0.1 * ((-10 + 9) - (-2 + 3))]
    want = [math.log(1 + math.exp(-m)) for m in margins]
    assert losses.tolist() == pytest.approx(want, abs=1e-7)
    assert good.tolist() == pytest.approx([0.1, -0.1]) and bad.tolist() == pytest.approx(
        [-0.1, 0.1]
    )


def test_the_loss_equals_trls_on_the_same_batch(tmp_path: Path) -> None:
    """TRL's own DPOTrainer builds the adapter and the batch; both losses read them."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    tokenizer = copy.deepcopy(load_tokenizer("tiny-llama"))
    tokenizer.eos_token = tokenizer.sep_token  # TRL appends an EOS; MiniLM's tokenizer has SEP
    pairs = Dataset.from_dict(
        {
            "prompt": ["Define the word dog.", "Define the word cat."],
            "chosen": [" a domestic animal", " a small feline"],
            "rejected": [' a city; "he went there"', " the act of running"],
        }
    )
    trainer = DPOTrainer(
        model=tiny_llama(),
        args=DPOConfig(output_dir=str(tmp_path), beta=0.1, report_to=[], use_cpu=True),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    model = moved(trainer.model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])

    theirs = trainer.compute_loss(model, batch)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    ours = dpo_objective(
        model,
        {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "labels": labels,
        },
        beta=0.1,
    )

    assert abs(ours.item() - math.log(2)) > 1e-3  # the policy is not its reference
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)


def test_the_reference_is_the_base_model_with_the_adapter_off() -> None:
    base = tiny_llama()
    untouched = copy.deepcopy(base)
    peft = PeftSection(method="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    model = moved(build_peft_model(base, peft, "dpo", 0))
    collate = get_task("dpo").make_collate(load_tokenizer("tiny-llama"), 32)
    batch = collate(
        {"text": ["Define the word dog."], "chosen": ["an animal"], "rejected": ["a town"]}
    )

    policy, ref = pair_logps(model, batch)

    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        want = sequence_logps(untouched(**inputs).logits, batch["labels"])
    assert torch.allclose(ref, want, atol=1e-5)
    assert not torch.allclose(policy, want, atol=1e-3)


@pytest.mark.parametrize("method", ["full", "bitfit", ["lora", "prompt_tuning"]])
def test_a_method_peft_cannot_switch_off_wholly_is_refused(method) -> None:
    from fedpeft.methods import check_methods

    with pytest.raises(ScenarioError, match="switching peft's adapter off") as err:
        check_methods(PeftSection(method=method), "dpo")
    assert "\n" not in str(err.value)
    check_methods(PeftSection(method="lora"), "dpo")  # one peft method is fine


@pytest.mark.parametrize("strategy", ["flora", "fedex_lora"])
def test_strategies_that_fold_into_the_base_are_refused(strategy: str) -> None:
    from fedpeft.config import load_scenario
    from fedpeft.strategies import build_strategy

    scenario = load_scenario("llm-dpo", [f'strategy.name="{strategy}"'])
    with pytest.raises(ScenarioError, match="reference model") as err:
        build_strategy(scenario)
    assert "\n" not in str(err.value)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "Define dog.", "chosen": "an animal", "rejected": "a town"},
        {
            "prompt": [{"role": "user", "content": "Define dog."}],
            "chosen": [{"role": "assistant", "content": "an animal"}],
            "rejected": [{"role": "assistant", "content": "a town"}],
        },
        {
            "chosen": [
                {"role": "user", "content": "Define dog."},
                {"role": "assistant", "content": "an animal"},
            ],
            "rejected": [
                {"role": "user", "content": "Define dog."},
                {"role": "assistant", "content": "a town"},
            ],
        },
        {
            "chosen": "\n\nHuman: Define dog.\n\nAssistant: an animal",
            "rejected": "\n\nHuman: Define dog.\n\nAssistant: a town",
        },
    ],
    ids=["standard", "conversational", "turns-only", "hh-rlhf"],
)
def test_preference_layouts_become_prompt_chosen_rejected(tmp_path: Path, row) -> None:
    path = write_jsonl(tmp_path / "prefs.jsonl", [row] * 10)
    data = load_task_data(DataSection(name=str(path))).train
    got = data[0]
    assert got["chosen"] == "an animal" and got["rejected"] == "a town"
    if "prompt" in row or isinstance(row["chosen"], list):
        assert got["text"] == "Define dog."
    else:
        assert got["text"] == "\n\nHuman: Define dog.\n\nAssistant:"
    get_task("dpo").check_data(data, DataSection(name=str(path)))


def test_hh_transcripts_that_part_early_split_at_their_common_prompt(tmp_path: Path) -> None:
    row = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ciao",
        "rejected": "\n\nHuman: hi\n\nAssistant: go away",
    }
    path = write_jsonl(tmp_path / "hh.jsonl", [row] * 4)
    got = load_task_data(DataSection(name=str(path))).train[0]
    assert got["text"] == "\n\nHuman: hi\n\nAssistant:"
    assert got["chosen"] == "hello\n\nHuman: bye\n\nAssistant: ciao"
    assert got["rejected"] == "go away"
    unrelated = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c"}
    path = write_jsonl(tmp_path / "bad.jsonl", [unrelated] * 4)
    with pytest.raises(ScenarioError, match="share no prompt"):
        load_task_data(DataSection(name=str(path)))


def test_dpo_refuses_data_without_pairs(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sft.jsonl", [{"text": "q", "response": "a"}] * 4)
    cfg = DataSection(name=str(path))
    with pytest.raises(ScenarioError, match="reads preference pairs"):
        get_task("dpo").check_data(load_task_data(cfg).train, cfg)


def test_wordnet_preferences_prefer_the_words_own_definition() -> None:
    texts, chosen, rejected, labels = wordnet.read_noun_preferences()
    definitions = {t: [] for t in texts}
    for t, c in zip(texts, chosen, strict=True):
        definitions[t].append(c)
    assert (texts, chosen, rejected) == wordnet.read_noun_preferences()[:3]  # fixed seed
    assert all(r != c for c, r in zip(chosen, rejected, strict=True))
    assert all(r not in definitions[t] for t, r in zip(texts[:2000], rejected[:2000], strict=True))
    assert all('; "' in r for r in rejected)  # whole glosses, quoted examples and all
    assert not any('; "' in c for c in chosen)
    assert len(set(labels)) == len(wordnet.NOUN_SUPERSENSES)


@pytest.mark.slow(45)
def test_llm_dpo_runs_and_its_dpo_loss_falls(tmp_path: Path, quiet_env) -> None:
    out = tmp_path / "run"
    fewer = ["federation.rounds=2", "train.local_steps=4", "data.eval_examples=32"]
    command = ["run", "llm-dpo", "--set", 'simulation.engine="in-process"', "--out", str(out)]
    assert main([*command, *(arg for key in fewer for arg in ("--set", key))]) == 0

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] < math.log(2) + 1e-3
    for row in rows:
        assert {"eval_loss", "eval_accuracy", "eval_reward_margin"} <= set(row)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["initial"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["initial"]["eval_reward_margin"] == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
