"""Multiple-choice benchmarks scored the way the leaderboards score them.

A question is written as lm-evaluation-harness writes MMLU::

    The following are multiple choice questions (with answers) about {subject}.

    {question}
    A. {choice 0}
    B. {choice 1}
    ...
    Answer:

(few-shot examples first, each ending in `` Answer: X`` and a blank line). Each choice is
scored by the model's log-likelihood of its letter (`` A``, `` B``, ...) after that
prompt, and the highest wins: the harness's ``acc``. Context and continuation are
tokenized as the harness does (the whole text, then the context's tokens cut off), so a
model scores the same here as there with the chat template off (on, the harness writes
the description as a system turn; here it opens the user's turn).

Every choice of a question shares its prompt. When each letter is one token (the usual
case) a question is one sequence: one forward pass of a batch of questions scores all
their choices at once. Otherwise each (question, choice) is its own sequence.

Data: the bundled offline ``wordnet-mc``; a local csv/jsonl/json/parquet file; or a hub
data set, ``NAME`` or ``NAME:CONFIG`` (``cais/mmlu:all``), read with ``datasets``. Rows
have a question, its choices (a ``choices`` list, or columns ``A``, ``B``, ...), the
answer (an index or a letter) and optionally a subject.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from fedpeft.config import ScenarioError
from fedpeft.data import wordnet
from fedpeft.data.files import LOCAL_SUFFIXES, read_local_file
from fedpeft.tasks.base import chunks
from fedpeft.tasks.causal_lm import pad_rows

LETTERS = string.ascii_uppercase
WORDNET_MC = "wordnet-mc"
WORDNET_MC_QUESTIONS = 1000  # scored questions of the bundled set
WORDNET_MC_SHOTS = 52  # its dev split: few-shot examples, 2 per supersense on average
WORDNET_MC_SEED = 2024
#: benchmarks that run offline, built on this machine
BUNDLED_BENCHMARKS = {
    WORDNET_MC: "WordNet nouns: a word and four definitions, one right; subjects are "
    "WordNet's lexicographer files (1,000 questions, offline)",
}


@dataclass(frozen=True)
class Question:
    """One multiple-choice question; ``answer`` indexes ``choices``."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""


@dataclass
class Benchmark:
    """The questions to score and the pool few-shot examples come from."""

    name: str
    questions: list[Question]
    shots: list[Question]


# ---------------------------------------------------------------------------- loading
def load_benchmark(name: str, limit: int = 0) -> Benchmark:
    """The benchmark ``name`` (bundled, a local file or a hub id), its first ``limit`` questions.

    A benchmark that cannot be read is one ScenarioError line.
    """
    if name == WORDNET_MC:
        questions, shots = _wordnet_mc()
    elif Path(name).suffix in LOCAL_SUFFIXES:
        rows = _questions(read_local_file(Path(name)), name)
        questions, shots = rows, []  # a file has no dev split: shots come from other rows
    else:
        questions, shots = _hub_benchmark(name)
    if limit:
        questions = questions[:limit]
    if not questions:
        raise ScenarioError(f"benchmark {name!r} has no questions")
    return Benchmark(name, list(questions), list(shots))


def _hub_benchmark(name: str) -> tuple[list[Question], list[Question]]:
    """``NAME[:CONFIG]`` from the hub: its test split, and its dev split for few-shot."""
    path, _, config = name.partition(":")
    try:
        splits = datasets.load_dataset(path, config or None)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; all mean "cannot load"
        raise ScenarioError(
            f"cannot load benchmark {name!r} (not bundled: {', '.join(BUNDLED_BENCHMARKS)}; not "
            f"a local {'/'.join(LOCAL_SUFFIXES)} file; hub: {str(err).splitlines()[0]})"
        ) from None
    test = "test" if "test" in splits else next(iter(splits))
    dev = next((s for s in ("dev", "validation") if s in splits and s != test), None)
    return _questions(splits[test], name), _questions(splits[dev], name) if dev else []


