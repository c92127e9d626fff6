"""Instruction data as users bring it: Alpaca rows (instruction, input, output), detected from
their columns, with the input inside the prompt; checked on token ids."""

import json

import pytest
import torch

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


CONVERSATION = [
    {"role": "user", "content": "Define the word dog."},
    {"role": "assistant", "content": "a domestic animal"},
    {"role": "user", "content": "Name its category."},
    {"role": "assistant", "content": "noun.animal"},
    {"role": "user", "content": "A broader word?"},
    {"role": "assistant", "content": "canine"},
]
FROM = {"user": "human", "assistant": "gpt"}


@pytest.fixture
def chat_files(tmp_path):
    messages, sharegpt = tmp_path / "messages.jsonl", tmp_path / "sharegpt.jsonl"
    rows = [CONVERSATION, CONVERSATION[:4], CONVERSATION[2:]]
    messages.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    twins = [[{"from": FROM[t["role"]], "value": t["content"]} for t in r] for r in rows]
    sharegpt.write_text("".join(json.dumps({"conversations": r, "id": 1}) + "\n" for r in twins))
    return messages, sharegpt


def test_only_the_assistant_turns_carry_the_loss():
    tokenizer = load_tokenizer("tiny-llama")  # no chat template: ChatML, typed out below
    batch = get_task("causal-lm").make_collate(tokenizer, max_length=256)(
        {"messages": [CONVERSATION]}
    )
    ids, labels = [], []
    for turn in CONVERSATION:
        if turn["role"] == "user":
            pieces = [(f"<|im_start|>user\n{turn['content']}<|im_end|>\n", False)]
        else:
            pieces = [("<|im_start|>assistant\n", False), (f"{turn['content']}<|im_end|>\n", True)]
        for text, loss in pieces:
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += tokens
            labels += tokens if loss else [-100] * len(tokens)
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == labels
    scored = [t for t, lab in zip(ids, labels, strict=True) if lab != -100]
    decoded = tokenizer.decode(scored)
    for answer in ("a domestic animal", "noun. animal", "canine"):
        assert answer in decoded
    assert "dog" not in decoded and "category" not in decoded  # the user's words carry none


def test_a_sharegpt_file_gives_the_tokens_of_its_messages_twin(chat_files):
    messages, sharegpt = chat_files
    tokenizer = load_tokenizer("tiny-llama")
    collate = get_task("causal-lm").make_collate(tokenizer, max_length=256)
    batches = []
    for path in (messages, sharegpt):
        data = load_task_data(DataSection(name=str(path), test_fraction=0.34))
        assert data.train.column_names == ["messages"]
        rows = sorted(data.train.to_list(), key=lambda r: json.dumps(r))
        batches.append(collate({"messages": [r["messages"] for r in rows]}))
    assert torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])
    assert torch.equal(batches[0]["labels"], batches[1]["labels"])


def test_a_turn_of_an_unknown_role_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversations": [{"from": "bot", "value": "hi"}]}) + "\n")
    with pytest.raises(ScenarioError, match=r"row 1 has a turn .* from = human, gpt or system"):
        load_task_data(DataSection(name=str(bad)))


def test_the_bundled_chats_follow_a_definition_with_a_broader_word():
    from fedpeft.data import wordnet

    chats = wordnet.read_noun_conversations()
    assert len(chats) == 82115
    assert all([t["role"] for t in c] == ["user", "assistant"] * 2 for c in chats)
    dog = next(c for c in chats if c[1]["content"].startswith("a member of the genus Canis"))
    assert dog[0]["content"] == "Define the word dog."
    assert dog[2:] == [
        {"role": "user", "content": "Name a broader word."},
        {"role": "assistant", "content": "canine"},
    ]


@pytest.mark.slow(40)
def test_llm_chat_learns_its_conversations_in_process(tmp_path):
    from fedpeft.clients.app import app as client_app
    from fedpeft.server.inprocess import InProcessGrid
    from fedpeft.server.run import run_federation

    scenario = load_scenario(
        "llm-chat",
        [
            "federation.rounds=2",
            "train.local_steps=8",
            "train.batch_size=8",
            "data.max_length=64",
            "data.eval_examples=32",
            "train.eval_generate=2",
        ],
    )
    summary = run_federation(InProcessGrid(client_app, 4), scenario, tmp_path, "in-process")
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]
