"""Registry of aggregation strategies, built by name from a scenario.

Each strategy module registers a builder with :func:`register_strategy`; the server builds
its strategy with :func:`build_strategy`. Generic strategies reuse Flower's own classes
(``flwr.serverapp.strategy``); PEFT-aware ones subclass them and keep their maths in plain
functions on tensors.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedpeft.config import Scenario, ScenarioError
from fedpeft.strategies.client_hook import ClientHook

Builder = Callable[[Scenario, dict[str, Any]], Strategy]


class AggregationError(ValueError):
    """Replies a rule cannot aggregate: a NaN or inf tensor, or an unusable example count.

    Every registered strategy raises it (and no other error) for such replies; its message
    is one line naming the node and the tensor or key (see :mod:`fedpeft.strategies.guard`).
    """


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy: its name, one-line description, builder and capabilities.

    The capabilities are stated here, once, by the module that registers the strategy;
    :func:`check_compatible` reads them to refuse scenarios the rule cannot serve.
    """

    name: str
    description: str
    build: Builder
    heterogeneous_ranks: bool = False  # accepts peft.client_ranks with different ranks
    lora_only: bool = False  # its rule needs LoRA factors (peft.method = "lora")
    #: its rule is a weighted sum of what clients send, so DP noise in shares and secure
    #: aggregation (the server sees only the sum) hold for it
    weighted_sum: bool = False
    #: folds each reply into running sums as it arrives (:mod:`fedpeft.strategies.fold`):
    #: the server holds one reply at a time, whatever the number of clients
    streams_replies: bool = False
    #: why clients get new LoRA factors every round (error feedback cannot apply); "" if not
    new_factors_each_round: str = ""
    #: folds each round's update into the frozen base weights (FLoRA, FedEx-LoRA), so the
    #: base is no longer the pretrained model DPO takes as its reference
    changes_base: bool = False
    #: the rule's client-side work (HetLoRA's self-pruning); the default does nothing
    client_hook: ClientHook = ClientHook()


STRATEGIES: dict[str, StrategySpec] = {}


def register_strategy(
    name: str,
    description: str,
    build: Builder,
    *,
    heterogeneous_ranks: bool = False,
    lora_only: bool = False,
    weighted_sum: bool = False,
    streams_replies: bool = False,
    new_factors_each_round: str = "",
    changes_base: bool = False,
    client_hook: ClientHook | None = None,
) -> StrategySpec:
    """Register a strategy builder and its capabilities; a duplicate or bad name fails."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"malformed strategy name {name!r}: use lower_snake_case")
    if name in STRATEGIES:
        raise ValueError(f"strategy {name!r} is registered twice")
    spec = StrategySpec(
        name,
        description,
        build,
        heterogeneous_ranks=heterogeneous_ranks,
        lora_only=lora_only,
        weighted_sum=weighted_sum,
        streams_replies=streams_replies,
        new_factors_each_round=new_factors_each_round,
        changes_base=changes_base,
        client_hook=client_hook or ClientHook(),
    )
    STRATEGIES[name] = spec
    return spec


def names_that(capability: str) -> str:
    """The registered strategies with ``capability`` set, as "a, b or c" for error lines."""
    names = sorted(n for n, spec in STRATEGIES.items() if getattr(spec, capability))
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)


def get_strategy(name: str) -> StrategySpec:
    """Look a strategy up by name; an unknown name raises a one-line ScenarioError."""
    if name not in STRATEGIES:
        raise ScenarioError(
            f"unknown strategy.name {name!r}; accepted: {', '.join(sorted(STRATEGIES))}"
        )
    return STRATEGIES[name]


def sampling_kwargs(scenario: Scenario) -> dict[str, Any]:
    """Flower sampling arguments: exactly ``clients_per_round`` of ``num_clients`` train."""
    n, k = scenario.data.num_clients, scenario.federation.clients_per_round
    return {
        "fraction_train": k / n,
        "min_train_nodes": k,  # guards against float rounding in fraction * n
        "fraction_evaluate": 0.0,  # evaluation is central, on the held-out split
        "min_evaluate_nodes": 0,
        "min_available_nodes": n,
    }


def build_strategy(scenario: Scenario) -> Strategy:
    """Build the scenario's strategy by registry lookup."""
    spec = get_strategy(scenario.strategy.name)
    check_compatible(spec, scenario)
    # Flower's FedAvg warns that fraction_evaluate=0 skips federated evaluation: fedpeft
    # evaluates on the server instead, so the warning would only mislead
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)
    try:
        return spec.build(scenario, sampling_kwargs(scenario))
    finally:
        flwr_log.setLevel(level)