def _questions(rows: datasets.Dataset, source: str) -> list[Question]:
    """Rows as questions: ``choices`` or lettered columns; an index, letter or text answer."""
    columns = set(rows.column_names)
    lettered = [c for c in LETTERS if c in columns]
    if (
        "question" not in columns
        or "answer" not in columns
        or not ("choices" in columns or lettered)
    ):
        raise ScenarioError(
            f"benchmark {source}: needs columns question, answer and choices (a list) or A, "
            f"B, C, ...; it has {sorted(columns)}"
        )
    out = []
    for i, row in enumerate(rows.with_format("arrow")[:].to_pylist()):
        choices = _choices(row, lettered, source, i)
        out.append(
            Question(
                str(row["question"]),
                choices,
                _answer_index(row["answer"], choices, source, i),
                str(row.get("subject") or ""),
            )
        )
    return out


def _choices(row: dict[str, Any], lettered: list[str], source: str, index: int) -> tuple[str, ...]:
    """A row's choices: its ``choices`` list (a csv holds it as JSON text) or lettered cells.

    Empty lettered cells are dropped (a set with fewer choices in some rows); a csv's
    whole-number cells read as floats are written back as integers.
    """
    if "choices" in row:
        value = row["choices"]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        if not isinstance(value, list):
            raise ScenarioError(
                f"benchmark {source}: row {index + 1}'s choices is not a list (in a csv, write "
                'it as JSON: ["a", "b"]) or use columns A, B, ...'
            )
        return tuple(str(c) for c in value)
    cells = [row[c] for c in lettered if row[c] is not None and str(row[c]).strip() != ""]
    return tuple(str(int(c)) if isinstance(c, float) and c.is_integer() else str(c) for c in cells)


def _answer_index(answer: Any, choices: tuple[str, ...], source: str, row: int) -> int:
    """The answer as an index into ``choices``: from an int, a digit string or a letter."""
    text = str(answer).strip().strip('"')  # a json column of mixed types holds JSON text
    if isinstance(answer, int) or text.isdigit():
        index = int(text)
    elif len(text) == 1 and text.upper() in LETTERS:
        index = LETTERS.index(text.upper())
    else:
        index = -1
    if not 0 <= index < len(choices) or len(choices) < 2:
        raise ScenarioError(
            f"benchmark {source}: row {row + 1} has answer {answer!r}, not one of its "
            f"{len(choices)} choices (an index from 0 or a letter)"
        )
    return index


@lru_cache(maxsize=1)
def _wordnet_mc() -> tuple[list[Question], list[Question]]:
    """The bundled set: 'what does the word "X" mean?' and four definitions, one of them right.

    Only nouns with one sense are asked (a second sense's definition would also be right);
    the three wrong choices are definitions of other nouns, drawn with a fixed seed. The
    subject is the noun's lexicographer file (``noun.animal``, ...).
    """
    records = list(wordnet.noun_synsets())
    senses: dict[str, int] = defaultdict(int)
    for lemma, _, _ in records:
        senses[lemma.lower()] += 1
    rng = random.Random(WORDNET_MC_SEED)
    asked = [r for r in records if senses[r[0].lower()] == 1]
    rng.shuffle(asked)
    definitions = [wordnet.definition_of(gloss) for _, gloss, _ in records]
    questions = []
    for lemma, gloss, label in asked[: WORDNET_MC_QUESTIONS + WORDNET_MC_SHOTS]:
        right = wordnet.definition_of(gloss)
        wrong: list[str] = []
        while len(wrong) < 3:
            other = definitions[rng.randrange(len(definitions))]
            if other != right and other not in wrong:
                wrong.append(other)
        answer = rng.randrange(4)
        choices = (*wrong[:answer], right, *wrong[answer:])
        word = lemma.replace("_", " ")
        questions.append(
            Question(
                f'What does the word "{word}" mean?',
                choices,
                answer,
                wordnet.NOUN_SUPERSENSES[label],
            )
        )
    return questions[WORDNET_MC_SHOTS:], questions[:WORDNET_MC_SHOTS]


