"""Scenario dataclasses, TOML loading, ``--set`` overrides and validation.

A scenario is a flat recipe (see ``scenarios/*.toml``). Every key has a default and a
one-line help text; an unknown key, a value of the wrong type or out of range raises
:class:`ScenarioError` with one sentence that names the key and what is accepted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin


class ScenarioError(ValueError):
    """A user mistake in a scenario: the message is one line meant for the user."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    """Declare a dataclass field with a default and a one-line help text."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help, **kw})


def _need(ok: bool, key: str, accepted: str, value: Any) -> None:
    if not ok:
        raise ScenarioError(f"invalid value {value!r} for '{key}': expected {accepted}")


@dataclass
class ModelConfig:
    """Which base model to fine-tune, and for which task."""

    name: str = _f(
        "minilm", "bundled alias (minilm, tiny-bert, tiny-llama, tiny-vit), hub id or local path"
    )
    task: Literal["seq-cls", "causal-lm", "image-cls"] = _f(
        "seq-cls", "seq-cls (text classes), causal-lm (instruction tuning), image-cls"
    )
    device: str = _f("auto", "auto, cpu, cuda, cuda:N or mps")
    quantization: Literal["none", "4bit", "8bit"] = _f(
        "none", "load pretrained base weights in 4-bit (QLoRA, nf4) or 8-bit: CUDA + bitsandbytes"
    )
    gradient_checkpointing: bool = _f(
        False, "recompute the base model's activations in the backward pass: less memory, slower"
    )

    def __post_init__(self) -> None:
        _need(bool(self.name), "model.name", "a model alias, hub id or path", self.name)
        _need(
            self.device == "auto" or self.device.split(":")[0] in {"cpu", "cuda", "mps"},
            "model.device",
            "auto, cpu, cuda, cuda:N or mps",
            self.device,
        )


@dataclass
class PeftSection:
    """Which parameter-efficient method to train, and its hyper-parameters."""

    method: str | list[str] = _f(
        "lora", "PEFT method (see `fedpeft list`), or a list of methods combined on one model"
    )
    r: int = _f(
        8, "rank of low-rank methods; bottleneck width of `adapter`; AdaLoRA's initial rank"
    )
    alpha: float = _f(16.0, "LoRA scaling numerator: alpha / r, or alpha / sqrt(r) with use_rslora")
    dropout: float = _f(0.0, "dropout on the LoRA input")
    target_modules: list[str] = _f(
        [], "module names to adapt; empty = peft's default for the model"
    )
    client_ranks: list[int] = _f([], "LoRA rank per client, cycled over clients; empty = all use r")
    use_rslora: bool = _f(False, "LoRA: rank-stabilised scaling alpha / sqrt(r)")
    init: Literal["default", "gaussian", "orthogonal"] = _f(
        "default", "LoRA init: default (A Kaiming, B zero), gaussian or orthogonal"
    )
    adalora_target_r: int = _f(4, "AdaLoRA: average rank per matrix left after the budget schedule")
    feedforward_modules: list[str] = _f(
        [], "IA3: the target modules that are feed-forward layers (scaled on their input)"
    )
    num_virtual_tokens: int = _f(8, "prompt_tuning, prefix_tuning, p_tuning: virtual tokens")
    encoder_hidden_size: int = _f(64, "p_tuning: hidden size of the prompt encoder MLP")
    adapter_modules: list[str] = _f(
        [], "adapter: modules after which a bottleneck sits; empty = attention and FFN outputs"
    )
    sparse_fraction: float = _f(0.01, "sparse: share of each target matrix's entries trained")
    sparse_selection: Literal["random", "magnitude"] = _f(
        "random", "sparse: mask from the seed (random) or the largest base weights (magnitude)"
    )

    @property
    def methods(self) -> list[str]:
        """The method names, a single method as a one-element list."""
        return [self.method] if isinstance(self.method, str) else list(self.method)

    @property
    def label(self) -> str:
        """The method as one short string (``lora+bitfit`` for a hybrid)."""
        return "+".join(self.methods)

    def __post_init__(self) -> None:
        _need(
            bool(self.methods) and len(set(self.methods)) == len(self.methods),
            "peft.method",
            "a method name or a list of distinct method names",
            self.method,
        )
        _need(self.r >= 1, "peft.r", "an integer >= 1", self.r)
        _need(
            "adalora" not in self.methods or 1 <= self.adalora_target_r <= self.r,
            "peft.adalora_target_r",
            f"an integer in [1, peft.r={self.r}]",
            self.adalora_target_r,
        )
        _need(
            self.num_virtual_tokens >= 1,
            "peft.num_virtual_tokens",
            "an integer >= 1",
            self.num_virtual_tokens,
        )
        _need(
            self.encoder_hidden_size >= 1,
            "peft.encoder_hidden_size",
            "an integer >= 1",
            self.encoder_hidden_size,
        )
        _need(
            0 < self.sparse_fraction <= 1,
            "peft.sparse_fraction",
            "a number in (0, 1]",
            self.sparse_fraction,
        )
        _need(
            all(r >= 1 for r in self.client_ranks),
            "peft.client_ranks",
            "a list of integers >= 1",
            self.client_ranks,
        )
        _need(self.alpha > 0, "peft.alpha", "a number > 0", self.alpha)
        _need(0.0 <= self.dropout < 1.0, "peft.dropout", "a number in [0, 1)", self.dropout)


