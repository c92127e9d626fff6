"""The adapter's answers to a file of prompts, one JSON line each, for a judge to grade.

A prompt line is one of::

    {"prompt": "..."}                              # or "instruction" (+ Alpaca's "input")
    {"turns": ["first question", "follow-up"]}     # MT-Bench's question.jsonl
    {"messages": [{"role": "user", "content": "..."}, ...]}

and may carry ``question_id`` (kept; else the line number). Each answer line has
``question_id``, ``model_id``, the ``prompt`` and MT-Bench's ``choices``: ``[{"index": 0,
"turns": [answer per user turn]}]``, with ``answer`` the last of them. A prompt is
written as training wrote it: one turn as the causal-lm task writes its prompts (the
tokenizer's chat template, else fedpeft's plain prompt, Alpaca's for Alpaca rows);
conversations, and any prompt with ``--chat-template``, by the chat template (ChatML for a
tokenizer without one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fedpeft.config import ScenarioError
from fedpeft.tasks.causal_lm import prompt_ids, render_chat, stop_id


@dataclass(frozen=True)
class Sampling:
    """How answers are drawn: greedy (temperature 0) or sampled."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    chat_template: bool = False  #: single prompts as a chat user turn, not the plain prompt


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """The prompt lines of ``path``, each with ``question_id`` and its user ``turns``.

    A line that is not JSON or has no prompt is one ScenarioError naming the line.
    """
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ScenarioError(f"cannot read prompts file {path}: {err.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ScenarioError(f"{path}, line {number}: not JSON ({err.msg})") from None
        turns = _user_turns(row if isinstance(row, dict) else {})
        if not turns:
            raise ScenarioError(
                f"{path}, line {number}: needs a prompt, instruction, turns or messages key"
            )
        out.append(
            {
                "question_id": row.get("question_id", number),
                "turns": turns,
                "context": _alpaca_input(row),
            }
        )
    if not out:
        raise ScenarioError(f"prompts file {path} has no prompts")
    return out


def _user_turns(row: dict[str, Any]) -> list[str]:
    if isinstance(row.get("turns"), list):
        return [str(t) for t in row["turns"]]
    if isinstance(row.get("messages"), list):
        return [str(m.get("content", "")) for m in row["messages"] if m.get("role") == "user"]
    text = row.get("prompt", row.get("instruction"))
    return [] if text is None else [str(text)]


def _alpaca_input(row: dict[str, Any]) -> str | None:
    """Alpaca's ``input`` of an instruction row ("" when it has none); None for any other."""
    return str(row.get("input") or "") if "instruction" in row and "prompt" not in row else None


def _prompt(
    tokenizer: PreTrainedTokenizerBase,
    history: list[dict[str, str]],
    sampling: Sampling,
    context: str | None = None,
) -> list[int]:
    """Token ids the model continues, as training wrote its prompts.

    One turn: :func:`~fedpeft.tasks.causal_lm.prompt_ids` (the tokenizer's chat template,
    else fedpeft's plain prompt, or Alpaca's with ``context``); several turns, or
    ``--chat-template``: the chat template (ChatML for a tokenizer without one).
    """
    if len(history) == 1 and not sampling.chat_template:
        return prompt_ids(tokenizer, history[0]["content"], context)
    text = render_chat(tokenizer, history, generation=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def answer(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    turns: list[str],
    sampling: Sampling,
    device: torch.device,
    context: str | None = None,
) -> list[str]:
    """The model's answer to each user turn, each following the earlier answers.

    ``context`` is an Alpaca row's ``input`` (None for any other row).
    """
    model.eval()
    stops = [s for s in [stop_id(tokenizer)] if s is not None]
    history: list[dict[str, str]] = []
    answers = []
    for turn in turns:
        history.append({"role": "user", "content": turn})
        ids = torch.as_tensor([_prompt(tokenizer, history, sampling, context)], device=device)
        sample = sampling.temperature > 0
        out = model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sample,
            **({"temperature": sampling.temperature, "top_p": sampling.top_p} if sample else {}),
            pad_token_id=int(tokenizer.pad_token_id or 0),
            eos_token_id=stops or None,
        )
        new = out[0, ids.shape[1] :].tolist()
        new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
        text = str(tokenizer.decode(new, skip_special_tokens=True)).strip()
        answers.append(text)
        history.append({"role": "assistant", "content": text})
    return answers


def write_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Path,
    target: Path,
    *,
    model_id: str,
    sampling: Sampling,
    device: torch.device,
) -> int:
    """Answer every prompt of ``prompts`` into ``target`` (JSONL); return how many."""
    rows = read_prompts(prompts)
    torch.manual_seed(sampling.seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            answers = answer(model, tokenizer, row["turns"], sampling, device, row["context"])
            line = {
                "question_id": row["question_id"],
                "model_id": model_id,
                "prompt": row["turns"][0] if len(row["turns"]) == 1 else row["turns"],
                "answer": answers[-1],
                "choices": [{"index": 0, "turns": answers}],
            }
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    tmp.replace(target)
    return len(rows)