def metric_name(name: str) -> str:
    """The metrics.jsonl key of a benchmark's accuracy: ``eval_wordnet_mc_accuracy``."""
    stem = Path(name).stem if Path(name).suffix in LOCAL_SUFFIXES else name
    return f"eval_{re.sub(r'[^0-9a-zA-Z]+', '_', stem).strip('_').lower()}_accuracy"


# ---------------------------------------------------------------------------- prompts
def describe(subject: str) -> str:
    """The harness's MMLU description line for ``subject`` (none without a subject)."""
    if not subject:
        return ""
    topic = subject.replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {topic}.\n\n"


def question_block(q: Question) -> str:
    """``question``, the lettered choices, and ``Answer:``."""
    lines = [q.question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)]
    return "\n".join(lines) + "\nAnswer:"


def few_shot_examples(q: Question, bench: Benchmark, k: int) -> list[Question]:
    """``k`` solved examples for ``q``: the dev split's of its subject first, then any.

    A set without a dev split lends its own other questions.
    """
    if k <= 0:
        return []
    pool = bench.shots or [x for x in bench.questions if x != q]
    same = [x for x in pool if x.subject == q.subject]
    rest = [x for x in pool if x.subject != q.subject]
    return (same + rest)[:k]


def prompt_text(
    q: Question, shots: list[Question], tokenizer: PreTrainedTokenizerBase, chat_template: bool
) -> tuple[str, list[str]]:
    """The context and each choice's continuation, as text.

    Without a chat template: the harness's MMLU text, continuations `` A``, `` B``, ...
    With one: that text is the user's turn, and the letters follow the assistant header.
    """
    examples = "".join(f"{question_block(s)} {LETTERS[s.answer]}\n\n" for s in shots)
    text = describe(q.subject) + examples + question_block(q)
    letters = [LETTERS[i] for i in range(len(q.choices))]
    if not chat_template:
        return text, [f" {letter}" for letter in letters]
    if not getattr(tokenizer, "chat_template", None):
        raise ScenarioError(
            f"eval.chat_template is true but {tokenizer.name_or_path} has no chat template"
        )
    turns = [{"role": "user", "content": text}]
    chat = str(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True))
    return chat, letters


def leading_bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``[BOS]`` if the tokenizer puts one before a text by default (Llama 3), else ``[]``.

    The harness's default too: it encodes with the tokenizer's own special tokens.
    """
    bos = tokenizer.bos_token_id
    if not isinstance(bos, int):
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def encode_requests(
    tokenizer: PreTrainedTokenizerBase,
    context: str,
    continuations: list[str],
    bos: list[int] | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Token ids of (context, continuation) per choice, split as lm-evaluation-harness does.

    Trailing whitespace of the context moves to the continuation; the whole text is
    tokenized and the context's own tokens are cut off its front. ``bos`` (default:
    :func:`leading_bos`) leads, unless the context already starts with it (a chat template
    that writes its own BOS).
    """
    bos = leading_bos(tokenizer) if bos is None else bos
    if bos and tokenizer.bos_token and context.startswith(str(tokenizer.bos_token)):
        bos = []
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuations = context[:-spaces], [context[-spaces:] + c for c in continuations]
    texts = [context] + [context + c for c in continuations]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    head, *wholes = (bos + list(ids) for ids in encoded)
    return [(whole[: len(head)], whole[len(head) :]) for whole in wholes]