@dataclass
class DataConfig:
    """Which data set, and how it is split over the clients."""

    name: str = _f(
        "wordnet-supersense", "bundled data set, hub id, or local csv/jsonl/parquet file"
    )
    text_column: str = _f("text", "text column (causal-lm: the instruction) of a local or hub set")
    label_column: str = _f("label", "label column of a local or hub data set")
    response_column: str = _f("response", "causal-lm: the response column of a local or hub set")
    image_column: str = _f("image", "image-cls: the image column of a local or hub data set")
    test_fraction: float = _f(0.1, "held-out share for sets without a test split (fixed seed)")
    eval_examples: int = _f(0, "evaluate on the first N held-out examples; 0 = all of them")
    max_length: int = _f(64, "tokens kept per example")
    partitioner: Literal["iid", "dirichlet", "pathological"] = _f(
        "iid", "how the training split is divided among clients"
    )
    alpha: float = _f(0.5, "Dirichlet concentration (smaller = more skewed)")
    classes_per_client: int = _f(2, "classes per client for the pathological partitioner")
    num_clients: int = _f(10, "number of clients (virtual SuperNodes in simulation)")
    client_holdout: float = _f(
        0.1, "share of each client's data kept for its personalised evaluation"
    )

    def __post_init__(self) -> None:
        _need(bool(self.name), "data.name", "a data set name or path", self.name)
        _need(self.num_clients >= 1, "data.num_clients", "an integer >= 1", self.num_clients)
        _need(self.alpha > 0, "data.alpha", "a number > 0", self.alpha)
        _need(
            self.classes_per_client >= 1,
            "data.classes_per_client",
            "an integer >= 1",
            self.classes_per_client,
        )
        _need(
            0 < self.test_fraction < 1,
            "data.test_fraction",
            "a number in (0, 1)",
            self.test_fraction,
        )
        _need(self.eval_examples >= 0, "data.eval_examples", "an integer >= 0", self.eval_examples)
        _need(
            0 <= self.client_holdout < 1,
            "data.client_holdout",
            "a number in [0, 1)",
            self.client_holdout,
        )
        _need(self.max_length >= 4, "data.max_length", "an integer >= 4", self.max_length)