def check_compatible(spec: StrategySpec, scenario: Scenario) -> None:
    """Refuse, in one line, a scenario the strategy cannot aggregate."""
    if scenario.heterogeneous_ranks and not spec.heterogeneous_ranks:
        raise ScenarioError(
            f"strategy.name={spec.name!r} cannot aggregate heterogeneous ranks "
            f"(peft.client_ranks={scenario.peft.client_ranks}); use "
            f"{names_that('heterogeneous_ranks')}, "
            "or give every client the same rank"
        )
    if spec.lora_only and scenario.peft.methods != ["lora"]:
        raise ScenarioError(
            f"strategy.name={spec.name!r} aggregates LoRA factors and needs "
            f"peft.method='lora', not {scenario.peft.method!r}"
        )
    if scenario.privacy.dp != "none" and not spec.weighted_sum:
        raise ScenarioError(
            f"privacy.dp={scenario.privacy.dp!r} needs a strategy whose rule is a weighted sum "
            f"of client updates ({names_that('weighted_sum')}), not strategy.name={spec.name!r}"
        )
    if scenario.privacy.secure_aggregation:
        check_secure_aggregation(spec, scenario)
    if spec.changes_base and scenario.model.task == "dpo":
        raise ScenarioError(
            f"strategy.name={spec.name!r} folds each round's update into the frozen base "
            "weights, and model.task='dpo' takes that base (the adapter switched off) as its "
            "reference model, which would then move every round; use a strategy that keeps "
            "the base, e.g. fedavg, fedit, ffa_lora or flexlora"
        )
    if spec.new_factors_each_round and scenario.compression.error_feedback:
        raise ScenarioError(
            f"strategy.name={spec.name!r} {spec.new_factors_each_round}, so an "
            "error-feedback residual of last round's factors means nothing in the next; set "
            "compression.error_feedback=false"
        )


def check_secure_aggregation(spec: StrategySpec, scenario: Scenario) -> None:
    """Refuse, in one line, what cannot go with SecAgg+: the server sees only the sum."""
    if not spec.weighted_sum:
        raise ScenarioError(
            f"privacy.secure_aggregation needs a strategy whose rule is a weighted sum of "
            f"client updates ({names_that('weighted_sum')}), not strategy.name={spec.name!r}"
        )
    refusals = {
        "privacy.dp='central'": (
            scenario.privacy.dp == "central",
            "central DP clips each update on the server, which secure aggregation hides; "
            "use privacy.dp='local'",
        ),
        "compression.uplink": (
            bool(scenario.compression.uplink),
            "masked updates are dense integers that no codec can shrink; set it to []",
        ),
        "federation.clip_update_norm": (
            scenario.federation.clip_update_norm > 0,
            "the server cannot see single updates to clip them; use privacy.dp='local'",
        ),
        "federation.max_update_norm": (
            scenario.federation.max_update_norm > 0,
            "the server cannot see single updates to bound their norm",
        ),
        "federation.clients_per_round": (
            scenario.federation.clients_per_round < 2,
            "a sum over one client is that client's update",
        ),
    }
    for key, (refused, why) in refusals.items():
        if refused:
            raise ScenarioError(f"privacy.secure_aggregation=true does not go with {key}: {why}")


# Strategy modules register themselves on import.
from fedpeft.strategies import (  # noqa: E402,F401
    fedavg,
    fedex_lora,
    fedit,
    fedopt,
    fedsa_lora,
    ffa_lora,
    flexlora,
    flora,
    hetlora,
    rolora,
)
