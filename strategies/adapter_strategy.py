"""Base class of the PEFT-aware strategies: the server owns the full global adapter.

Flower's FedAvg sends every node the same ArrayRecord and averages whatever comes back.
PEFT-aware rules need more: a node may receive only some factors (FFA-LoRA sends no A),
keep others to itself (FedSA-LoRA's B), train a different rank (FlexLoRA, HetLoRA), or
get a truncation made for its rank. :class:`AdapterStrategy` keeps the whole global
adapter on the server, builds one message per node from :meth:`down_state` and
:meth:`instructions`, and folds each reply into the rule as it arrives
(:meth:`start_aggregation`, :meth:`fold`, :meth:`finish_aggregation`; by default exact
running weighted sums, so the server holds one reply at a time). A rule that needs the
round's replies at once subclasses :class:`HoldsReplies` and implements
:meth:`aggregate_states`.

Instructions travel in the ConfigRecord and are read by the ClientApp (``clients/app.py``):
which factors to train, which to send back and which to keep locally.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedpeft import records
from fedpeft.adapters import AdapterState, BaseDelta, base_delta_to_state, factor_of, lora_pairs
from fedpeft.codecs import arrayrecord_to_state, state_to_arrayrecord
from fedpeft.config import Scenario
from fedpeft.lora import lora_alpha_for, lora_scaling
from fedpeft.strategies.fold import (
    OnServerDevice,
    WeightedSums,
    aggregation_device,
    fold_replies,
    give_back_free_memory,
)
from fedpeft.strategies.lora_math import stack_factors

ALL_FACTORS = "lora_A,lora_B,head"


class AdapterStrategy(OnServerDevice, FedAvg):
    """FedAvg's sampling and bookkeeping, with per-node payloads and a pluggable rule."""

    #: can aggregate clients that train different LoRA ranks
    heterogeneous_ranks = False
    #: clients keep part of the adapter; the run reports a personalised metric
    personalised = False

    def __init__(self, scenario: Scenario, sampling: dict[str, Any]) -> None:
        if self.personalised:
            sampling = {
                **sampling,
                "fraction_evaluate": sampling["fraction_train"],
                "min_evaluate_nodes": sampling["min_train_nodes"],
            }
        super().__init__(**sampling)
        self.scenario = scenario
        aggregation_device(scenario)  # a CUDA server that has no CUDA: one line, now
        self.global_state: AdapterState = {}
        self.node_ranks: dict[int, int] = {}  # learned from replies ("rank" metric)
        #: factored change of the frozen base weights, sent to every node (FLoRA, FedEx)
        self.base_delta: BaseDelta = {}
        self.last_trained: list[int] = []  # nodes sampled in the latest training round

    # ---------------------------------------------------------------- the rule (override)
    def down_state(self, server_round: int, node_id: int) -> AdapterState:
        """What node ``node_id`` receives this round (default: the whole global adapter)."""
        return self.global_state

    def instructions(self, server_round: int, node_id: int) -> dict[str, str | int | float]:
        """ConfigRecord entries telling the client what to train, send and keep."""
        return instruct(ALL_FACTORS)

    def start_aggregation(self, server_round: int) -> None:
        """Before a round's first reply (default: empty running sums, on :attr:`device`)."""
        self._sums = WeightedSums(self.device)

    def fold(self, server_round: int, state: AdapterState, weight: float, node_id: int) -> None:
        """Take in one valid reply, which is dropped after this call.

        Default: add it to exact running sums (:class:`fedpeft.strategies.fold.WeightedSums`).
        """
        self._sums.add(state, weight, node_id)

    def finish_aggregation(self, server_round: int) -> None:
        """After the round's last reply: update ``self.global_state``.

        Default: the example-weighted mean of whatever the clients sent replaces those
        tensors of the global adapter (FedIT, and FFA/FedSA/RoLoRA on their subsets).
        """
        sums, self._sums = self._sums, WeightedSums()  # let the round's sums go
        self.global_state = {**self.global_state, **sums.mean()}

    def aggregate_states(
        self,
        server_round: int,
        states: list[AdapterState],
        weights: list[float],
        node_ids: list[int],
    ) -> None:
        """A whole round's replies at once (tests, notebooks): folded one by one."""
        self.start_aggregation(server_round)
        for state, weight, node_id in zip(states, weights, node_ids, strict=True):
            self.fold(server_round, state, weight, node_id)
        self.finish_aggregation(server_round)

    def product_sums(
        self, states: list[AdapterState], weights: list[float]
    ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """Yield (module, P, Q) with ``P @ Q = sum p_i s_i B_i A_i`` exactly (FLoRA stacking).

        ``s_i`` is peft's scaling of client i at its own rank (:meth:`scaling`).
        """
        for module, _, _, bs, as_ in lora_factors(states):
            scalings = [self.scaling(a.shape[0]) for a in as_]
            yield (module, *stack_factors(bs, as_, weights, scalings))

    def scaling(self, rank: int) -> float:
        """Peft's LoRA scaling of a rank-``rank`` adapter in this scenario (rsLoRA or not)."""
        peft = self.scenario.peft
        return lora_scaling(peft.alpha, rank, peft.use_rslora)

    def average_heads(self, states: list[AdapterState], weights: list[float]) -> None:
        """FedAvg on the non-LoRA tensors (the task head), for rules that treat A, B apart."""
        heads = [select(s, {"head"}) for s in states]
        if heads[0]:
            self.global_state.update(weighted_average(heads, weights))

    def eval_state(self) -> AdapterState:
        """The full adapter the server evaluates and saves (at the server model's rank)."""
        return self.global_state

    def export(self) -> tuple[AdapterState, int, float]:
        """The final adapter as (state, LoRA rank, lora_alpha) for saving in peft format.

        The adapter keeps the scenario's ``peft.use_rslora``; ``lora_alpha`` is what gives
        the state its scaling under it. Strategies that change the base weights return an
        adapter that also carries that change, so ``PeftModel.from_pretrained(original_base,
        ...)`` gives the same model.
        """
        s = self.scenario
        return self.eval_state(), s.max_rank, s.peft_for_rank(s.max_rank).alpha

    def export_unscaled(self, state: AdapterState, rank: int) -> tuple[AdapterState, int, float]:
        """Export ``state`` whose ``B @ A`` is the delta itself: alpha gives peft scaling 1."""
        return state, rank, lora_alpha_for(1.0, rank, self.scenario.peft.use_rslora)

    def settings(self) -> dict[str, object]:
        """The rule's own settings, logged by :meth:`summary` (override to add some)."""
        peft = self.scenario.peft
        scaling = "alpha / sqrt(r) (rsLoRA)" if peft.use_rslora else "alpha / r"
        return {"LoRA scaling": f"{scaling}, alpha = {peft.alpha:g}"}

    def describe(self) -> str:
        """One line on the rule, logged by :meth:`summary`."""
        doc = type(self).__doc__
        return doc.splitlines()[0] if doc else type(self).__name__

    # ---------------------------------------------------------------- Flower plumbing
    def summary(self) -> None:
        """Log the rule and FedAvg's sampling settings."""
        log(INFO, "\t├──> Rule: %s", self.describe())
        log(INFO, "\t├──> Heterogeneous ranks: %s", self.heterogeneous_ranks)
        log(INFO, "\t├──> Personalised: %s", self.personalised)
        for name, value in self.settings().items():
            log(INFO, "\t├──> %s: %s", name, value)
        super().summary()

    def _messages(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        fraction: float,
        minimum: int,
        message_type: str,
    ) -> list[Message]:
        if not self.global_state:
            self.global_state = arrayrecord_to_state(arrays)
        if fraction == 0.0:
            return []
        if message_type == MessageType.EVALUATE and self.last_trained:
            node_ids = list(self.last_trained)  # personalised metric of the clients that trained
        else:
            num_nodes = int(len(list(grid.get_node_ids())) * fraction)
            node_ids, every = sample_nodes(grid, self.min_available_nodes, max(num_nodes, minimum))
            log(
                INFO,
                "configure_%s: Sampled %s nodes (out of %s)",
                message_type,
                len(node_ids),
                len(every),
            )
        if message_type == MessageType.TRAIN:
            self.last_trained = list(node_ids)
        messages = []
        # nodes given the same state share one ArrayRecord (each Message is serialised on
        # its own when sent): hundreds of nodes cost one copy of a 7B adapter, not hundreds.
        # The state is kept with its record, so its id cannot be reused by another.
        packed: dict[int, tuple[AdapterState, ArrayRecord]] = {}
        for node_id in node_ids:
            state = self.down_state(server_round, node_id)
            if id(state) not in packed:
                packed[id(state)] = (state, state_to_arrayrecord(state))
            node_config = ConfigRecord(
                {
                    **dict(config),
                    **self.instructions(server_round, node_id),
                    records.SERVER_ROUND: server_round,
                }
            )
            content = RecordDict(
                {
                    self.arrayrecord_key: packed[id(state)][1],
                    self.configrecord_key: node_config,
                }
            )
            if self.base_delta:  # counted as sent, like every other byte of the message
                content[records.BASE_DELTA] = state_to_arrayrecord(
                    base_delta_to_state(self.base_delta)
                )
            messages.append(Message(content, dst_node_id=node_id, message_type=message_type))
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and build each one's message from its down-state and instructions."""
        return self._messages(
            server_round,
            arrays,
            config,
            grid,
            self.fraction_train,
            self.min_train_nodes,
            MessageType.TRAIN,
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Personalised evaluation: each sampled client evaluates with its own local part."""
        return self._messages(
            server_round,
            arrays,
            config,
            grid,
            self.fraction_evaluate,
            self.min_evaluate_nodes,
            MessageType.EVALUATE,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fold the valid replies into the rule as they come; return the new full adapter.

        ``replies`` may be an iterator: each reply is checked, folded and dropped before
        the next is read (:func:`fedpeft.strategies.fold.fold_replies`). Replies no rule can
        use (NaN or inf, unusable example counts) raise AggregationError.
        """
        started = False

        def fold(msg: Message, weight: float) -> None:
            nonlocal started
            if not started:
                self.start_aggregation(server_round)
                started = True
            node = msg.metadata.src_node_id
            metrics = msg.content.metric_records.get(records.METRICS)
            if metrics is not None and records.CLIENT_RANK in metrics:
                self.node_ranks[node] = int(str(metrics[records.CLIENT_RANK]))
            state = arrayrecord_to_state(msg.content.array_records[self.arrayrecord_key])
            self.fold(server_round, state, weight, node)

        metrics = fold_replies(replies, self.weighted_by_key, fold)
        if metrics is None:
            return None, None
        self.finish_aggregation(server_round)
        return state_to_arrayrecord(self.eval_state()), metrics


class HoldsReplies(AdapterStrategy):
    """A rule that needs every reply of the round at once: it holds them until the last.

    Subclasses implement :meth:`aggregate_states`; memory grows with the number of clients
    (their factors, not dense matrices).
    """

    def start_aggregation(self, server_round: int) -> None:
        """Start holding this round's replies."""
        self._held: tuple[list[AdapterState], list[float], list[int]] = ([], [], [])

    def fold(self, server_round: int, state: AdapterState, weight: float, node_id: int) -> None:
        """Hold the reply until the round's last."""
        states, weights, node_ids = self._held
        states.append(HeldState(state))
        weights.append(weight)
        node_ids.append(node_id)

    def finish_aggregation(self, server_round: int) -> None:
        """Apply the rule to every held reply, then let them go."""
        states, weights, node_ids = self._held
        self._held = ([], [], [])
        self.aggregate_states(server_round, states, weights, node_ids)

    def aggregate_states(
        self,
        server_round: int,
        states: list[AdapterState],
        weights: list[float],
        node_ids: list[int],
    ) -> None:
        """The rule, on the round's replies (each subclass implements it)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement aggregate_states")


class HeldState(dict):
    """A reply's adapter state that a strategy holds for itself until the round's end.

    :func:`lora_factors` drops each module's factors from it once the rule has read them,
    so a rule's result (FLoRA's stacked factors, FedEx-LoRA's residual) replaces the held
    factors module by module instead of adding to them.
    """


def instruct(
    train: str, send: str | None = None, personal: str = "", **extra: str | int | float
) -> dict[str, str | int | float]:
    """Build client instructions for the ConfigRecord.

    Comma-separated factors to train, to send back (default: the trained ones) and to
    keep locally, plus strategy-specific entries (``alpha_mode`` becomes ``alpha-mode``).
    """
    return {
        records.TRAIN_FACTORS: train,
        records.SEND_FACTORS: train if send is None else send,
        records.PERSONAL_FACTORS: personal,
        **{key.replace("_", "-"): value for key, value in extra.items()},
    }


def lora_factors(
    states: list[AdapterState],
) -> Iterator[tuple[str, str, str, list[torch.Tensor], list[torch.Tensor]]]:
    """Yield (module, A key, B key, every client's B, every client's A) per adapted module.

    The factors come in float64, so the rules' sums are exact to double precision. States
    the strategy holds for itself (:class:`HeldState`) lose each module's factors once the
    caller has taken the next module (or stopped).
    """
    for module, (a_key, b_key) in lora_pairs(list(states[0])).items():
        yield (
            module,
            a_key,
            b_key,
            [s[b_key].double() for s in states],
            [s[a_key].double() for s in states],
        )
        held = [state for state in states if isinstance(state, HeldState)]
        for state in held:
            del state[a_key], state[b_key]
        if held:
            give_back_free_memory()  # else the freed factors stay in the heap, unused


def select(state: AdapterState, factors: set[str]) -> AdapterState:
    """The tensors of ``state`` that belong to the given factors."""
    return {k: v for k, v in state.items() if factor_of(k) in factors}


def weighted_average(states: list[AdapterState], weights: list[float]) -> AdapterState:
    """Example-weighted mean of same-keyed, same-shaped states (FedAvg on each tensor)."""
    sums = WeightedSums()
    for state, weight in zip(states, weights, strict=True):
        sums.add(state, weight)
    return sums.mean()
