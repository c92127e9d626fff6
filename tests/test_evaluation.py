"""Multiple-choice benchmarks, ``[eval] benchmarks`` in a run, and ``fedpeft eval``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedpeft.config import ModelSection, ScenarioError
from fedpeft.data import wordnet
from fedpeft.evaluation import multiple_choice as mc
from fedpeft.evaluation.generation import Sampling, read_prompts
from fedpeft.model_sources import load_tokenizer
from fedpeft.models import load_base_model
from fedpeft.tasks import generate_responses
from fedpeft.tools.cli import main

QUESTIONS = 24  # scored in the end-to-end run: enough subjects, a few seconds


@pytest.fixture(scope="module")
def tiny():
    """A random tiny Llama and its (MiniLM) tokenizer."""
    torch.manual_seed(0)
    model = load_base_model(ModelSection(name="tiny-llama", task="causal-lm"), 0).eval()
    return model, load_tokenizer("tiny-llama")


def by_hand(model, tokenizer, context: str, continuation: str, limit: int = 128) -> float:
    """log p(continuation | context): one unpadded sequence, the split written out.

    As lm-evaluation-harness: the whole text is tokenized and the context's tokens cut
    off its front; a text over ``limit`` + 1 tokens (the tiny Llama's 128 positions) loses
    its oldest ones; the continuation's tokens are scored one by one.
    """
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    head = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    cut = max(0, len(whole) - (limit + 1))
    whole, head = whole[cut:], head - cut
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0]
    total = 0.0
    for position in range(head, len(whole)):
        total += F.log_softmax(logits[position - 1].double(), -1)[whole[position]].item()
    return total


def test_loglikelihoods_equal_a_hand_computation_for_letters_and_texts(tiny) -> None:
    model, tok = tiny
    bench = mc.load_benchmark("wordnet-mc", 3)
    letters = [mc.prompt_text(q, [], tok, chat_template=False) for q in bench.questions]
    texts = [(f"Q: {q.question}\nA:", [f" {c}" for c in q.choices]) for q in bench.questions]
    requests = letters + texts  # one sequence per question, then one per choice

    batched = mc.choice_loglikelihoods(
        model, tok, requests, batch_size=5, device=torch.device("cpu")
    )
    one_by_one = mc.choice_loglikelihoods(
        model, tok, requests, batch_size=1, device=torch.device("cpu")
    )

    for (context, continuations), got, alone in zip(requests, batched, one_by_one, strict=True):
        want = [by_hand(model, tok, context, c) for c in continuations]
        assert got == pytest.approx(want, abs=1e-4)
        assert alone == pytest.approx(want, abs=1e-4)
    assert any(
        len(tok(c, add_special_tokens=False)["input_ids"]) > 1 for _, cs in texts for c in cs
    )


def test_a_long_context_loses_its_oldest_tokens(tiny) -> None:
    model, tok = tiny
    q = mc.load_benchmark("wordnet-mc", 1).questions[0]
    request = mc.prompt_text(q, [], tok, chat_template=False)

    short = mc.choice_loglikelihoods(
        model, tok, [request], batch_size=1, device=torch.device("cpu"), max_length=20
    )[0]

    assert short == pytest.approx(
        [by_hand(model, tok, request[0], c, 20) for c in request[1]], abs=1e-4
    )
    assert short != pytest.approx(
        [by_hand(model, tok, request[0], c) for c in request[1]], abs=1e-3
    )


def test_accuracy_is_the_share_of_questions_whose_best_choice_is_the_answer(tiny) -> None:
    model, tok = tiny
    bench = mc.load_benchmark("wordnet-mc", 30)
    result = mc.score_benchmark(model, tok, bench, few_shot=1, batch_size=8)

    requests = [
        mc.prompt_text(q, mc.few_shot_examples(q, bench, 1), tok, False) for q in bench.questions
    ]
    scores = [[by_hand(model, tok, ctx, c) for c in conts] for ctx, conts in requests]
    right = [
        max(range(4), key=s.__getitem__) == q.answer
        for s, q in zip(scores, bench.questions, strict=True)
    ]
    assert result["accuracy"] == pytest.approx(sum(right) / 30)
    subjects = result["subjects"]
    assert sum(s["questions"] for s in subjects.values()) == 30
    weighted = sum(s["accuracy"] * s["questions"] for s in subjects.values()) / 30
    assert weighted == pytest.approx(result["accuracy"])
    assert set(subjects) <= set(wordnet.NOUN_SUPERSENSES)


def test_wordnet_mc_has_one_right_definition_per_question() -> None:
    questions, shots = mc._wordnet_mc.__wrapped__()  # built afresh: the same every time
    assert (questions, shots) == mc._wordnet_mc()
    assert len(questions) == mc.WORDNET_MC_QUESTIONS and len(shots) == mc.WORDNET_MC_SHOTS
    gloss_of = {
        lemma.replace("_", " "): wordnet.definition_of(g) for lemma, g, _ in wordnet.noun_synsets()
    }
    for q in questions[:200]:
        word = q.question.removeprefix('What does the word "').removesuffix('" mean?')
        assert len(set(q.choices)) == 4 and q.choices[q.answer] == gloss_of[word]
    assert {q.answer for q in questions} == {0, 1, 2, 3}
    assert len({q.subject for q in questions}) > 20
    assert not {q.question for q in shots} & {q.question for q in questions}


def test_few_shot_prompt_is_the_harness_mmlu_text() -> None:
    shot = mc.Question("2 + 2 =", ("3", "4"), 1, "elementary_mathematics")
    q = mc.Question("1 + 1 =", ("2", "5"), 0, "elementary_mathematics")
    bench = mc.Benchmark("toy", [q], [shot])
    text, continuations = mc.prompt_text(q, mc.few_shot_examples(q, bench, 1), None, False)
    assert text == (
        "The following are multiple choice questions (with answers) about elementary "
        "mathematics.\n\n2 + 2 =\nA. 3\nB. 4\nAnswer: B\n\n1 + 1 =\nA. 2\nB. 5\nAnswer:"
    )
    assert continuations == [" A", " B"]


def test_local_files_with_choice_lists_or_lettered_columns(tmp_path: Path) -> None:
    listed = tmp_path / "mine.jsonl"
    listed.write_text(
        json.dumps({"question": "Sky?", "choices": ["blue", "green", "red"], "answer": "A"})
        + "\n"
        + json.dumps({"question": "Grass?", "choices": ["blue", "green"], "answer": 1})
        + "\n"
    )
    lettered = tmp_path / "mmlu.csv"
    lettered.write_text("question,A,B,C,D,answer,subject\nx?,1,2,3,4,C,maths\n")

    a, b = mc.load_benchmark(str(listed)), mc.load_benchmark(str(lettered))

    assert [(q.choices, q.answer) for q in a.questions] == [
        (("blue", "green", "red"), 0),
        (("blue", "green"), 1),
    ]
    assert b.questions == [mc.Question("x?", ("1", "2", "3", "4"), 2, "maths")]
    assert mc.metric_name(str(lettered)) == "eval_mmlu_accuracy"
    assert mc.metric_name("cais/mmlu:all") == "eval_cais_mmlu_all_accuracy"


def test_csv_choices_as_json_and_blank_lettered_cells(tmp_path: Path) -> None:
    listed = tmp_path / "listed.csv"
    listed.write_text('question,choices,answer\nq?,"[""x"", ""y""]",1\n')
    lettered = tmp_path / "lettered.csv"
    lettered.write_text("question,A,B,C,D,answer\nq?,1,2,3,,B\nr?,5,6,7,8,D\n")

    assert mc.load_benchmark(str(listed)).questions[0].choices == ("x", "y")
    rows = mc.load_benchmark(str(lettered)).questions
    assert [q.choices for q in rows] == [("1", "2", "3"), ("5", "6", "7", "8")]
    bad = tmp_path / "bad.csv"
    bad.write_text("question,choices,answer\nq?,x or y,0\n")
    with pytest.raises(ScenarioError, match="choices is not a list"):
        mc.load_benchmark(str(bad))


def test_a_chat_template_that_writes_its_bos_gets_no_second_one() -> None:
    import copy

    tok = copy.deepcopy(load_tokenizer("tiny-llama"))
    tok.bos_token = tok.cls_token  # BERT's tokenizer then "adds a BOS" by default: [CLS]
    assert mc.leading_bos(tok) == [tok.cls_token_id]
    ((plain, _),) = mc.encode_requests(tok, "hi there", [" a"])
    ((chat, _),) = mc.encode_requests(tok, "[CLS] hi there", [" a"])
    assert plain[0] == tok.cls_token_id and plain[1] != tok.cls_token_id
    assert chat[0] == tok.cls_token_id and chat[1] != tok.cls_token_id


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "row 1 has answer 2"),
        ({"question": "q", "choices": ["a", "b"], "answer": "Z"}, "row 1 has answer 'Z'"),
        ({"question": "q", "answer": 0}, "needs columns question, answer and choices"),
    ],
)
def test_a_bad_benchmark_file_is_one_error_line(tmp_path: Path, line, message) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(ScenarioError, match=message) as err:
        mc.load_benchmark(str(path))
    assert "\n" not in str(err.value)


def test_prompt_files_of_every_layout(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    lines = [
        {"prompt": "Define the word dog."},
        {"instruction": "Translate.", "input": "chien"},
        {"question_id": 81, "turns": ["Define cat.", "Name a broader word."]},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ]
        },
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    rows = read_prompts(path)
    assert [r["turns"] for r in rows] == [
        ["Define the word dog."],
        ["Translate."],
        ["Define cat.", "Name a broader word."],
        ["Hi"],
    ]
    assert [r["question_id"] for r in rows] == [1, 2, 81, 4]
    assert [r["context"] for r in rows] == [None, "chien", None, None]  # Alpaca's input
    path.write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    with pytest.raises(ScenarioError, match="line 2: needs a prompt"):
        read_prompts(path)


def test_run_scores_benchmarks_and_fedpeft_eval_reproduces_them(
    tmp_path: Path, quiet_env, capsys
) -> None:
    """``[eval] benchmarks`` in metrics.jsonl and summary.json; ``fedpeft eval`` agrees."""
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "smoke-llm",
                "--set",
                'simulation.engine="in-process"',
                "--set",
                'eval.benchmarks=["wordnet-mc"]',
                "--set",
                f"eval.questions={QUESTIONS}",
                "--set",
                "eval.every=1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["benchmarks"]["wordnet-mc"]["questions"] for r in rows] == [QUESTIONS, QUESTIONS]
    assert all(
        r["eval_wordnet_mc_accuracy"] == r["benchmarks"]["wordnet-mc"]["accuracy"] for r in rows
    )
    summary = json.loads((out / "summary.json").read_text())
    served = summary["benchmarks"]["wordnet-mc"]
    assert summary["final"]["eval_wordnet_mc_accuracy"] == served["accuracy"]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Define the word dog."}\n{"turns": ["Define cat.", "More?"]}\n')
    assert (
        main(
            [
                "eval",
                str(out),
                "--benchmark",
                "wordnet-mc",
                "--questions",
                str(QUESTIONS),
                "--generate",
                str(prompts),
                "--max-new-tokens",
                "6",
            ]
        )
        == 0
    )

    scored = json.loads((out / "eval.json").read_text())["benchmarks"]["wordnet-mc"]
    assert scored["accuracy"] == served["accuracy"]  # the saved adapter is the served one
    assert scored["subjects"] == served["subjects"]
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [len(a["choices"][0]["turns"]) for a in answers] == [1, 2]
    from fedpeft.tools.evaluate import load_run_model

    model, tok, _ = load_run_model(out)
    greedy = generate_responses(
        model,
        tok,
        ["Define the word dog."],
        batch_size=1,
        max_length=64,
        max_new_tokens=6,
        device=torch.device("cpu"),
    )[0]
    assert answers[0]["answer"] == tok.decode(greedy, skip_special_tokens=True).strip()
    assert Sampling().temperature == 0  # greedy unless asked


def test_eval_refuses_a_folder_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    assert main(["eval", str(tmp_path), "--benchmark", "wordnet-mc"]) == 2
    assert "not the folder of a finished fedpeft run" in capsys.readouterr().err


def test_benchmarks_need_a_language_model() -> None:
    from fedpeft.config import load_scenario

    with pytest.raises(ScenarioError, match="eval.benchmarks"):
        load_scenario("smoke", ['eval.benchmarks=["wordnet-mc"]'])


def test_the_chat_template_wraps_the_question_as_a_user_turn() -> None:
    import copy

    tok = copy.deepcopy(load_tokenizer("tiny-llama"))
    q = mc.Question("1 + 1 =", ("2", "5"), 0)
    with pytest.raises(ScenarioError, match="has no chat template"):
        mc.prompt_text(q, [], tok, chat_template=True)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )

    text, continuations = mc.prompt_text(q, [], tok, chat_template=True)

    assert text == "<user>1 + 1 =\nA. 2\nB. 5\nAnswer:</s><assistant>"
    assert continuations == ["A", "B"]  # the letter opens the assistant's turn


def test_a_set_without_dev_split_lends_its_other_questions_as_shots() -> None:
    qs = [mc.Question(f"q{i}", ("a", "b"), 0, "s" if i < 3 else "t") for i in range(5)]
    bench = mc.Benchmark("file", qs, [])
    assert mc.few_shot_examples(qs[0], bench, 2) == [qs[1], qs[2]]
    assert mc.few_shot_examples(qs[3], bench, 3) == [qs[4], qs[0], qs[1]]  # own subject first
    assert mc.few_shot_examples(qs[3], bench, 0) == []
