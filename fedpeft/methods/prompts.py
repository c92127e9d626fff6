"""Additive methods through Hugging Face peft: IA3 and the prompt-learning family.

Prompt tuning and P-tuning prepend trained virtual-token embeddings; prefix tuning
prepends trained keys and values to every attention layer. All three need token
embeddings, so they do not apply to image classification.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from peft import IA3Config, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

from fedpeft.config import PeftSection, ScenarioError
from fedpeft.methods.lowrank import targets
from fedpeft.methods.registry import MethodContext, register_method

TEXT = frozenset({"seq-cls", "causal-lm", "dpo"})
NO_EMBEDDINGS = "it prepends virtual tokens and an image model has no token embeddings"


def ia3_config(cfg: PeftSection, ctx: MethodContext) -> IA3Config:
    """IA3 (Liu et al., 2022): learned vectors rescale the target modules' activations.

    Outputs are scaled, except for feed-forward modules, whose inputs are.
    """
    if cfg.feedforward_modules and not cfg.target_modules:
        raise ScenarioError(
            "peft.feedforward_modules must be a subset of peft.target_modules; name the "
            "target modules too"
        )
    return IA3Config(
        target_modules=targets(cfg),
        feedforward_modules=list(cfg.feedforward_modules) if cfg.target_modules else None,
        task_type=ctx.peft_task_type,
    )


def prompt_tuning_config(cfg: PeftSection, ctx: MethodContext) -> PromptTuningConfig:
    """Prompt tuning (Lester et al., 2021): trained soft-prompt embeddings."""
    return PromptTuningConfig(
        num_virtual_tokens=cfg.num_virtual_tokens, task_type=ctx.peft_task_type
    )


def p_tuning_config(cfg: PeftSection, ctx: MethodContext) -> PromptEncoderConfig:
    """P-tuning (Liu et al., 2021): soft prompts produced by a small trained MLP encoder.

    The encoder's weights train and travel; the saved adapter holds the prompts it makes.
    """
    return PromptEncoderConfig(
        num_virtual_tokens=cfg.num_virtual_tokens,
        encoder_hidden_size=cfg.encoder_hidden_size,
        task_type=ctx.peft_task_type,
    )


def prefix_tuning_config(cfg: PeftSection, ctx: MethodContext) -> PrefixTuningConfig:
    """Prefix tuning (Li and Liang, 2021): trained key/value prefixes in every layer."""
    return PrefixTuningConfig(
        num_virtual_tokens=cfg.num_virtual_tokens, task_type=ctx.peft_task_type
    )


def accept_past_key_values(model: torch.nn.Module) -> None:
    """Let peft 0.21's prefix tuning see a transformers-5 classifier's cache argument.

    For classification, peft checks that ``forward`` names ``past_key_values``; under
    transformers 5 a classifier's ``forward`` takes it only through ``**kwargs`` (the
    backbone calls it ``cache`` and still accepts the old name as a deprecated alias).
    This shim only adds the old name to the signature peft inspects; the call goes
    through unchanged. fedpeft's adapter loader applies it again when it rebuilds such a
    model.
    """
    forward = model.forward
    signature = inspect.signature(forward)
    if "past_key_values" in signature.parameters:
        return

    def forward_with_prefix(*args: Any, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)

    params = list(signature.parameters.values())
    extra = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    params.insert(at, extra)
    forward_with_prefix.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    model.forward = forward_with_prefix


register_method(
    "ia3",
    "additive",
    "learned vectors rescale activations of the target modules",
    kind="peft",
    peft_config=ia3_config,
)
register_method(
    "prompt_tuning",
    "additive",
    "trained soft-prompt embeddings prepended to the input",
    kind="peft",
    peft_config=prompt_tuning_config,
    prompt=True,
    tasks=TEXT,
    not_for=NO_EMBEDDINGS,
)
register_method(
    "p_tuning",
    "additive",
    "soft prompts made by a small trained MLP encoder",
    kind="peft",
    peft_config=p_tuning_config,
    prompt=True,
    tasks=TEXT,
    not_for=NO_EMBEDDINGS,
)
register_method(
    "prefix_tuning",
    "additive",
    "trained key/value prefixes in every attention layer",
    kind="peft",
    peft_config=prefix_tuning_config,
    prompt=True,
    tasks=TEXT,
    not_for=NO_EMBEDDINGS,
    prepare=accept_past_key_values,
)
