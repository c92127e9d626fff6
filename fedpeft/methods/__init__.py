"""Registry of PEFT methods, and the one function that puts them on a model.

A method module registers itself with one call to :func:`register_method`; everything else
builds adapted models by name through :func:`build_peft_model`, never by ``if/elif``.

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
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from peft import PeftConfig, PeftModel, get_peft_model, inject_adapter_in_model

from fedpeft.config import PeftSection, ScenarioError

Kind = Literal["peft", "fedpeft", "full"]
TASKS = frozenset({"seq-cls", "causal-lm", "image-cls"})
FAMILIES = ("reparameterised", "additive", "selective", "hybrid", "full")

# attribute names fedpeft sets on a built model (read by fedpeft.adapters)
TRAVEL_ATTR = "_fedpeft_travel"  # parameter names that train and travel, in model order
BASE_ATTR = "_fedpeft_base_params"  # ids of the base model's own parameters
META_ATTR = "_fedpeft_meta"  # what a loader needs to rebuild the model (see save_adapter)


@dataclass(frozen=True)
class MethodContext:
    """What a method needs to know about the model it adapts."""

    task: str  # seq-cls | causal-lm | image-cls
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
    from fedpeft.tasks import get_task

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


# Method modules register themselves on import.
from fedpeft.methods import (  # noqa: E402,F401
    adalora,
    bitfit,
    bottleneck,
    full,
    lora,
    lowrank,
    prompts,
    sparse,
)
