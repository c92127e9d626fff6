"""Row formats of a data set, normalised to the columns the tasks read.

Instruction sets (Alpaca's ``instruction``/``input``/``output``), conversations
(``messages``, ShareGPT's ``conversations``) and preference pairs (TRL's standard and
conversational forms, HH-RLHF transcripts) become the canonical columns of
:mod:`fedpeft.data`; a malformed row is one :class:`ScenarioError` naming the data set,
the row and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets

from fedpeft.config import DataSection, ScenarioError
from fedpeft.data.files import LOCAL_SUFFIXES, row_name


def column(data: datasets.Dataset, name: str) -> list[Any]:
    """All values of one column, read through Arrow.

    ``data[name]`` is a lazy column that formats row by row: about 150 times slower on a
    40,000-row partition (1.3 s against 9 ms).
    """
    values: list[Any] = data.with_format("arrow")[name].to_pylist()
    return values


ALPACA_COLUMNS = ("instruction", "output")  # and, optionally, "input"
ALPACA_INPUT = "input"  # kept under this name: the causal-lm task reads it
MESSAGES = "messages"  # a conversation: a list of {role, content} turns
SHAREGPT = "conversations"  # ShareGPT's: a list of {from, value} turns
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")
FORMATS = (
    "prompt-completion (data.text_column, data.response_column), "
    "alpaca (instruction, input, output), messages (role/content turns), "
    "sharegpt (conversations: from/value turns)"
)
CONVERSATIONS = ("messages", "sharegpt")  # the formats whose rows are whole conversations
CHOSEN, REJECTED = "chosen", "rejected"  # a preference pair's responses (dpo)
PREFERENCE_PROMPTS = ("prompt", "question", "instruction")  # where hub sets keep the prompt
HH_ASSISTANT = "\n\nAssistant:"  # Anthropic HH-RLHF: whole transcripts, no prompt column


def row_format(columns: list[str], cfg: DataSection) -> str:
    """``cfg.format``, with ``auto`` resolved from the columns (the text column first)."""
    preference = {CHOSEN, REJECTED} <= set(columns)
    if cfg.format == "preference" and not preference:
        raise ScenarioError(
            f"data.format='preference' reads the columns chosen and rejected, but data set "
            f"{cfg.name!r} has {columns}"
        )
    if cfg.format == "preference" or (cfg.format == "auto" and preference):
        return "preference"
    if cfg.format != "auto":
        if cfg.format == "alpaca" and not set(ALPACA_COLUMNS) <= set(columns):
            raise ScenarioError(
                f"data.format='alpaca' reads the columns instruction, input (optional) and "
                f"output, but data set {cfg.name!r} has {columns}"
            )
        if (
            cfg.format in CONVERSATIONS
            and {"messages": MESSAGES, "sharegpt": SHAREGPT}[cfg.format] not in columns
        ):
            column = MESSAGES if cfg.format == "messages" else SHAREGPT
            raise ScenarioError(
                f"data.format={cfg.format!r} reads the column {column!r}, but data set "
                f"{cfg.name!r} has {columns}"
            )
        return cfg.format
    if cfg.text_column in columns:
        return "prompt-completion"
    if set(ALPACA_COLUMNS) <= set(columns):
        return "alpaca"
    if MESSAGES in columns:
        return "messages"
    if SHAREGPT in columns:
        return "sharegpt"
    return "prompt-completion"


def conversations(dd: datasets.DatasetDict, fmt: str, source: str) -> datasets.DatasetDict:
    """Whole conversations as one ``messages`` column of {role, content} turns.

    ShareGPT's {from, value} turns are renamed (human: user, gpt: assistant). A turn of
    another role, or a conversation without an assistant turn (nothing to learn), is one
    error line naming the row.
    """
    column = MESSAGES if fmt == "messages" else SHAREGPT

    def convert(rows: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        out = []
        for row, turns in zip(indices, rows[column], strict=True):
            messages = [_turn(turn, fmt, source, row) for turn in turns or []]
            if not any(m["role"] == "assistant" for m in messages):
                raise ScenarioError(
                    f"data set {source!r}: row {row + 1} has no assistant turn (nothing to "
                    "train on); drop it or add the response"
                )
            out.append(messages)
        return {MESSAGES: out}

    return dd.map(convert, batched=True, with_indices=True, remove_columns=dd["train"].column_names)


def _turn(turn: dict[str, Any], fmt: str, source: str, row: int) -> dict[str, str]:
    if fmt == "sharegpt":
        role, content = SHAREGPT_ROLES.get(str(turn.get("from")), ""), turn.get("value")
        known = "from = human, gpt or system"
    else:
        role, content = str(turn.get("role")), turn.get("content")
        known = "role = system, user or assistant"
    if role not in ROLES or not isinstance(content, str):
        raise ScenarioError(
            f"data set {source!r}: row {row + 1} has a turn {turn!r}; each turn needs {known} "
            "and a text"
        )
    return {"role": role, "content": content}


def from_preferences(dd: datasets.DatasetDict, cfg: DataSection) -> datasets.DatasetDict:
    """Preference pairs as (text, chosen, rejected) strings, from the common hub layouts.

    * a prompt column (``data.text_column``, prompt, question or instruction) and chosen,
      rejected strings (TRL's standard form);
    * the same with chosen and rejected as role/content turns, or a prompt of turns (TRL's
      conversational form, UltraFeedback): the last user turn is the prompt, the last
      assistant turn the response;
    * chosen and rejected whole transcripts without a prompt (Anthropic HH-RLHF): the
      prompt is their text up to the last ``Assistant:``.

    A label column (``data.label_column``) is kept, for label-skewed partitioners.
    """
    columns = dd["train"].column_names
    prompt = next((c for c in (cfg.text_column, *PREFERENCE_PROMPTS) if c in columns), None)
    label = cfg.label_column if cfg.label_column in columns else None

    def convert(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"text": [], CHOSEN: [], REJECTED: []}
        for i in range(len(rows[CHOSEN])):
            good, bad = rows[CHOSEN][i], rows[REJECTED][i]
            if prompt is not None:
                text = _last_turn(rows[prompt][i], "user")
            elif isinstance(good, str) and isinstance(bad, str):
                text, good, bad = _split_transcripts(good, bad, cfg.name, i)
            else:
                text = _last_turn(good, "user")
            out["text"].append(text)
            out[CHOSEN].append(_last_turn(good, "assistant").strip())
            out[REJECTED].append(_last_turn(bad, "assistant").strip())
        if label is not None:
            out["label"] = rows[label]
        return out

    return dd.map(convert, batched=True, remove_columns=columns)


def _split_transcripts(good: str, bad: str, source: str, row: int) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of two whole transcripts (Anthropic HH-RLHF).

    The prompt is their common text up to its last ``Assistant:``, as TRL's
    ``extract_prompt`` takes it; two transcripts without one are one error line.
    """
    common = len(os.path.commonprefix([good, bad]))
    cut = good.rfind(HH_ASSISTANT, 0, common)
    if cut < 0:
        raise ScenarioError(
            f"data set {source!r}: row {row + 1}'s chosen and rejected transcripts share no "
            "prompt ending in 'Assistant:'; give a prompt column"
        )
    cut += len(HH_ASSISTANT)
    return good[:cut], good[cut:], bad[cut:]


def _last_turn(value: Any, role: str) -> str:
    """A string as it is; from role/content turns, the content of the last ``role`` turn."""
    if isinstance(value, list):
        turns = [t for t in value if isinstance(t, dict) and t.get("role") == role]
        return str(turns[-1].get("content", "")) if turns else ""
    return "" if value is None else str(value)


def from_alpaca(dd: datasets.DatasetDict) -> datasets.DatasetDict:
    """Alpaca rows as the causal-lm task reads them.

    instruction becomes text and output response; the input (empty when absent) is kept
    under its name, to join the prompt.
    """

    def convert(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
        n = len(rows["instruction"])
        inputs = rows.get(ALPACA_INPUT) or [""] * n
        return {
            "text": rows["instruction"],
            ALPACA_INPUT: [value or "" for value in inputs],
            "response": rows["output"],
        }

    return dd.map(convert, batched=True, remove_columns=dd["train"].column_names)


def check_rows(dd: datasets.DatasetDict, found: dict[str, str], source: str) -> None:
    """Refuse, in one line, the first row whose text, response, image or label is missing.

    A missing value would otherwise surface rounds later as a TypeError in a client (a
    csv's empty field is a null); a label that is only blanks counts as missing too.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    for split in ("train", "test"):
        if split not in dd:
            continue
        part = dd[split]
        table = part.with_format("arrow")[:]
        for canonical, column in found.items():
            values = table.column(canonical)
            missing = pc.is_null(values)
            if canonical == "label" and (
                pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
            ):
                blank = pc.equal(pc.utf8_trim_whitespace(values), "")
                missing = pc.or_(missing, pc.fill_null(blank, True))
            row = pc.index(missing, True).as_py()
            if row < 0:
                continue
            if Path(source).suffix in LOCAL_SUFFIXES:  # a file: its only split is all of it
                where = f"data file {source}: {row_name(Path(source), row, len(part))}"
            else:
                where = f"data set {source!r}: split {split!r}, row {row + 1}"
            raise ScenarioError(
                f"{where} has an empty {canonical} (column {column!r}); fill it in or drop the row"
            )


def encode_as(dd: datasets.DatasetDict, names: list[str], source: str) -> datasets.DatasetDict:
    """Labels (names or class ids) as ``ClassLabel(names)``; anything else is one error line."""
    feature = dd["train"].features["label"]

    def name_of(value: Any) -> Any:
        return feature.int2str(value) if isinstance(feature, datasets.ClassLabel) else value

    values = {name_of(v) for v in column(dd["train"], "label")}
    if all(isinstance(v, int) for v in values):
        bad: list[Any] = sorted(v for v in values if not 0 <= v < len(names))

        def to_id(value: Any) -> int:
            return int(value)
    else:
        bad = sorted(str(v) for v in values if str(v) not in names)
        index = {name: i for i, name in enumerate(names)}

        def to_id(value: Any) -> int:
            return index[str(value)]

    if bad:
        raise ScenarioError(
            f"{source}: labels {bad[:5]} are not among the federation's {len(names)} classes "
            f"({', '.join(names[:5])}, ...)"
        )
    features = dd["train"].features.copy()
    features["label"] = datasets.ClassLabel(names=names)
    return dd.map(lambda row: {"label": to_id(name_of(row["label"]))}, features=features)
