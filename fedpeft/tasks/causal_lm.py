"""``causal-lm``: instruction tuning of a decoder; the loss falls on the response only."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedpeft.config import DataSection
from fedpeft.data import ALPACA_INPUT, MESSAGES
from fedpeft.tasks.base import (
    IGNORE_INDEX,
    Batch,
    Collate,
    Rows,
    TextTask,
    chunks,
    last_positions,
    to_device,
)

PLAIN_PROMPT = "Instruction: {instruction}\nResponse: "  # without a chat template
# Alpaca's own prompts (Taori et al., 2023), for Alpaca-format data without a chat template
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def stop_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token that ends a response: EOS, else SEP (BERT-style tokenizers have no EOS)."""
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if isinstance(token_id, int):
            return token_id
    return None


def user_turn(instruction: str, context: str | None = None) -> str:
    """The user's message: the instruction, then Alpaca's input (if any) after a blank line."""
    return f"{instruction}\n\n{context}" if context else instruction


def plain_prompt(instruction: str, context: str | None = None) -> str:
    """The prompt text without a chat template.

    ``context`` is Alpaca's ``input``: None for prompt/completion data (fedpeft's plain
    ``Instruction: ... Response:``), else Alpaca's own prompt, with or without its input.
    """
    if context is None:
        return PLAIN_PROMPT.format(instruction=instruction)
    if context:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=context)
    return ALPACA_PROMPT.format(instruction=instruction)


def _chat_prompt(
    tokenizer: PreTrainedTokenizerBase, instruction: str, context: str | None = None
) -> str | None:
    """The chat template's text up to the assistant's turn; None without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    user = [{"role": "user", "content": user_turn(instruction, context)}]
    return str(tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True))


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, instruction: str, context: str | None = None
) -> list[int]:
    """Token ids of the prompt: what generation starts from, and what the loss skips.

    ``context`` is an Alpaca example's ``input`` (None for prompt/completion data).
    """
    chat = _chat_prompt(tokenizer, instruction, context)
    if chat is not None:  # the template writes any BOS itself
        return list(tokenizer(chat, add_special_tokens=False)["input_ids"])
    bos = [tokenizer.bos_token_id] if isinstance(tokenizer.bos_token_id, int) else []
    text = plain_prompt(instruction, context)
    return bos + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_and_completion(
    tokenizer: PreTrainedTokenizerBase,
    instruction: str,
    response: str,
    context: str | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (no loss) and of the completion (the loss's targets).

    With a chat template, the instruction (and Alpaca's input, ``context``) is the user
    turn and the response the assistant turn (the template's own end-of-turn marker ends
    the completion); without one, the plain prompt of :func:`plain_prompt` is used, the
    tokenizer's BOS (if any) first and its EOS (else SEP) last. Prompt and completion are
    tokenized separately: the prompt is then exactly what generation starts from.
    """
    chat = _chat_prompt(tokenizer, instruction, context)
    if chat is not None:
        turns = [
            {"role": "user", "content": user_turn(instruction, context)},
            {"role": "assistant", "content": response},
        ]
        full = str(tokenizer.apply_chat_template(turns, tokenize=False))
        completion = full[len(chat) :] if full.startswith(chat) else response
        ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    else:
        stop = stop_id(tokenizer)
        ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        ids += [stop] if stop is not None else []
    return prompt_ids(tokenizer, instruction, context), ids


# ChatML (OpenAI's, used by Qwen and many others): conversations on a tokenizer without a
# chat template of its own
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_told_chatml: set[str] = set()


