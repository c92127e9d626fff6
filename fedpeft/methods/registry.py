"""The registry of PEFT methods: what a method declares, and the table of them by name.

Each method module (:mod:`fedpeft.methods.lora`, ...) imports this module and registers
itself with one call to :func:`register_method`; :mod:`fedpeft.methods` imports the
method modules, so the table is full once the package is imported.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from peft import PeftConfig

from fedpeft.config import PeftSection, ScenarioError

Kind = Literal["peft", "fedpeft", "full"]
TASKS = frozenset({"seq-cls", "causal-lm", "dpo", "image-cls"})
FAMILIES = ("reparameterised", "additive", "selective", "hybrid", "full")


@dataclass(frozen=True)
class MethodContext:
    """What a method needs to know about the model it adapts."""

    task: str  # seq-cls | causal-lm | dpo | image-cls
    peft_task_type: str | None  # peft's TaskType for the task (None for image-cls)
    head_modules: tuple[str, ...]  # freshly initialised task head(s), trained from scratch
    model_type: str  # transformers' config.model_type (bert, llama, vit, gpt2, ...)
    seed: int
    hybrid: bool  # one of several methods on this model


PeftConfigFactory = Callable[[PeftSection, MethodContext], PeftConfig]
Apply = Callable[[torch.nn.Module, PeftSection, MethodContext], None]
RoundHook = Callable[[torch.nn.Module, PeftSection, int, int], Callable[[], None] | None]


@dataclass(frozen=True)
class MethodSpec:
    """A registered PEFT method.

    Exactly one of ``peft_config`` (peft builds it) and ``apply`` (fedpeft changes the
    model in place, setting ``requires_grad`` on what it trains) is given, except for
    ``full``. ``prompt`` marks peft's prompt-learning methods (one per model at most).
    ``before_round(model, cfg, server_round, rounds)`` lets a method act at the start of a
    client's round (AdaLoRA's rank budget); it returns a function that undoes it, or None.
    """

    name: str
    family: str
    description: str
    kind: Kind
    tasks: frozenset[str]
    peft_config: PeftConfigFactory | None = None
    apply: Apply | None = None
    prompt: bool = False
    before_round: RoundHook | None = None
    not_for: str = ""  # why the method cannot apply to the tasks it lacks (one phrase)
    prepare: Callable[[torch.nn.Module], None] | None = None  # on the base, before peft
    no_hybrid: str = ""  # why the method cannot share a model with others (one phrase)


METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    family: str,
    description: str,
    *,
    kind: Kind,
    tasks: frozenset[str] = TASKS,
    peft_config: PeftConfigFactory | None = None,
    apply: Apply | None = None,
    prompt: bool = False,
    before_round: RoundHook | None = None,
    not_for: str = "",
    prepare: Callable[[torch.nn.Module], None] | None = None,
    no_hybrid: str = "",
) -> MethodSpec:
    """Register a PEFT method; a duplicate or malformed registration fails loudly."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"malformed PEFT method name {name!r}: use lower_snake_case")
    if name in METHODS:
        raise ValueError(f"PEFT method {name!r} is registered twice")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} for {name!r}; accepted: {FAMILIES}")
    if not tasks <= TASKS:
        raise ValueError(f"{name!r} names unknown tasks {sorted(tasks - TASKS)}")
    if kind == "peft" and (peft_config is None or apply is not None):
        raise ValueError(f"peft method {name!r} needs a peft_config factory and no apply")
    if kind == "fedpeft" and (apply is None or peft_config is not None):
        raise ValueError(f"fedpeft method {name!r} needs an apply function and no peft_config")
    spec = MethodSpec(
        name,
        family,
        description,
        kind,
        tasks,
        peft_config,
        apply,
        prompt,
        before_round,
        not_for,
        prepare,
        no_hybrid,
    )
    METHODS[name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """Look a method up by name; an unknown name raises a one-line ScenarioError."""
    if name not in METHODS:
        raise ScenarioError(f"unknown peft.method {name!r}; accepted: {', '.join(sorted(METHODS))}")
    return METHODS[name]
