"""Local training and evaluation loops (plain PyTorch, no Flower imports).

The loops are the same for every task: a task's collate function turns rows into a batch
the model takes (``labels`` included), and the task scores a model (:mod:`fedpeft.tasks`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch

from fedpeft.adapters import trainable_parameters
from fedpeft.config import Scenario, ScenarioError, TrainSection
from fedpeft.models import native_bf16
from fedpeft.tasks import Collate, get_task, load_processor


@dataclass
class TrainResult:
    """What one client's local training produced."""

    train_loss: float  # mean loss over the local steps
    num_examples: int  # examples (rows) seen, steps x batch; FedAvg's weight
    steps: int
    learning_rate: float  # the first step's (a schedule moves it on from there)
    step_seconds: float  # mean wall time of one local step
    peak_memory_mb: float  # see peak_memory_mb()
    # with track_gradient: each trained parameter's gradient, averaged over the steps
    mean_gradients: dict[torch.nn.Parameter, torch.Tensor] = field(default_factory=dict)


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


def examples_seen(size: int, steps: int, batch_size: int) -> int:
    """How many examples :func:`batches` yields in ``steps`` batches from ``size`` examples.

    What a client trains on, and reports as ``num-examples``, in a round: ``steps x
    batch_size``, or fewer when a pass over a small partition ends in a short batch.
    """
    if size <= 0:
        return 0
    per_pass = -(-size // batch_size)  # batches in one pass, the last one short
    passes, rest = divmod(steps, per_pass)
    return passes * size + rest * batch_size


def learning_rate(train: TrainSection, step: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (from 0) of the federation's ``total``.

    ``train.warmup_steps`` rise linearly from 0 to ``train.lr``; then ``constant`` stays
    there, ``linear`` falls in a straight line and ``cosine`` along half a cosine towards
    ``train.min_lr``. These are transformers' schedules with warm-up (constant, linear,
    cosine with min_lr), counted over every round: a client in round ``r`` of ``R``, with
    ``S`` steps a round, runs steps ``(r - 1) * S`` to ``r * S - 1`` of ``R * S``.
    """
    peak, low, warmup = train.lr, train.min_lr, train.warmup_steps
    if step < warmup:
        return peak * step / warmup
    if train.lr_schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if train.lr_schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return low + (peak - low) * max(0.0, shape)


def round_steps(server_round: int, rounds: int, steps: int) -> tuple[int, int]:
    """(first step of round ``server_round``, steps of the whole federation), ``steps`` a round."""
    return (server_round - 1) * steps, rounds * steps


def round_learning_rate(train: TrainSection, server_round: int, rounds: int) -> float:
    """The learning rate of round ``server_round``'s first step (metrics.jsonl's ``lr``)."""
    return learning_rate(train, *round_steps(server_round, rounds, train.local_steps))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype ``train.precision`` runs the forward pass in on ``device``; None: fp32.

    ``auto`` is bf16 only on CUDA devices that compute it natively; on mps and the CPU it
    stays fp32. fp16 needs CUDA (where a gradient scaler guards against underflow).
    """
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and native_bf16() else None
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ScenarioError(
                f"train.precision='fp16' needs a CUDA device, but this node trains on "
                f"'{device}': use 'bf16', 'fp32' or 'auto'"
            )
        return torch.float16
    if precision == "bf16":
        if device.type == "cuda" and not native_bf16():
            raise ScenarioError(
                "train.precision='bf16' needs a GPU with native bf16 (Ampere or newer), "
                f"which '{device}' is not: use 'fp16' or 'auto'"
            )
        return torch.bfloat16
    raise ScenarioError(
        f"invalid value {precision!r} for 'train.precision': expected auto, fp32, bf16 or fp16"
    )


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for :func:`peak_memory_mb` (CUDA keeps one; elsewhere a no-op)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: CUDA's allocated peak since :func:`reset_peak_memory`.

    mps keeps no peak: this is what its driver holds now (its allocator caches, so it
    rarely shrinks). On the CPU it is the process's peak resident set size.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return float(torch.mps.driver_allocated_memory()) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes / KiB


