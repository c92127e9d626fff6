"""LoRA (Hu et al., 2021) through Hugging Face peft: ``W + (alpha / r) * B @ A``."""

from __future__ import annotations

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import PreTrainedModel

from fedpeft.config import PeftSection, ScenarioError
from fedpeft.methods import register_method

TASK_TYPES = {"seq-cls": TaskType.SEQ_CLS}


def build_lora(base: PreTrainedModel, cfg: PeftSection, task: str) -> torch.nn.Module:
    """Inject LoRA into ``cfg.target_modules`` (peft's default for the model when empty).

    For ``seq-cls`` peft also trains the freshly initialised classification head
    (``modules_to_save``), so the head travels with the adapter.
    """
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # peft annotates int; floats work
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules) or None,
        task_type=TASK_TYPES[task],
    )
    try:
        return get_peft_model(base, config)
    except ValueError as err:
        raise ScenarioError(
            f"peft.target_modules={list(cfg.target_modules)} does not fit model "
            f"{type(base).__name__}: {str(err).splitlines()[0]}"
        ) from None


register_method("lora", "reparameterised", "low-rank update B @ A on chosen matrices", build_lora)
