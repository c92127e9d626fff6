"""Local training and evaluation loops (plain PyTorch, no Flower imports)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from fedpeft.adapters import trainable_parameters


@dataclass
class TrainResult:
    """What one client's local training produced."""

    train_loss: float  # mean loss over the local steps
    num_examples: int  # examples seen (steps x batch); FedAvg's weight
    steps: int


def collate(
    tokenizer: PreTrainedTokenizerBase, rows: dict[str, list], max_length: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Tokenize a batch of ``{"text", "label"}`` rows, padded to its longest example."""
    enc = tokenizer(
        rows["text"], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    batch = {k: v.to(device) for k, v in enc.items()}
    batch["labels"] = torch.as_tensor(rows["label"], dtype=torch.long, device=device)
    return batch


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


def train_steps(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: datasets.Dataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    max_length: int,
    seed: int,
    weight_decay: float = 0.0,
    max_grad_norm: float = 0.0,
    proximal_mu: float = 0.0,
    regulariser: Callable[[], torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> TrainResult:
    """Run ``steps`` AdamW steps on the trainable (adapter) parameters of ``model``.

    With ``proximal_mu > 0`` the FedProx term ``mu/2 * ||w - w_global||^2`` is added,
    where ``w_global`` are the trainable values at the start of the call. ``regulariser``
    adds a strategy's own penalty (e.g. HetLoRA's rank self-pruning term) to every step.
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
        batch = collate(tokenizer, next(stream), max_length, device)
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
        seen += len(batch["labels"])
    model.eval()
    return TrainResult(train_loss=total_loss / steps, num_examples=seen, steps=steps)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: datasets.Dataset,
    *,
    batch_size: int,
    max_length: int,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data``.

    Examples are batched in order of length, which saves padding and changes no number.
    """
    device = device or next(model.parameters()).device
    model.eval()
    lengths = [len(t) for t in data["text"]]
    order = sorted(range(len(data)), key=lengths.__getitem__)
    loss_sum, correct = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = collate(tokenizer, data[order[start : start + batch_size]], max_length, device)
        logits = model(**batch).logits.float()
        loss_sum += torch.nn.functional.cross_entropy(
            logits, batch["labels"], reduction="sum"
        ).item()
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
    n = max(len(data), 1)

    return {"eval_loss": loss_sum / n, "eval_accuracy": correct / n}
