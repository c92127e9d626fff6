"""Instruction data as users bring it: Alpaca rows (instruction, input, output), detected from
their columns, with the input inside the prompt; checked on token ids."""

import json

import pytest

from fedpeft.config import DataSection, ScenarioError, load_scenario
from fedpeft.data import load_task_data
from fedpeft.models import load_tokenizer
from fedpeft.tasks import get_task
from fedpeft.tools.cli import main

ROWS = [
    {"instruction": "Name the colour.", "input": "The sky on a clear day.", "output": "blue"},
    {"instruction": "Say hello.", "input": "", "output": "hello"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Count to two.", "output": "one two"},  # no input at all
]
# Alpaca's own prompts, typed out here (Taori et al., 2023, the Stanford Alpaca repository)
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@pytest.fixture
def alpaca_file(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def _rows(path):
    data = load_task_data(DataSection(name=str(path), test_fraction=0.25))
    rows = data.train.select(range(len(data.train)))
    return sorted(rows.to_list(), key=lambda r: r["text"])


def test_alpaca_columns_are_detected_and_the_input_is_kept(alpaca_file):
    rows = _rows(alpaca_file)
    assert all(set(r) == {"text", "input", "response"} for r in rows)
    by_text = {r["text"]: r for r in rows}
    for row in ROWS:
        if row["instruction"] in by_text:
            got = by_text[row["instruction"]]
            assert (got["input"], got["response"]) == (row.get("input", ""), row["output"])


def test_without_a_chat_template_the_prompt_is_alpacas_own(alpaca_file):
    tokenizer = load_tokenizer("tiny-llama")  # BERT's tokenizer: no template, SEP ends text
    collate = get_task("causal-lm").make_collate(tokenizer, max_length=128)
    for row in ROWS:
        rows = {
            "text": [row["instruction"]],
            "input": [row.get("input", "")],
            "response": [row["output"]],
        }
        batch = collate(rows)
        template = WITH_INPUT if row.get("input") else WITHOUT_INPUT
        prompt = tokenizer(template.format(**{"input": "", **row}), add_special_tokens=False)
        answer = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        expected = prompt["input_ids"] + answer + [tokenizer.sep_token_id]
        assert batch["input_ids"][0].tolist() == expected
        n = len(prompt["input_ids"])
        assert batch["labels"][0].tolist() == [-100] * n + expected[n:]


def test_with_a_chat_template_the_input_joins_the_user_turn():
    tokenizer = load_tokenizer("tiny-llama")
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    row = ROWS[0]
    batch = get_task("causal-lm").make_collate(tokenizer, max_length=128)(
        {"text": [row["instruction"]], "input": [row["input"]], "response": [row["output"]]}
    )
    user = f"{row['instruction']}\n\n{row['input']}"
    prompt = f"<user> {user} </s> <assistant> "
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0].tolist()[: len(prompt_ids)] == prompt_ids
    assert (batch["labels"][0][: len(prompt_ids)] == -100).all()
    assert (batch["labels"][0][len(prompt_ids) :] != -100).all()


def test_preview_shows_the_input_inside_the_prompt_and_marks_the_loss(
    alpaca_file, capsys, quiet_env
):
    sets = ["--set", f"data.name='{alpaca_file}'", "--set", "data.max_length=96"]
    assert main(["data", "preview", "smoke-llm", *sets, "--n", "3"]) == 0
    out = capsys.readouterr().out
    blocks = out.split("--- example ")[1:]
    assert len(blocks) == 3
    for block in blocks:
        text = block.splitlines()[2]
        prompt, _, rest = text.partition("[[")
        assert "# # # response :" in prompt and rest.endswith("[SEP]]]")  # BERT spaces "#"
        if "# # # input" in prompt:  # an example with an input: it is in the prompt, lowercased
            assert any(r.get("input") and r["input"].lower()[:5] in prompt for r in ROWS)


def test_a_format_that_does_not_fit_is_one_line(alpaca_file, tmp_path):
    no_output = tmp_path / "no_output.jsonl"
    no_output.write_text(json.dumps({"instruction": "i", "text": "t", "response": "r"}) + "\n")
    with pytest.raises(ScenarioError, match=r"data.format='alpaca' reads the columns"):
        load_task_data(DataSection(name=str(no_output), format="alpaca"))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ScenarioError, match=r"formats accepted: prompt-completion .*alpaca"):
        load_task_data(DataSection(name=str(other)))
    scenario = load_scenario("smoke-llm", [f"data.name='{alpaca_file}'", "data.format='alpaca'"])
    assert scenario.data.format == "alpaca"
