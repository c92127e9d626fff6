"""Registry of PEFT methods, each built on Hugging Face peft.

A method module registers itself with one call to :func:`register_method`; everything else
builds adapted models by name through :func:`build_peft_model`, never by ``if/elif``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from fedpeft.config import PeftSection, ScenarioError

Builder = Callable[[PreTrainedModel, PeftSection, str], torch.nn.Module]


@dataclass(frozen=True)
class MethodSpec:
    """A registered PEFT method: its name, family and model builder."""

    name: str
    family: str  # reparameterised | additive | selective | hybrid | full
    description: str
    build: Builder


METHODS: dict[str, MethodSpec] = {}
FAMILIES = ("reparameterised", "additive", "selective", "hybrid", "full")


def register_method(name: str, family: str, description: str, build: Builder) -> MethodSpec:
    """Register a PEFT method; a duplicate or malformed name fails loudly."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"malformed PEFT method name {name!r}: use lower_snake_case")
    if name in METHODS:
        raise ValueError(f"PEFT method {name!r} is registered twice")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} for {name!r}; accepted: {FAMILIES}")
    spec = MethodSpec(name, family, description, build)
    METHODS[name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """Look a method up by name; an unknown name raises a one-line ScenarioError."""
    if name not in METHODS:
        raise ScenarioError(f"unknown peft.method {name!r}; accepted: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_peft_model(
    base: PreTrainedModel, cfg: PeftSection, task: str, seed: int
) -> torch.nn.Module:
    """Wrap ``base`` with the scenario's PEFT method; adapter init is seeded by ``seed``."""
    spec = get_method(cfg.method)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.build(base, cfg, task)


# Method modules register themselves on import.
from fedpeft.methods import lora  # noqa: E402,F401