@dataclass
class FederationConfig:
    """How many rounds, and how many clients take part in each."""

    rounds: int = _f(5, "federated rounds")
    clients_per_round: int = _f(5, "clients sampled for training each round")
    round_timeout: float = _f(3600.0, "seconds to wait for client replies in a round")
    min_fit_clients: int = _f(
        1, "fewest valid training replies a round aggregates; with fewer the global stays"
    )
    max_update_norm: float = _f(
        0.0, "reject an update whose L2 distance from what its client was sent is larger; 0 = off"
    )
    clip_update_norm: float = _f(
        0.0, "scale each update's change from what its client was sent to at most this; 0 = off"
    )
    max_examples: int = _f(
        0, "most examples a training reply may claim; 0 = train.local_steps x train.batch_size"
    )

    def __post_init__(self) -> None:
        _need(self.rounds >= 1, "federation.rounds", "an integer >= 1", self.rounds)
        _need(
            self.max_examples >= 0,
            "federation.max_examples",
            "an integer >= 0 (0 = train.local_steps x train.batch_size)",
            self.max_examples,
        )
        _need(
            self.min_fit_clients >= 1,
            "federation.min_fit_clients",
            "an integer >= 1",
            self.min_fit_clients,
        )
        _need(
            self.clip_update_norm >= 0,
            "federation.clip_update_norm",
            "a number >= 0 (0 = no clipping)",
            self.clip_update_norm,
        )
        _need(
            self.max_update_norm >= 0,
            "federation.max_update_norm",
            "a number >= 0 (0 = no bound)",
            self.max_update_norm,
        )
        _need(
            self.clients_per_round >= 1,
            "federation.clients_per_round",
            "an integer >= 1",
            self.clients_per_round,
        )
        _need(self.round_timeout > 0, "federation.round_timeout", "seconds > 0", self.round_timeout)


@dataclass
class StrategySection:
    """Server-side aggregation strategy and its knobs."""

    name: str = _f("fedavg", "aggregation strategy (see `fedpeft list`)")
    proximal_mu: float = _f(0.01, "FedProx proximal weight mu")
    trim_beta: float = _f(0.2, "fedtrimmedavg: share cut from each tail, per coordinate")
    server_lr: float = _f(1e-2, "server learning rate eta (FedAdam, FedYogi, FedAdagrad)")
    momentum_lr: float = _f(1.0, "server learning rate of FedAvgM (1.0 = plain averaged step)")
    server_momentum: float = _f(0.9, "server momentum (FedAvgM)")
    beta_1: float = _f(0.9, "first-moment decay (FedAdam, FedYogi)")
    beta_2: float = _f(0.99, "second-moment decay (FedAdam, FedYogi)")
    tau: float = _f(1e-3, "adaptivity epsilon (FedAdam, FedYogi, FedAdagrad)")
    hetlora_gamma: float = _f(1e-3, "HetLoRA rank self-pruning regulariser weight (0 = off)")
    hetlora_prune_threshold: float = _f(
        0.1, "HetLoRA: prune the rank tail when its norm is below this share of the head's"
    )
    hetlora_weighting: Literal["norm", "examples_norm"] = _f(
        "norm", "HetLoRA: weight clients by ||B_i A_i||_F (norm: the paper) or by examples x it"
    )
    svd_split: Literal["left", "sqrt"] = _f(
        "left", "FlexLoRA: factors B = U S, A = V^T (left: the authors' code) or sqrt(S) in both"
    )
    personal_head: bool = _f(
        True, "FedSA-LoRA: each client keeps its own task head (the authors' code), not averaged"
    )

    def __post_init__(self) -> None:
        _need(self.proximal_mu >= 0, "strategy.proximal_mu", "a number >= 0", self.proximal_mu)
        _need(self.server_lr > 0, "strategy.server_lr", "a number > 0", self.server_lr)
        _need(self.momentum_lr > 0, "strategy.momentum_lr", "a number > 0", self.momentum_lr)
        for key in ("server_momentum", "beta_1", "beta_2"):
            value = getattr(self, key)
            _need(0 <= value < 1, f"strategy.{key}", "a number in [0, 1)", value)
        _need(self.tau > 0, "strategy.tau", "a number > 0", self.tau)
        _need(
            self.hetlora_gamma >= 0, "strategy.hetlora_gamma", "a number >= 0", self.hetlora_gamma
        )
        _need(
            self.hetlora_prune_threshold >= 0,
            "strategy.hetlora_prune_threshold",
            "a number >= 0",
            self.hetlora_prune_threshold,
        )
        _need(
            0 <= self.trim_beta < 0.5, "strategy.trim_beta", "a share in [0, 0.5)", self.trim_beta
        )


