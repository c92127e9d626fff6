"""``seq-cls``: text classification, scored by cross-entropy and accuracy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import datasets
import torch
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from fedpeft.tasks.base import (
    Batch,
    Collate,
    Rows,
    TextTask,
    classify,
    collated,
    kept_batches,
)


class SequenceClassification(TextTask):
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
        dpo_beta: float = 0.1,
    ) -> dict[str, float]:
        """Mean cross-entropy and accuracy.

        Examples are batched in order of length, which saves padding and changes no number.
        """

        def batches() -> Iterator[Batch]:
            lengths = [len(t) for t in data["text"]]
            order = sorted(range(len(data)), key=lengths.__getitem__)
            return collated(data, order, self.make_collate(processor, max_length), batch_size)

        tokenizer = (type(processor).__name__, getattr(processor, "name_or_path", None))
        settings = (self.name, tokenizer, id(processor), max_length, batch_size)
        return classify(model, kept_batches(data, settings, batches), len(data), device)