def _virtual_tokens(model: torch.nn.Module) -> int:
    """Positions a prompt-learning adapter prepends to the input (prefix tuning: none)."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not config.is_prompt_learning or config.peft_type == "PREFIX_TUNING":
        return 0
    return int(config.num_virtual_tokens)


# ---------------------------------------------------------------------------- scoring
@torch.no_grad()
def choice_loglikelihoods(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[tuple[str, list[str]]],
    *,
    batch_size: int,
    device: torch.device,
    max_length: int | None = None,
) -> list[list[float]]:
    """Log p(continuation | context) of each (context, continuations) request's choices.

    A request whose continuations are single tokens after one shared context is one
    sequence (its last position scores every choice); any other is one sequence per
    choice. Sequences run ``batch_size`` at a time in order of length, right-padded, and
    the LM head computes logits only at the positions scored (``logits_to_keep``). A
    sequence longer than ``max_length`` (default: the model's ``max_position_embeddings``)
    loses its oldest context tokens, as in the harness.
    """
    model.eval()
    rows: list[tuple[list[int], list[tuple[int, int, list[int]]]]] = []  # ids, (req, choice, cont)
    bos = leading_bos(tokenizer)
    for r, (context, continuations) in enumerate(requests):
        pairs = encode_requests(tokenizer, context, continuations, bos)
        shared = all(len(cont) == 1 and ctx == pairs[0][0] for ctx, cont in pairs)
        if shared and pairs[0][0]:
            rows.append((pairs[0][0] + [0], [(r, c, cont) for c, (_, cont) in enumerate(pairs)]))
        else:
            rows.extend((ctx + cont, [(r, c, cont)]) for c, (ctx, cont) in enumerate(pairs))
    limit = max_length or getattr(getattr(model, "config", None), "max_position_embeddings", 0)
    if limit:  # the input is a row without its last token: keep at most limit of those
        rows = [(ids[-(limit + 1) :], targets) for ids, targets in rows]
    rows.sort(key=lambda row: len(row[0]))
    scores = [[0.0] * len(c) for _, c in requests]
    pad, shift = int(tokenizer.pad_token_id or 0), _virtual_tokens(model)
    for idx in chunks(range(len(rows)), batch_size):
        seqs = [rows[i][0][:-1] for i in idx]  # the last token predicts nothing we score
        input_ids, mask = pad_rows(seqs, pad)
        spans = {  # (row, choice) -> positions predicting its continuation's tokens
            (j, t): range(len(rows[i][0]) - 1 - len(cont), len(rows[i][0]) - 1)
            for j, i in enumerate(idx)
            for t, (_, _, cont) in enumerate(rows[i][1])
        }
        kept = sorted({p for span in spans.values() for p in span})
        column = {p: k for k, p in enumerate(kept)}
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            logits_to_keep=torch.as_tensor(kept, device=device) + shift,
        ).logits
        for (j, t), span in spans.items():
            r, c, cont = rows[idx[j]][1][t]
            logprobs = F.log_softmax(logits[j, [column[p] for p in span]].float(), dim=-1)
            picked = logprobs.gather(-1, torch.as_tensor(cont, device=device).unsqueeze(-1))
            scores[r][c] = float(picked.sum())
    return scores


def score_benchmark(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    bench: Benchmark,
    *,
    few_shot: int = 0,
    chat_template: bool = False,
    batch_size: int = 16,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Accuracy overall and per subject: the choice of highest log-likelihood is the answer."""
    device = device or next(model.parameters()).device
    requests = [
        prompt_text(q, few_shot_examples(q, bench, few_shot), tokenizer, chat_template)
        for q in bench.questions
    ]
    scores = choice_loglikelihoods(model, tokenizer, requests, batch_size=batch_size, device=device)
    hits: dict[str, list[int]] = defaultdict(list)
    for q, s in zip(bench.questions, scores, strict=True):
        hits[q.subject].append(int(max(range(len(s)), key=s.__getitem__) == q.answer))
    every = [h for subject in hits.values() for h in subject]
    return {
        "benchmark": bench.name,
        "accuracy": sum(every) / len(every),
        "questions": len(every),
        "chance": sum(1 / len(q.choices) for q in bench.questions) / len(bench.questions),
        "few_shot": few_shot,
        "chat_template": chat_template,
        "subjects": {
            subject or "all": {"accuracy": sum(h) / len(h), "questions": len(h)}
            for subject, h in sorted(hits.items())
        },
    }