@dataclass
class TrainConfig:
    """Local training on each client, and central evaluation on the server."""

    local_steps: int = _f(10, "optimizer steps per client per round")
    batch_size: int = _f(16, "training batch size")
    lr: float = _f(2e-3, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(0.0, "clip gradients to this norm; 0 = no clipping")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f(
        "auto", "autocast of the forward pass: auto (bf16 on CUDA if supported), fp32, bf16, fp16"
    )
    eval_batch_size: int = _f(64, "batch size for evaluation")
    eval_generate: int = _f(
        16, "causal-lm: exact-match of greedy generation on the first N held-out examples"
    )
    max_new_tokens: int = _f(32, "causal-lm: tokens generated per example for exact-match")

    def __post_init__(self) -> None:
        _need(self.local_steps >= 1, "train.local_steps", "an integer >= 1", self.local_steps)
        _need(self.batch_size >= 1, "train.batch_size", "an integer >= 1", self.batch_size)
        _need(self.lr > 0, "train.lr", "a number > 0", self.lr)
        _need(self.weight_decay >= 0, "train.weight_decay", "a number >= 0", self.weight_decay)
        _need(self.max_grad_norm >= 0, "train.max_grad_norm", "a number >= 0", self.max_grad_norm)
        _need(
            self.eval_batch_size >= 1,
            "train.eval_batch_size",
            "an integer >= 1",
            self.eval_batch_size,
        )
        _need(self.eval_generate >= 0, "train.eval_generate", "an integer >= 0", self.eval_generate)
        _need(
            self.max_new_tokens >= 1, "train.max_new_tokens", "an integer >= 1", self.max_new_tokens
        )


@dataclass
class SimulationConfig:
    """Resources of each virtual client in Flower's Simulation Engine (Ray)."""

    cpus_per_client: int = _f(1, "CPU cores reserved per virtual client (integer, as in Flower)")
    gpus_per_client: float = _f(0.0, "GPU share per virtual client; fractions share one card")
    ray_address: str = _f(
        "", "a running Ray cluster to join (HOST:PORT or auto); empty: a local Ray for the run"
    )
    dashboard: bool = _f(
        False, "start Ray's dashboard (http://127.0.0.1:8265; needs ray[default]) with a local Ray"
    )

    def __post_init__(self) -> None:
        _need(
            self.cpus_per_client >= 1,
            "simulation.cpus_per_client",
            "an integer >= 1",
            self.cpus_per_client,
        )
        _need(
            self.gpus_per_client >= 0,
            "simulation.gpus_per_client",
            "a number >= 0",
            self.gpus_per_client,
        )
        _need(
            not (self.dashboard and self.ray_address),
            "simulation.dashboard",
            "false with simulation.ray_address (a joined cluster has its own dashboard)",
            self.dashboard,
        )


@dataclass
class CompressionConfig:
    """How adapter updates are coded on the wire (see docs/compression.md)."""

    uplink: list[str] = _f(
        [], 'client -> server stages, in order: [] (none), "topk", then fp16|bf16|int8|int4'
    )
    downlink: list[str] = _f([], "server -> client stages (same names; topk needs downlink_delta)")
    topk_fraction: float = _f(0.1, "topk: share of the update's entries kept (largest |x|)")
    topk_scope: Literal["global", "tensor"] = _f(
        "global", "topk: keep that share of the whole update (one threshold), or of each tensor"
    )
    topk_score: Literal["loss", "magnitude"] = _f(
        "loss",
        "uplink topk ranks entries by |change x mean local gradient| (their first-order effect "
        "on the client's loss; magnitude under dp='local') or by |change|",
    )
    quant_granularity: Literal["tensor", "row"] = _f(
        "tensor", "int8/int4: one scale per tensor, or one per row"
    )
    stochastic_rounding: bool = _f(False, "int8/int4: unbiased stochastic rounding")
    error_feedback: bool = _f(
        False, "each client keeps what uplink compression dropped and adds it to its next update"
    )
    downlink_delta: bool = _f(
        False, "send a client the change since the adapter it last received (full when it has none)"
    )

    def __post_init__(self) -> None:
        from fedpeft.codecs.compression import CodecError, check_stages

        for direction in ("uplink", "downlink"):
            try:
                check_stages(getattr(self, direction), f"compression.{direction}")
                self.pipeline(direction)  # checks topk_fraction and the other settings
            except CodecError as exc:
                raise ScenarioError(str(exc)) from None
        if self.stochastic_rounding and not (
            self.quantises("uplink") or self.quantises("downlink")
        ):
            raise ScenarioError(
                "compression.stochastic_rounding needs an int8 or int4 stage in uplink or downlink"
            )
        if self.error_feedback and not self.uplink:
            raise ScenarioError(
                "compression.error_feedback needs a lossy uplink (e.g. uplink = "
                '["topk", "int8"]); with uplink = [] nothing is dropped'
            )
        if "topk" in self.downlink and not self.downlink_delta:
            raise ScenarioError(
                "compression.downlink topk needs downlink_delta = true: top-k of the whole "
                "adapter would zero most of it; top-k of the change since the client's copy "
                "converges"
            )

    def quantises(self, direction: str) -> bool:
        """Whether ``uplink`` or ``downlink`` has an int8 or int4 stage."""
        return any(s in ("int8", "int4") for s in getattr(self, direction))

    @property
    def enabled(self) -> bool:
        """Whether any payload is coded (otherwise plain ArrayRecords travel)."""
        return bool(self.uplink or self.downlink or self.downlink_delta)

    def scores_by_gradient(self, privacy: PrivacySection) -> bool:
        """Whether uplink top-k ranks by ``|change x gradient|`` (clients track gradients).

        Not under local DP: a mask chosen from raw gradients would reveal more than the
        noised update does, so there top-k ranks the noised change by magnitude.
        """
        return "topk" in self.uplink and self.topk_score == "loss" and privacy.dp != "local"

    def pipeline(self, direction: str) -> Any:
        """The :class:`fedpeft.codecs.compression.Pipeline` of ``uplink`` or ``downlink``."""
        from fedpeft.codecs.compression import Pipeline

        return Pipeline(
            tuple(getattr(self, direction)),
            self.topk_fraction,
            self.quant_granularity,
            self.stochastic_rounding and self.quantises(direction),
            self.topk_scope,
        )


@dataclass
class FaultsConfig:
    """Injected failures, for simulations and tests (docs/reliability.md).

    Each is drawn per (seed, round, client), so a run's failures are reproducible.
    """

    drop_rate: float = _f(0.0, "share of training instructions lost: the client never answers")
    crash_rate: float = _f(0.0, "share of training calls whose ClientApp raises")
    slow_rate: float = _f(0.0, "share of training calls that first sleep slow_seconds")
    slow_seconds: float = _f(5.0, "how long a slow client sleeps (past round_timeout: it is late)")
    nan_rate: float = _f(0.0, "share of training replies whose update holds NaN")
    poison: Literal["none", "scale", "sign_flip", "inflate_examples"] = _f(
        "none",
        "what poison_clients do: scale or flip their change, or inflate their example count",
    )
    poison_scale: float = _f(
        10.0, "the change x this (scale), x -this (sign_flip); the example count x this (inflate)"
    )
    poison_clients: list[int] = _f([], "partition ids of the poisoning clients")
    server_crash_round: int = _f(
        0, "the server crashes once, mid-round, in this round (0: never); --resume carries on"
    )

    def __post_init__(self) -> None:
        for key in ("drop_rate", "crash_rate", "slow_rate", "nan_rate"):
            value = getattr(self, key)
            _need(0 <= value <= 1, f"faults.{key}", "a share in [0, 1]", value)
        _need(
            self.server_crash_round >= 0,
            "faults.server_crash_round",
            "a round >= 0 (0: never)",
            self.server_crash_round,
        )
        _need(self.slow_seconds >= 0, "faults.slow_seconds", "seconds >= 0", self.slow_seconds)
        _need(self.poison_scale > 0, "faults.poison_scale", "a number > 0", self.poison_scale)
        _need(
            self.poison == "none" or bool(self.poison_clients),
            "faults.poison_clients",
            "the partition ids that poison (faults.poison is set)",
            self.poison_clients,
        )

    @property
    def enabled(self) -> bool:
        """Whether any failure is injected."""
        rates = (self.drop_rate, self.crash_rate, self.slow_rate, self.nan_rate)
        return any(rates) or self.poison != "none"


@dataclass
class PrivacySection:
    """Differential privacy of client updates (docs/privacy.md)."""

    dp: Literal["none", "central", "local"] = _f(
        "none",
        "central: the server clips each update and adds Gaussian noise to the aggregate; "
        "local: each client clips and noises its own update",
    )
    noise_multiplier: float = _f(1.0, "Gaussian noise std in units of clipping_norm")
    clipping_norm: float = _f(0.1, "L2 bound on each client's update (change from what it got)")
    delta: float = _f(1e-5, "delta at which epsilon is reported (RDP accountant)")
    secure_aggregation: bool = _f(
        False, "SecAgg+ (Flower's protocol): the server learns only the sum of the updates"
    )
    secagg_shares: float = _f(
        1.0, "SecAgg+: share of the round's clients each one shares its keys with (1.0: all)"
    )
    secagg_threshold: float = _f(
        0.5, "SecAgg+: share of those shares that can rebuild a secret (dropout tolerance)"
    )
    secagg_clipping_range: float = _f(
        8.0, "SecAgg+: each value of an update (change) is clipped to +-this, then quantized"
    )

    def __post_init__(self) -> None:
        _need(
            self.noise_multiplier > 0,
            "privacy.noise_multiplier",
            "a number > 0",
            self.noise_multiplier,
        )
        _need(self.clipping_norm > 0, "privacy.clipping_norm", "a number > 0", self.clipping_norm)
        _need(0 < self.delta < 1, "privacy.delta", "a number in (0, 1)", self.delta)
        for key in ("secagg_shares", "secagg_threshold"):
            value = getattr(self, key)
            _need(0 < value <= 1, f"privacy.{key}", "a share in (0, 1]", value)
        _need(
            self.secagg_clipping_range > 0,
            "privacy.secagg_clipping_range",
            "a number > 0",
            self.secagg_clipping_range,
        )


@dataclass
class Scenario:
    """One federated fine-tuning experiment, fully resolved."""

    name: str = _f("scenario", "short name, used in the output folder")
    seed: int = _f(0, "seed for data split, initial adapter, sampling and local training")
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftSection = field(default_factory=PeftSection)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategySection = field(default_factory=StrategySection)
    train: TrainConfig = field(default_factory=TrainConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    privacy: PrivacySection = field(default_factory=PrivacySection)

    def __post_init__(self) -> None:
        _need(
            self.federation.clients_per_round <= self.data.num_clients,
            "federation.clients_per_round",
            f"at most data.num_clients ({self.data.num_clients})",
            self.federation.clients_per_round,
        )
        _need(
            self.federation.min_fit_clients <= self.federation.clients_per_round,
            "federation.min_fit_clients",
            f"at most federation.clients_per_round ({self.federation.clients_per_round})",
            self.federation.min_fit_clients,
        )

    def peft_for_rank(self, rank: int) -> PeftSection:
        """The PEFT section of a client (or server model) of LoRA rank ``rank``.

        Peft's scaling is then its own at that rank (``alpha / rank``, or ``alpha /
        sqrt(rank)`` with rsLoRA); HetLoRA's clients share one scaling instead
        (``fedpeft.clients.app.client_peft``).
        """
        return dataclasses.replace(self.peft, r=rank, client_ranks=[])

    def rank_of(self, partition_id: int) -> int:
        """LoRA rank of client ``partition_id``: ``peft.client_ranks`` cycled, else ``peft.r``."""
        ranks = self.peft.client_ranks
        return ranks[partition_id % len(ranks)] if ranks else self.peft.r

    @property
    def heterogeneous_ranks(self) -> bool:
        """Whether clients train adapters of different ranks."""
        return len(set(self.peft.client_ranks)) > 1

    @property
    def max_rank(self) -> int:
        """The largest client rank (the server's evaluation rank under heterogeneous ranks)."""
        return max(self.peft.client_ranks or [self.peft.r])

    def to_dict(self) -> dict[str, Any]:
        """Return the scenario as plain nested dicts (TOML/JSON friendly)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Return the scenario as one JSON string (travels in Flower run-config and messages)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Scenario:
        """Build and validate a scenario from nested dicts; raise ScenarioError on mistakes."""
        return typing.cast(Scenario, _build(cls, raw, prefix=""))

    @classmethod
    def from_json(cls, text: str) -> Scenario:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return {
        int: "an integer",
        float: "a finite number",
        str: "a string",
        bool: "true or false",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _coerce(key, value, option)
            except ScenarioError:
                continue
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(f"{key}[{i}]", v, get_args(tp)[0]) for i, v in enumerate(value)]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # no setting means anything with inf or nan: refuse them here, once for every key
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is type(None):
        if value is None:
            return value
    raise ScenarioError(f"invalid value {value!r} for '{key}': expected {_type_name(tp)}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    section = prefix.rstrip(".") or "scenario"
    if not isinstance(raw, dict):
        raise ScenarioError(f"'{section}' must be a table of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ScenarioError(
            f"unknown key '{prefix}{unknown[0]}'; accepted keys in [{section}]: "
            + ", ".join(sorted(fields))
        )
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(typing.cast(type, tp), value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, tp)
    return cls(**kwargs)


# ---------------------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one ``--set KEY=VALUE``; VALUE is a TOML value, else a plain string."""
    if "=" not in item:
        raise ScenarioError(f"--set expects KEY=VALUE (e.g. train.lr=1e-3), got {item!r}")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ScenarioError(f"--set has an empty key in {item!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with every ``KEY=VALUE`` override applied."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ScenarioError(f"--set {'.'.join(path)}: '{part}' is not a table")
            node = child
        node[path[-1]] = value
    return raw


def read_toml(path: Path) -> dict[str, Any]:
    """Read a scenario file; a missing or malformed file raises ScenarioError."""
    if not path.is_file():
        raise ScenarioError(f"scenario file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"{path} is not valid TOML: {err}") from None


def resolve_scenario_path(name_or_path: str) -> Path:
    """Map a scenario argument to a file: a path that exists, or a bundled scenario name."""
    from fedpeft import scenarios  # bundled recipes live in the top-level `scenarios` package

    path = Path(name_or_path)
    if path.suffix == ".toml" or "/" in name_or_path:
        if not path.is_file():
            raise ScenarioError(f"scenario file not found: {name_or_path}")
        return path
    bundled = scenarios.bundled()
    if name_or_path in bundled:
        return bundled[name_or_path]
    raise ScenarioError(
        f"unknown scenario {name_or_path!r}: not a .toml file and not a bundled scenario "
        f"(bundled: {', '.join(sorted(bundled))})"
    )


def load_scenario(name_or_path: str, overrides: list[str] | None = None) -> Scenario:
    """Load a scenario file or bundled name, apply ``--set`` overrides and validate."""
    path = resolve_scenario_path(name_or_path)
    raw = apply_overrides(read_toml(path), overrides or [])
    raw.setdefault("name", path.stem)
    return Scenario.from_dict(raw)


def help_lines(cls: type = Scenario, prefix: str = "") -> list[str]:
    """Return ``key = default  # help`` lines for every scenario key (used by docs)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(help_lines(typing.cast(type, tp), f"{prefix}{f.name}."))
        else:
            factory = typing.cast(Any, f.default_factory)
            default = f.default if f.default is not dataclasses.MISSING else factory()
            lines.append(f"{prefix}{f.name} = {default!r}  # {f.metadata.get('help', '')}")
    return lines
