"""``fedpeft data preview``: the first training examples exactly as the model will see them.

Each example is run through the scenario's own collate function (tokenizer, chat template
or plain prompt, truncation to ``data.max_length``) and decoded back. For causal-lm, the
tokens that carry the loss are wrapped in ``[[...]]``: the place to check a template.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedpeft.config import Scenario
from fedpeft.data import load_task_data
from fedpeft.tasks import IGNORE_INDEX, get_task, load_processor

LOSS_OPEN, LOSS_CLOSE = "[[", "]]"


def preview(scenario: Scenario, n: int) -> list[str]:
    """Lines showing the first ``n`` training examples as tokenised, then decoded back."""
    data = load_task_data(scenario.data)
    rows = data.train.select(range(min(n, len(data.train))))
    processor = load_processor(scenario.model)
    task = get_task(scenario.model.task)
    task.check_data(rows, scenario.data)
    batch = task.make_collate(processor, scenario.data.max_length)(rows[:])
    what = f"{scenario.model.task} on {scenario.model.name}, data {scenario.data.name}"
    lines = [
        f"{scenario.name}: {what} (first {len(rows)} training examples, "
        f"max_length {scenario.data.max_length})"
    ]
    for i in range(len(rows)):
        lines.append(f"--- example {i}")
        if "input_ids" not in batch:  # images
            shape = "x".join(str(d) for d in batch["pixel_values"][i].shape)
            lines.append(f"pixels {shape}, label {_label(data.label_names, batch['labels'][i])}")
            continue
        mask = batch["attention_mask"][i].bool()
        ids = batch["input_ids"][i][mask].tolist()
        labels = batch["labels"]
        if labels.dim() == 2:  # causal-lm: a target per position
            loss = (labels[i][mask] != IGNORE_INDEX).tolist()
            lines.append(f"{len(ids)} tokens, {sum(loss)} carry the loss:")
            lines.append(decode_marked(processor, ids, loss))
        else:
            lines.append(f"{len(ids)} tokens, label {_label(data.label_names, labels[i])}:")
            lines.append(str(processor.decode(ids)))
        lines.append(f"input_ids {ids}")
    return lines


def decode_marked(tokenizer: Any, ids: Sequence[int], loss: Sequence[bool]) -> str:
    """``ids`` decoded, each run of loss-bearing tokens wrapped in ``[[...]]``."""
    parts, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or loss[end] != loss[start]:
            text = str(tokenizer.decode(list(ids[start:end])))
            parts.append(f"{LOSS_OPEN}{text}{LOSS_CLOSE}" if loss[start] else text)
            start = end
    return " ".join(parts)


def _label(names: list[str], value: torch.Tensor) -> str:
    index = int(value)
    return f"{index} ({names[index]})" if 0 <= index < len(names) else str(index)
