"""PEFT methods by name, and the one function that puts them on a model.

A method module registers itself with one call to
:func:`~fedpeft.methods.registry.register_method` (the registry sits below the method
modules, which this package imports); everything else builds adapted models by name
through :func:`build_peft_model`, never by ``if/elif``.

Methods come in three kinds:

* ``peft``: Hugging Face peft implements it; the module gives a ``PeftConfig`` factory
  and peft injects the layers (LoRA, DoRA, LoHa, LoKr, VeRA, AdaLoRA, IA3, prompts);
* ``fedpeft``: no well-kept library provides it for this stack, so fedpeft writes it by
  hand (BitFit, a fixed sparse mask, Houlsby bottleneck adapters) as a function that
  changes the model in place and marks what it trains;
* ``full``: every weight trains (the baseline).

A hybrid (``peft.method = ["lora", "bitfit"]``) applies at most one of peft's tuners first
(injected with ``inject_adapter_in_model``), then at most one prompt method
(``get_peft_model``), then fedpeft's own methods. Whatever any of them made trainable
trains and travels; that set is recorded on the model (see :mod:`fedpeft.adapters`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model

from fedpeft.adapters import BASE_ATTR, META_ATTR, TRAVEL_ATTR
from fedpeft.config import PeftSection, ScenarioError

# each method module registers itself on import
from fedpeft.methods import (  # noqa: F401  (imported to register)
    adalora,
    bitfit,
    bottleneck,
    full,
    lora,
    lowrank,
    prompts,
    sparse,
)
from fedpeft.methods.registry import (
    FAMILIES,
    METHODS,
    TASKS,
    Apply,
    Kind,
    MethodContext,
    MethodSpec,
    PeftConfigFactory,
    RoundHook,
    get_method,
    register_method,
)
from fedpeft.tasks import get_task

__all__ = [
    "BASE_ATTR",
    "FAMILIES",
    "META_ATTR",
    "METHODS",
    "TASKS",
    "TRAVEL_ATTR",
    "Apply",
    "Kind",
    "MethodContext",
    "MethodSpec",
    "PeftConfigFactory",
    "RoundHook",
    "before_round",
    "build_peft_model",
    "check_methods",
    "get_method",
    "register_method",
]


def check_methods(cfg: PeftSection, task: str) -> list[MethodSpec]:
    """Resolve ``cfg.method`` for ``task``; refuse, in one line, what cannot be combined."""
    specs = [get_method(name) for name in cfg.methods]
    for spec in specs:
        if task not in spec.tasks:
            why = f" ({spec.not_for})" if spec.not_for else ""
            able = sorted(n for n, s in METHODS.items() if task in s.tasks)
            raise ScenarioError(
                f"peft.method {spec.name!r} cannot apply to model.task={task!r}{why}; "
                f"methods for {task}: {', '.join(able)}"
            )
    if task == "dpo" and (len(specs) > 1 or specs[0].kind != "peft"):
        raise ScenarioError(
            f"model.task='dpo' takes its reference model by switching peft's adapter off, "
            f"which peft.method={cfg.label!r} cannot do wholly; use one peft method (lora, "
            "dora, ia3, prompt_tuning, ...)"
        )
    if len(specs) > 1:
        for spec in specs:
            if spec.no_hybrid:
                raise ScenarioError(
                    f"peft.method {spec.name!r} cannot be combined with other methods "
                    f"({spec.no_hybrid}); use it alone"
                )
        prompts = [s.name for s in specs if s.prompt]
        if len(prompts) > 1:
            raise ScenarioError(f"peft.method combines prompt methods {prompts}: use one of them")
        tuners = [s.name for s in specs if s.kind == "peft" and not s.prompt]
        if len(tuners) > 1:  # one peft adapter name per model: a second would replace the first
            raise ScenarioError(
                f"peft.method combines peft's tuners {tuners}: a hybrid takes one of them "
                "(plus a prompt method and fedpeft's adapter, bitfit or sparse)"
            )
    return specs


# the order in which a hybrid's methods go on the model
_ORDER = {"tuner": 0, "prompt": 1, "fedpeft": 2, "full": 3}


def _stage(spec: MethodSpec) -> int:
    if spec.kind == "peft":
        return _ORDER["prompt" if spec.prompt else "tuner"]
    return _ORDER[spec.kind]


def _task_context(model: torch.nn.Module, task: str, seed: int, hybrid: bool) -> MethodContext:
    info = get_task(task)
    return MethodContext(
        task=task,
        peft_task_type=info.peft_task_type,
        head_modules=tuple(info.head_module_names(model)),
        model_type=str(getattr(getattr(model, "config", None), "model_type", "")),
        seed=seed,
        hybrid=hybrid,
    )


def _peft_error(spec: MethodSpec, model: torch.nn.Module, err: Exception) -> ScenarioError:
    return ScenarioError(
        f"peft.method {spec.name!r} does not fit model {type(model).__name__}: "
        f"{str(err).splitlines()[0]} (check peft.target_modules and the method's keys)"
    )


def build_peft_model(
    base: torch.nn.Module, cfg: PeftSection, task: str, seed: int
) -> torch.nn.Module:
    """Put the scenario's PEFT method(s) on the frozen ``base``; random init is seeded.

    The parameters that train (and travel between server and clients) are recorded on
    the returned model, as are the base model's own parameters, so that
    :mod:`fedpeft.adapters` can read and write exactly those.
    """
    specs = check_methods(cfg, task)
    hybrid = len(specs) > 1
    ctx = _task_context(base, task, seed, hybrid)
    base_ids = {id(p) for p in base.parameters()}
    # parameters any step made trainable (held, so a freed one's id cannot be reused)
    trainable: dict[int, torch.nn.Parameter] = {}
    model = base
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for spec in sorted(specs, key=_stage):
            model = _apply(spec, model, cfg, ctx)
            trainable.update({id(p): p for p in model.parameters() if p.requires_grad})
        trainable.update(_head_parameters(model, ctx))
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    names = [n for n, p in model.named_parameters() if id(p) in trainable]
    if not names:
        raise ScenarioError(
            f"peft.method={cfg.label!r} leaves nothing to train on {type(base).__name__} "
            "(no matching modules); check peft.target_modules / peft.adapter_modules"
        )
    setattr(model, TRAVEL_ATTR, names)
    setattr(model, BASE_ATTR, base_ids)
    setattr(model, META_ATTR, {"peft": dataclasses.asdict(cfg), "task": task, "seed": seed})
    return model


def _apply(
    spec: MethodSpec, model: torch.nn.Module, cfg: PeftSection, ctx: MethodContext
) -> torch.nn.Module:
    if spec.kind == "full":
        model.requires_grad_(True)
        return model
    if spec.kind == "fedpeft":
        assert spec.apply is not None
        spec.apply(model, cfg, ctx)
        return model
    assert spec.peft_config is not None
    if spec.prepare is not None:
        spec.prepare(model)
    try:
        config = spec.peft_config(cfg, ctx)
        if ctx.hybrid and not spec.prompt:
            # several methods on one model: peft's tuners are injected without a wrapper
            return inject_adapter_in_model(config, model)
        if not ctx.hybrid and ctx.peft_task_type is None and ctx.head_modules:
            # image-cls: peft has no task type that saves the head, so name it
            config.modules_to_save = list(ctx.head_modules)  # type: ignore[attr-defined]
        return get_peft_model(model, config)
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        raise _peft_error(spec, model, err) from None


def _head_parameters(model: torch.nn.Module, ctx: MethodContext) -> dict[int, torch.nn.Parameter]:
    """The task head trains from scratch under every method (peft copies it when it wraps)."""
    ids: dict[int, torch.nn.Parameter] = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in ctx.head_modules:
            if isinstance(model, PeftModel) and hasattr(module, "modules_to_save"):
                continue  # peft's wrapper: its trainable copy is already marked
            if ".modules_to_save." in f".{name}." or ".original_module" in name:
                continue
            ids.update({id(p): p for p in module.parameters()})
    return ids


def before_round(model: torch.nn.Module, server_round: int, rounds: int) -> Callable[[], None]:
    """Run each method's start-of-round hook; return one function that undoes them all."""
    meta: dict[str, Any] = getattr(model, META_ATTR, {})
    if not meta:
        return lambda: None
    cfg = PeftSection(**meta["peft"])
    undo = []
    for name in cfg.methods:
        hook = get_method(name).before_round
        if hook is not None and (done := hook(model, cfg, server_round, rounds)) is not None:
            undo.append(done)

    def undo_all() -> None:
        for fn in undo:
            fn()

    return undo_all