def scenario_collate(scenario: Scenario, processor: Any | None = None) -> Collate:
    """The collate function of the scenario's task (processor loaded once per process)."""
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
    lr_at: Callable[[int], float] | None = None,
    grad_accum_steps: int = 1,
    weight_decay: float = 0.0,
    max_grad_norm: float = 0.0,
    proximal_mu: float = 0.0,
    regulariser: Callable[[], torch.Tensor] | None = None,
    device: torch.device | None = None,
    precision: str = "auto",
    track_gradient: bool = False,
    objective: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> TrainResult:
    """Run ``steps`` AdamW steps on the trainable (adapter) parameters of ``model``.

    Each step adds up the gradients of ``grad_accum_steps`` batches (the loss of each
    divided by their number, so the step sees their mean); ``lr_at(i)``, when given, is
    step ``i``'s learning rate (see :func:`learning_rate`), else it is ``lr`` throughout.

    ``collate`` turns a batch of rows into model inputs with ``labels`` (see
    :meth:`fedpeft.tasks.Task.make_collate`). With ``proximal_mu > 0`` the FedProx term
    ``mu/2 * ||w - w_global||^2`` is added, where ``w_global`` are the trainable values at
    the start of the call. ``objective`` replaces the model's own loss (a task's, e.g.
    DPO's: :meth:`fedpeft.tasks.Task.objective`). ``regulariser`` adds a strategy's own
    penalty (e.g. HetLoRA's rank self-pruning term) to every step.

    ``precision`` (``train.precision``, see :func:`autocast_dtype`) sets the autocast of
    the forward pass; the penalties, backward pass and optimizer step stay outside it.

    With ``track_gradient``, the result holds each parameter's gradient of the training
    objective averaged over the steps (unscaled under fp16): what top-k compression ranks
    the update's entries by (:func:`fedpeft.codecs.compression.encode_update`).
    """
    device = device or next(model.parameters()).device
    dtype = autocast_dtype(precision, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    torch.manual_seed(seed)  # dropout and friends: the same seed gives the same update
    params = trainable_parameters(model)
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    grad_sums = [torch.zeros_like(p) for p in params] if track_gradient else []
    reset_peak_memory(device)
    model.train()
    total_loss, seen, stream = 0.0, 0, batches(data, batch_size, seed)
    started = time.perf_counter()
    rates = [lr_at(step) if lr_at is not None else lr for step in range(steps)]
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = rates[step]
        for _ in range(grad_accum_steps):
            rows = next(stream)
            batch = {k: v.to(device) for k, v in collate(rows).items()}
            loss = _forward_loss(model, batch, device, dtype, objective)
            total_loss += loss.item()
            loss = _penalised(loss, params, anchors, proximal_mu, regulariser)
            _backward(loss / grad_accum_steps, scaler)
            seen += len(next(iter(rows.values())))
        _step(optimizer, scaler, params, max_grad_norm, grad_sums)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the last step's kernels count in its time
    elapsed = time.perf_counter() - started
    model.eval()
    return TrainResult(
        train_loss=total_loss / (steps * grad_accum_steps),
        num_examples=seen,
        steps=steps,
        learning_rate=rates[0],
        step_seconds=elapsed / steps,
        peak_memory_mb=peak_memory_mb(device),
        mean_gradients={p: g / steps for p, g in zip(params, grad_sums, strict=True)}
        if track_gradient
        else {},
    )


def _forward_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype | None,
    objective: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The loss on ``batch`` (the model's own, or ``objective``'s), under autocast to ``dtype``."""
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    )
    with autocast:
        return objective(model, batch) if objective is not None else model(**batch).loss


def _penalised(
    loss: torch.Tensor,
    params: list[torch.nn.Parameter],
    anchors: list[torch.Tensor],
    proximal_mu: float,
    regulariser: Callable[[], torch.Tensor] | None,
) -> torch.Tensor:
    """``loss`` plus the FedProx term (when anchored) and the strategy's regulariser."""
    if anchors:
        prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
        loss = loss + 0.5 * proximal_mu * prox
    if regulariser is not None:
        loss = loss + regulariser()
    return loss


def _backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """Add ``loss``'s gradients to the parameters' (fp16: scaled)."""
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()


def _step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    params: list[torch.nn.Parameter],
    max_grad_norm: float,
    grad_sums: list[torch.Tensor],
) -> None:
    """Clipping, gradient tracking and one optimizer step on the summed gradients."""
    if scaler is not None and (max_grad_norm > 0 or grad_sums):
        scaler.unscale_(optimizer)  # clip (and track) the true gradients
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if grad_sums:
        _add_gradients(grad_sums, params)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _add_gradients(sums: list[torch.Tensor], params: list[torch.nn.Parameter]) -> None:
    """Add each parameter's finite gradient to its running sum (a skipped fp16 step adds 0)."""
    with torch.no_grad():
        for total, p in zip(sums, params, strict=True):
            if p.grad is not None and torch.isfinite(p.grad).all():
                total.add_(p.grad)


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
        dpo_beta=scenario.train.dpo_beta,
    )
