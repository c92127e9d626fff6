"""What every task shares: the :class:`Task` interface, batch types and scoring helpers."""

from __future__ import annotations

import abc
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from fedpeft.config import DataSection, ScenarioError, TrainSection
from fedpeft.data import COLUMN_KEYS
from fedpeft.model_sources import load_tokenizer

Rows = dict[str, list[Any]]  # a slice of a datasets.Dataset: column -> values
Batch = dict[str, torch.Tensor]
Collate = Callable[[Rows], Batch]
IGNORE_INDEX = -100  # label of a token the loss skips (prompt and padding), as in transformers


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

    def check_data(self, data: datasets.Dataset, cfg: DataSection) -> None:
        """Refuse, in one line, a data set that lacks a column this task reads."""
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
        dpo_beta: float = 0.1,
    ) -> dict[str, float]:
        """Score ``model`` on ``data``: ``eval_loss``, ``eval_accuracy`` and task extras.

        ``generate`` and ``max_new_tokens`` only matter to generative tasks, ``dpo_beta``
        to ``dpo``.
        """

    def objective(
        self, train: TrainSection
    ) -> Callable[[torch.nn.Module, Batch], torch.Tensor] | None:
        """The loss a training step minimises; None: the model's own loss on ``labels``."""
        return None


class TextTask(Task):
    """A task on text: its processor is the model's tokenizer."""

    def load_processor(self, name: str) -> PreTrainedTokenizerBase:
        """The model's tokenizer (an alias's is bundled)."""
        return load_tokenizer(name)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch's tensors on ``device``."""
    return {k: v.to(device) for k, v in batch.items()}


def chunks(order: Sequence[int], size: int) -> Iterator[list[int]]:
    """``order`` in consecutive lists of at most ``size`` indices."""
    for start in range(0, len(order), size):
        yield list(order[start : start + size])


def last_positions(logits: torch.Tensor, length: int) -> torch.Tensor:
    """Logits of the real tokens: prompt-tuning methods prepend virtual positions."""
    return logits[:, -length:] if logits.shape[1] > length else logits


@torch.no_grad()
def classify(
    model: torch.nn.Module, batches: Iterable[Batch], examples: int, device: torch.device
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of a classifier over ``batches`` (``examples`` in all)."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for cpu_batch in batches:
        batch = to_device(cpu_batch, device)
        logits = model(**batch).logits.float()
        loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += int((logits.argmax(-1) == batch["labels"]).sum().item())
    n = max(examples, 1)
    return {"eval_loss": loss_sum / n, "eval_accuracy": correct / n}


def collated(
    data: datasets.Dataset, order: Sequence[int], collate: Collate, size: int
) -> Iterator[Batch]:
    """``data`` in ``order``, collated ``size`` examples at a time."""
    for idx in chunks(order, size):
        yield collate(data[idx])


#: evaluation batches kept, by the data set (held weakly: a new data set at the same
#: address misses) and the batching's settings: the same held-out text is scored every
#: round, and tokenising it again cost more than a small model's forward passes
_KEPT: dict[tuple[int, tuple[Any, ...]], tuple[weakref.ref, list[Batch]]] = {}
_KEPT_SETS = 8


def kept_batches(
    data: datasets.Dataset, settings: tuple[Any, ...], make: Callable[[], Iterable[Batch]]
) -> list[Batch]:
    """The batches ``make()`` gives for ``data`` under ``settings``, made once per process.

    ``settings`` must name everything the batches depend on besides ``data`` (tokenizer,
    maximum length, batch size). Meant for token ids, which are small; not for images.
    """
    key = (id(data), settings)
    hit = _KEPT.get(key)
    if hit is not None and hit[0]() is data:
        return hit[1]
    batches = list(make())
    if len(_KEPT) >= _KEPT_SETS:
        _KEPT.pop(next(iter(_KEPT)))
    _KEPT[key] = (weakref.ref(data), batches)
    return batches
