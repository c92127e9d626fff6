"""Tasks: what the model is asked to do, from its ``AutoModelFor...`` class to its score.

One :class:`Task` per task (``seq-cls``, ``causal-lm``, ``image-cls``), registered by name
with :func:`register_task` and looked up with :func:`get_task`; nothing else branches on
the task's name. A task knows

* which ``AutoModelFor...`` class loads its base model, and which freshly initialised
  head modules must train (and travel) with the adapter;
* its input processor (a tokenizer, or an :class:`ImagePrep` for images);
* how a list of rows becomes a batch (:meth:`Task.make_collate`), and
* how a model is scored on a split (:meth:`Task.evaluate`): at least ``eval_loss`` and
  ``eval_accuracy``, the task's main metric.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedpeft.config import DataConfig, Scenario, ScenarioError

Rows = dict[str, list[Any]]  # a slice of a datasets.Dataset: column -> values
Batch = dict[str, torch.Tensor]
Collate = Callable[[Rows], Batch]
IGNORE_INDEX = -100  # label of a token the loss skips (prompt and padding), as in transformers


@dataclass(frozen=True)
class ImagePrep:
    """How raw images become ``pixel_values``: size, channels and normalisation."""

    height: int
    width: int
    channels: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)


class Task(abc.ABC):
    """One task: model class, head modules, batches and evaluation."""

    name: str
    description: str
    peft_task_type: str | None  # peft's TaskType name; None where peft has none (images)
    head_modules: tuple[str, ...]  # freshly initialised heads (last module-name component)
    has_token_embeddings: bool  # prompt-learning methods need them
    auto_model: Any  # the transformers Auto class that loads the base model
    columns: tuple[str, ...]  # canonical data columns the task reads (see fedpeft.data)

    def head_module_names(self, model: torch.nn.Module) -> list[str]:
        """The task's head modules that ``model`` has (BERT: ``classifier``; Llama: ``score``)."""
        present = {name.split(".")[-1] for name, _ in model.named_modules()}
        return [name for name in self.head_modules if name in present]

    def model_from_config(self, config: PretrainedConfig, num_labels: int) -> PreTrainedModel:
        """A randomly initialised model of ``config`` (seed the RNG first)."""
        config.num_labels = num_labels
        return self.auto_model.from_config(config)

    def model_from_pretrained(self, source: str, num_labels: int, **kwargs: Any) -> PreTrainedModel:
        """Pretrained weights from a hub id or local folder, with a fresh head if any.

        ``kwargs`` go to ``from_pretrained`` (a quantized load's config and device map).
        """
        return self.auto_model.from_pretrained(source, num_labels=num_labels, **kwargs)

    def check_data(self, data: datasets.Dataset, cfg: DataConfig) -> None:
        """Refuse, in one line, a data set that lacks a column this task reads."""
        from fedpeft.data import COLUMN_KEYS

        for column in self.columns:
            if column not in data.column_names:
                key = COLUMN_KEYS[column]
                raise ScenarioError(
                    f"model.task={self.name!r} reads data.{key}={getattr(cfg, key)!r}, which "
                    f"is not a column of data set {cfg.name!r}; set data.{key}"
                )

    @abc.abstractmethod
    def load_processor(self, name: str) -> Any:
        """The input processor for model ``name`` (alias, hub id or path)."""

    @abc.abstractmethod
    def make_collate(self, processor: Any, max_length: int) -> Collate:
        """A function from rows to a CPU batch the model takes, ``labels`` included."""

    @abc.abstractmethod
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
    ) -> dict[str, float]:
        """Score ``model`` on ``data``: ``eval_loss``, ``eval_accuracy`` and task extras.

        ``generate`` and ``max_new_tokens`` only matter to generative tasks.
        """


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Register a task under its name; a duplicate or unnamed task fails loudly."""
    if not getattr(task, "name", ""):
        raise ValueError(f"task {type(task).__name__} has no name")
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is registered twice")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """Look a task up by name; an unknown name raises a one-line ScenarioError."""
    if name not in TASKS:
        raise ScenarioError(f"unknown model.task {name!r}; accepted: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def check_scenario(scenario: Scenario) -> None:
    """Fail early, in one line, if the task cannot read the scenario's data or model inputs."""
    from fedpeft.data import load_task_data
    from fedpeft.models import load_processor

    task = get_task(scenario.model.task)
    task.check_data(load_task_data(scenario.data).train, scenario.data)
    load_processor(scenario.model)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def _chunks(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield list(order[start : start + size])


def _last_positions(logits: torch.Tensor, length: int) -> torch.Tensor:
    """Logits of the real tokens: prompt-tuning methods prepend virtual positions."""
    return logits[:, -length:] if logits.shape[1] > length else logits


# ---------------------------------------------------------------------------- seq-cls


class _TextTask(Task):
    def load_processor(self, name: str) -> PreTrainedTokenizerBase:
        """The model's tokenizer (an alias's is bundled)."""
        from fedpeft.models import load_tokenizer

        return load_tokenizer(name)


class SequenceClassification(_TextTask):
    """``text`` -> one of ``label``'s classes, scored by cross-entropy and accuracy."""

    name = "seq-cls"
    description = "text classification (AutoModelForSequenceClassification)"
    peft_task_type = "SEQ_CLS"
    head_modules = ("classifier", "score")  # BERT-like / Llama- and GPT-2-like heads
    has_token_embeddings = True
    auto_model = AutoModelForSequenceClassification
    columns = ("text", "label")

    def make_collate(self, processor: Any, max_length: int) -> Collate:
        """Tokenize a batch of rows, padded to its longest example."""
        tokenizer: PreTrainedTokenizerBase = processor

        def collate(rows: Rows) -> Batch:
            enc = tokenizer(
                rows["text"],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            batch = dict(enc.items())
            batch["labels"] = torch.as_tensor(rows["label"], dtype=torch.long)
            return batch

        return collate

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
    ) -> dict[str, float]:
        """Mean cross-entropy and accuracy.

        Examples are batched in order of length, which saves padding and changes no number.
        """
        collate = self.make_collate(processor, max_length)
        lengths = [len(t) for t in data["text"]]
        order = sorted(range(len(data)), key=lengths.__getitem__)
        return _classify(model, data, order, collate, batch_size, device)


@torch.no_grad()
def _classify(
    model: torch.nn.Module,
    data: datasets.Dataset,
    order: Sequence[int],
    collate: Collate,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    model.eval()
    loss_sum, correct = 0.0, 0
    for idx in _chunks(order, batch_size):
        batch = _to_device(collate(data[idx]), device)
        logits = model(**batch).logits.float()
        loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += int((logits.argmax(-1) == batch["labels"]).sum().item())
    n = max(len(data), 1)
    return {"eval_loss": loss_sum / n, "eval_accuracy": correct / n}


# ---------------------------------------------------------------------------- causal-lm

PLAIN_PROMPT = "Instruction: {instruction}\nResponse: "  # without a chat template


def _stop_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token that ends a response: EOS, else SEP (BERT-style tokenizers have no EOS)."""
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if isinstance(token_id, int):
            return token_id
    return None


def _chat_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str) -> str | None:
    """The chat template's text up to the assistant's turn; None without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    user = [{"role": "user", "content": instruction}]
    return str(tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True))


def prompt_ids(tokenizer: PreTrainedTokenizerBase, instruction: str) -> list[int]:
    """Token ids of the prompt: what generation starts from, and what the loss skips."""
    chat = _chat_prompt(tokenizer, instruction)
    if chat is not None:  # the template writes any BOS itself
        return list(tokenizer(chat, add_special_tokens=False)["input_ids"])
    bos = [tokenizer.bos_token_id] if isinstance(tokenizer.bos_token_id, int) else []
    text = PLAIN_PROMPT.format(instruction=instruction)
    return bos + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_and_completion(
    tokenizer: PreTrainedTokenizerBase, instruction: str, response: str
) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (no loss) and of the completion (the loss's targets).

    With a chat template, the instruction is the user turn and the response the assistant
    turn (the template's own end-of-turn marker ends the completion); without one, the
    plain ``Instruction: ... Response: ...`` format is used, the tokenizer's BOS (if any)
    first and its EOS (else SEP) last. Prompt and completion are tokenized separately:
    the prompt is then exactly what generation starts from.
    """
    chat = _chat_prompt(tokenizer, instruction)
    if chat is not None:
        turns = [
            {"role": "user", "content": instruction},
            {"role": "assistant", "content": response},
        ]
        full = str(tokenizer.apply_chat_template(turns, tokenize=False))
        completion = full[len(chat) :] if full.startswith(chat) else response
        ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    else:
        stop = _stop_id(tokenizer)
        ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        ids += [stop] if stop is not None else []
    return prompt_ids(tokenizer, instruction), ids


def _fit(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut to ``max_length`` tokens, keeping at least one completion token.

    A prompt too long keeps its end (the part just before the response); the completion
    is cut at its end.
    """
    prompt = prompt[-(max_length - 1) :] if len(prompt) >= max_length else prompt
    return prompt, completion[: max_length - len(prompt)]


def encode_example(
    tokenizer: PreTrainedTokenizerBase, instruction: str, response: str, max_length: int
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example; prompt positions are labelled -100."""
    prompt, completion = _fit(
        *prompt_and_completion(tokenizer, instruction, response), max_length=max_length
    )
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


def _pad(
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


class CausalLanguageModeling(_TextTask):
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
    columns = ("text", "response")

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
            pairs = [
                encode_example(tokenizer, instruction, response, max_length)
                for instruction, response in zip(rows["text"], rows["response"], strict=True)
            ]
            input_ids, mask = _pad([ids for ids, _ in pairs], pad)
            labels, _ = _pad([lab for _, lab in pairs], IGNORE_INDEX)
            return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

        return collate

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
    ) -> dict[str, float]:
        """Response-token loss, perplexity, next-token accuracy and generation exact match.

        Loss and accuracy are means over all response tokens of the split (batched in
        order of length, which changes no number).
        """
        model.eval()
        collate = self.make_collate(processor, max_length)
        lengths = [len(t) + len(r) for t, r in zip(data["text"], data["response"], strict=True)]
        order = sorted(range(len(data)), key=lengths.__getitem__)
        loss_sum, correct, tokens = 0.0, 0, 0
        for idx in _chunks(order, batch_size):
            batch = _to_device(collate(data[idx]), device)
            labels = batch.pop("labels")
            logits = _last_positions(model(**batch).logits, labels.shape[1])
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


def generate_responses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    *,
    batch_size: int,
    max_length: int,
    max_new_tokens: int,
    device: torch.device,
) -> list[list[int]]:
    """Greedy completions (token ids, up to the stop token) of each instruction's prompt.

    Prompts are left-padded, so every sequence in a batch continues from its last token.
    """
    pad = int(tokenizer.pad_token_id or 0)
    stops = {s for s in [_stop_id(tokenizer)] if s is not None}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops |= set(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    prompts = [_fit(prompt_ids(tokenizer, text), [], max_length)[0] for text in instructions]
    out: list[list[int]] = []
    for idx in _chunks(range(len(prompts)), batch_size):
        input_ids, mask = _pad([prompts[i] for i in idx], pad, left=True)
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
    generated = generate_responses(
        model,
        tokenizer,
        data["text"],
        batch_size=batch_size,
        max_length=max_length,
        max_new_tokens=max_new_tokens,
        device=device,
    )
    hits = 0
    for ids, response in zip(generated, data["response"], strict=True):
        reference = tokenizer(response, add_special_tokens=False)["input_ids"][:max_new_tokens]
        want = normalise_text(str(tokenizer.decode(reference, skip_special_tokens=True)))
        got = normalise_text(str(tokenizer.decode(ids, skip_special_tokens=True)))
        hits += got == want
    return hits / len(data)


# ---------------------------------------------------------------------------- image-cls


def image_tensor(image: Any) -> torch.Tensor:
    """One image as a float (C, H, W) tensor in [0, 1].

    PIL images and integer arrays are 0..255; float arrays (e.g. ``digits``) are taken
    as already in [0, 1]. A 2-D array is one grey channel; channels-last is transposed.
    """
    if hasattr(image, "convert"):  # PIL.Image
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    scale = 255.0 if np.issubdtype(array.dtype, np.integer) else 1.0
    tensor = torch.as_tensor(array.astype(np.float32) / scale)
    if tensor.ndim == 2:
        return tensor.unsqueeze(0)
    if tensor.shape[-1] in (1, 3, 4) and tensor.shape[0] not in (1, 3, 4):
        tensor = tensor.permute(2, 0, 1)
    return tensor


def prepare_images(images: Sequence[Any], prep: ImagePrep) -> torch.Tensor:
    """``pixel_values`` (B, C, H, W): resized (bilinear), channel-matched and normalised."""
    out = []
    for image in images:
        x = image_tensor(image)
        if x.shape[0] != prep.channels:  # grey -> RGB by repetition; RGBA -> RGB
            x = x[:1].expand(prep.channels, -1, -1) if x.shape[0] == 1 else x[: prep.channels]
        x = F.interpolate(
            x.unsqueeze(0), size=(prep.height, prep.width), mode="bilinear", align_corners=False
        )
        out.append(x[0])
    pixels = torch.stack(out) if out else torch.zeros(0, prep.channels, prep.height, prep.width)
    mean = torch.tensor(prep.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels - mean) / std


def image_prep_for(name: str) -> ImagePrep:
    """The image preparation for model ``name``.

    A bundled random model's comes from its config (size, channels; mean = std = 0.5);
    a pretrained model's from its ``AutoImageProcessor``.
    """
    from transformers import AutoImageProcessor

    from fedpeft.models import ALIASES, model_source

    make_config = ALIASES[name][0] if name in ALIASES else None
    if make_config is not None:
        config = make_config()
        side = int(getattr(config, "image_size", 224))
        channels = int(getattr(config, "num_channels", 3))
        return ImagePrep(side, side, channels, (0.5,) * channels, (0.5,) * channels)
    try:
        processor = AutoImageProcessor.from_pretrained(model_source(name))
    except (OSError, ValueError) as err:
        raise ScenarioError(
            f"cannot load an image processor for model.name={name!r}: {str(err).splitlines()[0]}"
        ) from None
    size: dict[str, int] = dict(getattr(processor, "size", None) or {})
    crop: dict[str, int] = dict(getattr(processor, "crop_size", None) or {})
    edge = size.get("shortest_edge", 224)
    height = int(crop.get("height", size.get("height", edge)))
    width = int(crop.get("width", size.get("width", edge)))
    mean = tuple(float(m) for m in (getattr(processor, "image_mean", None) or (0.5,) * 3))
    std = tuple(float(s) for s in (getattr(processor, "image_std", None) or (0.5,) * 3))
    if not getattr(processor, "do_normalize", True):
        mean, std = (0.0,) * len(mean), (1.0,) * len(std)
    return ImagePrep(height, width, len(mean), mean, std)


class ImageClassification(Task):
    """``image`` -> one of ``label``'s classes, scored by cross-entropy and accuracy."""

    name = "image-cls"
    description = "image classification (AutoModelForImageClassification, e.g. a ViT)"
    peft_task_type = None  # peft has no image task type: the head is named explicitly
    head_modules = ("classifier",)  # ViT, DeiT, ConvNeXt, ...
    has_token_embeddings = False
    auto_model = AutoModelForImageClassification
    columns = ("image", "label")

    def model_from_pretrained(self, source: str, num_labels: int, **kwargs: Any) -> PreTrainedModel:
        """Pretrained weights; the head is replaced when its class count differs."""
        return AutoModelForImageClassification.from_pretrained(
            source, num_labels=num_labels, ignore_mismatched_sizes=True, **kwargs
        )

    def load_processor(self, name: str) -> ImagePrep:
        """How this model wants its images (see :func:`image_prep_for`)."""
        return image_prep_for(name)

    def make_collate(self, processor: Any, max_length: int) -> Collate:
        """Images upscaled or resized to the model's size and normalised; ``max_length`` unused."""
        prep: ImagePrep = processor

        def collate(rows: Rows) -> Batch:
            return {
                "pixel_values": prepare_images(rows["image"], prep),
                "labels": torch.as_tensor(rows["label"], dtype=torch.long),
            }

        return collate

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
    ) -> dict[str, float]:
        """Mean cross-entropy and accuracy, in data order."""
        collate = self.make_collate(processor, max_length)
        return _classify(model, data, range(len(data)), collate, batch_size, device)


register_task(SequenceClassification())
register_task(CausalLanguageModeling())
register_task(ImageClassification())
