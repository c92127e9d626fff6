"""Local training and evaluation loops (plain PyTorch, no Flower imports).

The loops are the same for every task: a task's collate function turns rows into a batch
the model takes (``labels`` included), and the task scores a model (:mod:`fedpeft.tasks`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from fedpeft.adapters import trainable_parameters
from fedpeft.config import Scenario
from fedpeft.tasks import Collate, get_task


@dataclass
class TrainResult:
    """What one client's local training produced."""

    train_loss: float  # mean loss over the local steps
    num_examples: int  # examples (rows) seen, steps x batch; FedAvg's weight
    steps: int


def batches(data: datasets.Dataset, batch_size: int, seed: int) -> Iterator[dict[str, list]]:
    """Endless shuffled mini-batches; each pass over the data reshuffles (seeded)."""
    if len(data) == 0:
        raise ValueError("cannot train on an empty partition")
    epoch = 0
    while True:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, len(data), batch_size):
            idx = order[start : start + batch_size].tolist()
            yield data[idx]
        epoch += 1


def scenario_collate(scenario: Scenario, processor: Any | None = None) -> Collate:
    """The collate function of the scenario's task (processor loaded once per process)."""
    from fedpeft.models import load_processor

    task = get_task(scenario.model.task)
    processor = processor if processor is not None else load_processor(scenario.model)
    return task.make_collate(processor, scenario.data.max_length)


def train_steps(
    model: torch.nn.Module,
    collate: Collate,
    data: datasets.Dataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.0,
    max_grad_norm: float = 0.0,
    proximal_mu: float = 0.0,
    regulariser: Callable[[], torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> TrainResult:
    """Run ``steps`` AdamW steps on the trainable (adapter) parameters of ``model``.

    ``collate`` turns a batch of rows into model inputs with ``labels`` (see
    :meth:`fedpeft.tasks.Task.make_collate`). With ``proximal_mu > 0`` the FedProx term
    ``mu/2 * ||w - w_global||^2`` is added, where ``w_global`` are the trainable values at
    the start of the call. ``regulariser`` adds a strategy's own penalty (e.g. HetLoRA's
    rank self-pruning term) to every step.
    """
    device = device or next(model.parameters()).device
    torch.manual_seed(seed)  # dropout and friends: the same seed gives the same update
    params = trainable_parameters(model)
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    total_loss, seen = 0.0, 0
    stream = batches(data, batch_size, seed)
    for _ in range(steps):
        rows = next(stream)
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        loss = model(**batch).loss
        total_loss += loss.item()
        if anchors:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
            loss = loss + 0.5 * proximal_mu * prox
        if regulariser is not None:
            loss = loss + regulariser()
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += len(next(iter(rows.values())))
    model.eval()
    return TrainResult(train_loss=total_loss / steps, num_examples=seen, steps=steps)


def evaluate(
    model: torch.nn.Module,
    scenario: Scenario,
    data: datasets.Dataset,
    *,
    processor: Any | None = None,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Score ``model`` on ``data`` as the scenario's task does (``eval_loss``, ``eval_accuracy``).

    Batch size, token budget and (causal-lm) generation settings come from the scenario.
    """
    from fedpeft.models import load_processor

    task = get_task(scenario.model.task)
    task.check_data(data, scenario.data)
    return task.evaluate(
        model,
        processor if processor is not None else load_processor(scenario.model),
        data,
        batch_size=scenario.train.eval_batch_size,
        max_length=scenario.data.max_length,
        device=device or next(model.parameters()).device,
        generate=scenario.train.eval_generate,
        max_new_tokens=scenario.train.max_new_tokens,
    )
