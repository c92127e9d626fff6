"""``dpo``: preference tuning of a decoder by Direct Preference Optimization.

Rafailov et al. (2023): for a prompt x with a chosen response y_w and a rejected one y_l,

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x))
                                - (log pi(y_l|x) - log ref(y_l|x))))

with log-probabilities summed over the response tokens (TRL's ``sigmoid`` loss). The
reference model is the base itself with the adapter switched off (peft's
``disable_adapter``): no second model is loaded. Strategies that fold each round's update
into the frozen weights (FLoRA, FedEx-LoRA) would move that reference, and are refused.

A batch holds the chosen sequences of its pairs, then the rejected ones, each prompt plus
response with the prompt labelled -100 (the causal-lm task's encoding). Scored on held-out
pairs by the DPO loss (``eval_loss``), the reward accuracy (the share of pairs whose
chosen reward ``beta * (log pi - log ref)`` is above the rejected one, ``eval_accuracy``)
and the mean reward margin (``eval_reward_margin``), as TRL reports them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from fedpeft.config import DataSection, ScenarioError, TrainSection
from fedpeft.data import CHOSEN, REJECTED
from fedpeft.tasks.base import IGNORE_INDEX, Batch, Collate, Rows, chunks, last_positions, to_device
from fedpeft.tasks.causal_lm import CausalLanguageModeling, encode_example, pad_rows


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over each row's labelled tokens (labels -100 are skipped).

    Through ``cross_entropy``, which never stores the log-softmax over the vocabulary.
    """
    logits = last_positions(logits, labels.shape[1])[:, :-1]
    targets = labels[:, 1:]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return -nll.view(targets.shape).sum(-1)


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss, chosen rewards and rejected rewards from summed log-probabilities."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


@contextlib.contextmanager
def reference(model: torch.nn.Module) -> Iterator[None]:
    """The reference model: ``model`` with its adapter switched off, without gradients."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        raise ScenarioError(
            "model.task='dpo' takes its reference model by switching the adapter off, which "
            "needs a peft method (lora, ia3, prompt_tuning, ...): set peft.method"
        )
    with disable(), torch.no_grad():
        yield


def pair_logps(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy, reference) summed log-probabilities of every sequence of the batch."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    policy = sequence_logps(model(**inputs).logits, batch["labels"])
    with reference(model):
        ref = sequence_logps(model(**inputs).logits, batch["labels"])
    return policy, ref


def dpo_objective(model: torch.nn.Module, batch: Batch, beta: float) -> torch.Tensor:
    """The mean DPO loss of a batch of [chosen..., rejected...] sequences."""
    policy, ref = pair_logps(model, batch)
    chosen, rejected = policy.chunk(2)
    ref_chosen, ref_rejected = ref.chunk(2)
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)[0].mean()


class DirectPreferenceOptimization(CausalLanguageModeling):
    """Preference tuning: DPO against the base model (the adapter switched off)."""

    name = "dpo"
    description = "preference tuning of a decoder by DPO (reference: the adapter switched off)"
    columns: tuple[str, ...] = ("text", CHOSEN, REJECTED)

    def check_data(self, data: datasets.Dataset, cfg: DataSection) -> None:
        """Preference rows: a prompt, a chosen and a rejected response."""
        missing = [c for c in self.columns if c not in data.column_names]
        if missing:
            raise ScenarioError(
                f"model.task='dpo' reads preference pairs (a prompt, chosen, rejected), but data "
                f"set {cfg.name!r} has {data.column_names}; see data.format"
            )

    def make_collate(self, processor: Any, max_length: int) -> Collate:
        """The chosen sequences of the pairs, then the rejected ones, right-padded."""
        tokenizer: PreTrainedTokenizerBase = processor
        pad = int(tokenizer.pad_token_id or 0)

        def collate(rows: Rows) -> Batch:
            pairs = [
                encode_example(tokenizer, prompt, response, max_length)
                for column in (CHOSEN, REJECTED)
                for prompt, response in zip(rows["text"], rows[column], strict=True)
            ]
            input_ids, mask = pad_rows([ids for ids, _ in pairs], pad)
            labels, _ = pad_rows([lab for _, lab in pairs], IGNORE_INDEX)
            return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

        return collate

    def objective(self, train: TrainSection) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
        """The DPO loss at ``train.dpo_beta``."""
        return functools.partial(dpo_objective, beta=train.dpo_beta)

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
        """DPO loss, reward accuracy and reward margin, means over the held-out pairs."""
        model.eval()
        collate = self.make_collate(processor, max_length)
        losses, chosen_rewards, rejected_rewards = [], [], []
        for idx in chunks(range(len(data)), batch_size):
            policy, ref = pair_logps(model, to_device(collate(data[idx]), device))
            (chosen, rejected), (ref_chosen, ref_rejected) = policy.chunk(2), ref.chunk(2)
            loss, good, bad = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, dpo_beta)
            losses.append(loss.cpu())
            chosen_rewards.append(good.cpu())
            rejected_rewards.append(bad.cpu())
        good, bad = torch.cat(chosen_rewards), torch.cat(rejected_rewards)
        return {
            "eval_loss": torch.cat(losses).mean().item(),
            "eval_accuracy": (good > bad).float().mean().item(),
            "eval_reward_margin": (good - bad).mean().item(),
            "eval_chosen_reward": good.mean().item(),
            "eval_rejected_reward": bad.mean().item(),
        }