def render_chat(
    tokenizer: PreTrainedTokenizerBase, turns: list[dict[str, str]], generation: bool = False
) -> str:
    """The conversation as the chat template writes it (ChatML if the tokenizer has none)."""
    if not turns:
        return ""
    own = getattr(tokenizer, "chat_template", None)
    if not own and tokenizer.name_or_path not in _told_chatml:
        _told_chatml.add(tokenizer.name_or_path)
        print(f"fedpeft: {tokenizer.name_or_path} has no chat template: conversations use ChatML")
    return str(
        tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=generation, chat_template=own or CHATML
        )
    )


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], max_length: int
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a whole conversation: the loss on the assistant turns only.

    The conversation is rendered a turn at a time; what each assistant turn adds after its
    generation prompt (its text and the template's end-of-turn marker) carries the loss,
    everything else (system and user turns, role headers) is labelled -100. A conversation
    longer than ``max_length`` tokens is cut at its end.
    """
    ids: list[int] = []
    labels: list[int] = []
    done = ""

    def add(text: str, loss: bool) -> None:
        tokens = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
        ids.extend(tokens)
        labels.extend(tokens if loss else [IGNORE_INDEX] * len(tokens))

    for i, turn in enumerate(messages):
        if turn["role"] == "assistant":
            head = render_chat(tokenizer, messages[:i], generation=True)
            add(head[len(done) :] if head.startswith(done) else head, loss=False)
            done = head
        full = render_chat(tokenizer, messages[: i + 1])
        add(
            full[len(done) :] if full.startswith(done) else turn["content"],
            turn["role"] == "assistant",
        )
        done = full
    return ids[:max_length], labels[:max_length]


def conversation_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[list[int], str]:
    """The prompt ids up to the last assistant turn, and that turn's text (exact match)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text = render_chat(tokenizer, messages[:last], generation=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]), messages[last]["content"]


def _fit(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut to ``max_length`` tokens, keeping at least one completion token.

    A prompt too long keeps its end (the part just before the response); the completion
    is cut at its end.
    """
    prompt = prompt[-(max_length - 1) :] if len(prompt) >= max_length else prompt
    return prompt, completion[: max_length - len(prompt)]


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    instruction: str,
    response: str,
    max_length: int,
    context: str | None = None,
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example; prompt positions are labelled -100."""
    prompt, completion = _fit(
        *prompt_and_completion(tokenizer, instruction, response, context), max_length=max_length
    )
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


def pad_rows(
    sequences: list[list[int]], value: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence; return (tensor, attention mask)."""
    width = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if not seq:
            continue
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        out[i, span] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, span] = 1
    return out, mask


def normalise_text(text: str) -> str:
    """Stripped text with every run of whitespace as one space (exact-match compares these)."""
    return " ".join(text.split())


class CausalLanguageModeling(TextTask):
    """Instruction tuning: the loss falls on the response tokens only.

    Scored by held-out response-token loss, perplexity (its exponential), teacher-forced
    next-token accuracy on response tokens (``eval_accuracy``) and exact match of a greedy
    generation on the first ``generate`` examples (``eval_exact_match``).
    """

    name = "causal-lm"
    description = "instruction tuning of a decoder (AutoModelForCausalLM)"
    peft_task_type = "CAUSAL_LM"
    head_modules = ()  # the LM head is pretrained: nothing starts from scratch
    has_token_embeddings = True
    auto_model = AutoModelForCausalLM
    columns: tuple[str, ...] = ("text", "response")

    def model_from_config(self, config: PretrainedConfig, num_labels: int) -> PreTrainedModel:
        """A random decoder; ``num_labels`` does not apply (the vocabulary is the output)."""
        return AutoModelForCausalLM.from_config(config)

    def model_from_pretrained(self, source: str, num_labels: int, **kwargs: Any) -> PreTrainedModel:
        """A pretrained decoder from a hub id or local folder."""
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)

    def make_collate(self, processor: Any, max_length: int) -> Collate:
        """Prompt + response tokens, right-padded; labels are -100 outside the response."""
        tokenizer: PreTrainedTokenizerBase = processor
        pad = int(tokenizer.pad_token_id or 0)

        def collate(rows: Rows) -> Batch:
            if MESSAGES in rows:
                pairs = [encode_conversation(tokenizer, m, max_length) for m in rows[MESSAGES]]
            else:
                pairs = self._pairs(tokenizer, rows, max_length)
            input_ids, mask = pad_rows([ids for ids, _ in pairs], pad)
            labels, _ = pad_rows([lab for _, lab in pairs], IGNORE_INDEX)
            return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

        return collate

    @staticmethod
    def _pairs(
        tokenizer: PreTrainedTokenizerBase, rows: Rows, max_length: int
    ) -> list[tuple[list[int], list[int]]]:
        return [
            encode_example(tokenizer, instruction, response, max_length, context)
            for instruction, response, context in zip(
                rows["text"], rows["response"], contexts(rows), strict=True
            )
        ]

    def check_data(self, data: datasets.Dataset, cfg: DataSection) -> None:
        """Prompt/completion (or Alpaca) rows, or whole conversations."""
        if MESSAGES not in data.column_names:
            super().check_data(data, cfg)

    @torch.no_grad()
    def evaluate(
        self,
        model: torch.nn.Module,
        processor: Any,
        data: datasets.Dataset,
        *,
        batch_size: int,
        max_length: int,
        device: torch.device,
        generate: int = 0,
        max_new_tokens: int = 32,
        dpo_beta: float = 0.1,
    ) -> dict[str, float]:
        """Response-token loss, perplexity, next-token accuracy and generation exact match.

        Loss and accuracy are means over all response tokens of the split (batched in
        order of length, which changes no number).
        """
        model.eval()
        collate = self.make_collate(processor, max_length)
        lengths = example_lengths(data)
        order = sorted(range(len(data)), key=lengths.__getitem__)
        loss_sum, correct, tokens = 0.0, 0, 0
        for idx in chunks(order, batch_size):
            batch = to_device(collate(data[idx]), device)
            labels = batch.pop("labels")
            logits = last_positions(model(**batch).logits, labels.shape[1])
            logits, targets = logits[:, :-1].float(), labels[:, 1:]
            scored = targets != IGNORE_INDEX
            picked, wanted = logits[scored], targets[scored]
            loss_sum += F.cross_entropy(picked, wanted, reduction="sum").item()
            correct += int((picked.argmax(-1) == wanted).sum().item())
            tokens += int(scored.sum().item())
        loss = loss_sum / max(tokens, 1)
        metrics = {
            "eval_loss": loss,
            "eval_accuracy": correct / max(tokens, 1),
            "eval_perplexity": math.exp(min(loss, 700.0)),  # exp overflows past ~709
        }
        if generate > 0:
            sample = data.select(range(min(generate, len(data))))
            metrics["eval_exact_match"] = exact_match(
                model, processor, sample, batch_size, max_length, max_new_tokens, device
            )
        return metrics


def example_lengths(data: datasets.Dataset) -> list[int]:
    """Characters of each example (evaluation batches examples in this order)."""
    rows = data.with_format("arrow")[:].to_pydict()
    if MESSAGES in rows:
        return [sum(len(m["content"]) for m in turns) for turns in rows[MESSAGES]]
    return [len(t) + len(r) for t, r in zip(rows["text"], rows["response"], strict=True)]


def contexts(rows: Rows) -> list[str | None]:
    """Each row's Alpaca ``input`` ("" when it has none); None for prompt/completion rows."""
    if ALPACA_INPUT in rows:
        return [value or "" for value in rows[ALPACA_INPUT]]
    return [None] * len(rows["text"])


def generate_responses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    *,
    contexts: Sequence[str | None] | None = None,
    prompts: Sequence[list[int]] | None = None,
    batch_size: int,
    max_length: int,
    max_new_tokens: int,
    device: torch.device,
) -> list[list[int]]:
    """Greedy completions (token ids, up to the stop token) of each instruction's prompt.

    Prompts are left-padded, so every sequence in a batch continues from its last token.
    """
    pad = int(tokenizer.pad_token_id or 0)
    stops = {s for s in [stop_id(tokenizer)] if s is not None}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops |= set(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    if prompts is None:
        contexts = contexts if contexts is not None else [None] * len(instructions)
        prompts = [
            prompt_ids(tokenizer, text, context)
            for text, context in zip(instructions, contexts, strict=True)
        ]
    prompts = [_fit(ids, [], max_length)[0] for ids in prompts]
    out: list[list[int]] = []
    for idx in chunks(range(len(prompts)), batch_size):
        input_ids, mask = pad_rows([prompts[i] for i in idx], pad, left=True)
        generated = model.generate(  # type: ignore[operator]
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=sorted(stops) or None,
        )
        for row in generated[:, input_ids.shape[1] :].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            out.append(row[:cut])
    return out


def exact_match(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: datasets.Dataset,
    batch_size: int,
    max_length: int,
    max_new_tokens: int,
    device: torch.device,
) -> float:
    """Share of examples whose greedy generation equals the reference response.

    Both sides are compared as whitespace-normalised text. The reference is first passed
    through the tokenizer (an uncased tokenizer cannot produce capitals) and cut to
    ``max_new_tokens`` tokens (a generation cannot be longer).
    """
    if len(data) == 0:
        return 0.0
    rows = data.with_format("arrow")[:].to_pydict()
    if MESSAGES in rows:  # the prompt is the conversation up to its last assistant turn
        prompts, references = zip(
            *(conversation_prompt(tokenizer, turns) for turns in rows[MESSAGES]), strict=True
        )
    else:
        prompts, references = None, rows["response"]
    generated = generate_responses(
        model,
        tokenizer,
        rows.get("text", []),
        contexts=contexts(rows) if prompts is None else None,
        prompts=prompts,
        batch_size=batch_size,
        max_length=max_length,
        max_new_tokens=max_new_tokens,
        device=device,
    )
    hits = 0
    for ids, response in zip(generated, references, strict=True):
        reference = tokenizer(response, add_special_tokens=False)["input_ids"][:max_new_tokens]
        want = normalise_text(str(tokenizer.decode(reference, skip_special_tokens=True)))
        got = normalise_text(str(tokenizer.decode(ids, skip_special_tokens=True)))
        hits += got == want
    return hits / len(data)
