"""The scenario's sections: one dataclass per TOML table, each key with a default and help.

Numeric bounds are declared on the field (``setting(8, "...", ge=1)``) and checked by
:func:`fedpeft.config.fields.check_bounds`; a section's ``__post_init__`` keeps only the
rules that tie several keys together.

Longer than 500 lines on purpose: this file is the reference of every scenario key, read
top to bottom in the order of a scenario file; split, a reader would hunt for a table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from fedpeft.config.fields import ScenarioError, Section, need, setting

SHARE: dict[str, Any] = {"ge": 0, "le": 1, "noun": "a share"}  # a rate in [0, 1]
#: tasks whose model is a language model that writes text (benchmarks score them)
GENERATIVE_TASKS = ("causal-lm", "dpo")
#: how a data set's rows are laid out (data.format)
RowFormat = Literal["auto", "prompt-completion", "alpaca", "messages", "sharegpt", "preference"]


@dataclass
class ModelSection(Section, table="model"):
    """Which base model to fine-tune, and for which task."""

    name: str = setting(
        "minilm", "bundled alias (minilm, tiny-bert, tiny-llama, tiny-vit), hub id or local path"
    )
    task: Literal["seq-cls", "causal-lm", "dpo", "image-cls"] = setting(
        "seq-cls",
        "seq-cls (text classes), causal-lm (instruction tuning), dpo (preference tuning), "
        "image-cls",
    )
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps")
    quantization: Literal["none", "4bit", "8bit"] = setting(
        "none", "load pretrained base weights in 4-bit (QLoRA, nf4) or 8-bit: CUDA + bitsandbytes"
    )
    gradient_checkpointing: bool = setting(
        False, "recompute the base model's activations in the backward pass: less memory, slower"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        need(bool(self.name), "model.name", "a model alias, hub id or path", self.name)
        need(
            self.device == "auto" or self.device.split(":")[0] in {"cpu", "cuda", "mps"},
            "model.device",
            "auto, cpu, cuda, cuda:N or mps",
            self.device,
        )


@dataclass
class PeftSection(Section, table="peft"):
    """Which parameter-efficient method to train, and its hyper-parameters."""

    method: str | list[str] = setting(
        "lora", "PEFT method (see `fedpeft list`), or a list of methods combined on one model"
    )
    r: int = setting(
        8, "rank of low-rank methods; bottleneck width of `adapter`; AdaLoRA's initial rank", ge=1
    )
    alpha: float = setting(
        16.0, "LoRA scaling numerator: alpha / r, or alpha / sqrt(r) with use_rslora", gt=0
    )
    dropout: float = setting(0.0, "dropout on the LoRA input", ge=0, lt=1)
    target_modules: list[str] = setting(
        [], "module names to adapt; empty = peft's default for the model"
    )
    client_ranks: list[int] = setting(
        [], "LoRA rank per client, cycled over clients; empty = all use r", ge=1
    )
    use_rslora: bool = setting(False, "LoRA: rank-stabilised scaling alpha / sqrt(r)")
    init: Literal["default", "gaussian", "orthogonal"] = setting(
        "default", "LoRA init: default (A Kaiming, B zero), gaussian or orthogonal"
    )
    adalora_target_r: int = setting(
        4, "AdaLoRA: average rank per matrix left after the budget schedule"
    )
    feedforward_modules: list[str] = setting(
        [], "IA3: the target modules that are feed-forward layers (scaled on their input)"
    )
    num_virtual_tokens: int = setting(
        8, "prompt_tuning, prefix_tuning, p_tuning: virtual tokens", ge=1
    )
    encoder_hidden_size: int = setting(64, "p_tuning: hidden size of the prompt encoder MLP", ge=1)
    adapter_modules: list[str] = setting(
        [], "adapter: modules after which a bottleneck sits; empty = attention and FFN outputs"
    )
    sparse_fraction: float = setting(
        0.01, "sparse: share of each target matrix's entries trained", gt=0, le=1
    )
    sparse_selection: Literal["random", "magnitude"] = setting(
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
        need(
            bool(self.methods) and len(set(self.methods)) == len(self.methods),
            "peft.method",
            "a method name or a list of distinct method names",
            self.method,
        )
        super().__post_init__()
        need(
            "adalora" not in self.methods or 1 <= self.adalora_target_r <= self.r,
            "peft.adalora_target_r",
            f"an integer in [1, peft.r={self.r}]",
            self.adalora_target_r,
        )


@dataclass
class DataSection(Section, table="data"):
    """Which data set, and how it is split over the clients."""

    name: str = setting(
        "wordnet-supersense", "bundled data set, hub id, or local csv/jsonl/parquet file"
    )
    text_column: str = setting(
        "text", "text column (causal-lm: the instruction) of a local or hub set"
    )
    label_column: str = setting("label", "label column of a local or hub data set")
    response_column: str = setting(
        "response", "causal-lm: the response column of a local or hub set"
    )
    image_column: str = setting("image", "image-cls: the image column of a local or hub data set")
    format: RowFormat = setting(
        "auto",
        "causal-lm rows: prompt-completion (text_column, response_column), alpaca "
        "(instruction, input, output), messages (role/content turns), sharegpt "
        "(conversations: from/value); dpo rows: preference (a prompt, chosen and rejected); "
        "auto: preference where chosen and rejected are columns, else text_column if "
        "present, else the first format whose columns are there",
    )
    test_fraction: float = setting(
        0.1, "held-out share for sets without a test split (fixed seed)", gt=0, lt=1
    )
    eval_examples: int = setting(
        0, "evaluate on the first N held-out examples; 0 = all of them", ge=0
    )
    max_length: int = setting(64, "tokens kept per example", ge=4)
    partitioner: Literal["iid", "dirichlet", "pathological"] = setting(
        "iid", "how the training split is divided among clients"
    )
    alpha: float = setting(0.5, "Dirichlet concentration (smaller = more skewed)", gt=0)
    classes_per_client: int = setting(
        2, "classes per client for the pathological partitioner", ge=1
    )
    num_clients: int = setting(10, "number of clients (virtual SuperNodes in simulation)", ge=1)
    client_holdout: float = setting(
        0.1, "share of each client's data kept for its personalised evaluation", ge=0, lt=1
    )
    client_eval_examples: int = setting(
        0, "personalised evaluation on each client's first N held-out examples; 0 = all", ge=0
    )

    def __post_init__(self) -> None:
        need(bool(self.name), "data.name", "a data set name or path", self.name)
        super().__post_init__()


@dataclass
class FederationSection(Section, table="federation"):
    """How many rounds, and how many clients take part in each."""

    rounds: int = setting(5, "federated rounds", ge=1)
    clients_per_round: int = setting(5, "clients sampled for training each round", ge=1)
    round_timeout: float = setting(
        3600.0, "seconds to wait for client replies in a round", gt=0, noun="seconds"
    )
    min_fit_clients: int = setting(
        1, "fewest valid training replies a round aggregates; with fewer the global stays", ge=1
    )
    max_update_norm: float = setting(
        0.0,
        "reject an update whose L2 distance from what its client was sent is larger; 0 = off",
        ge=0,
        note="0 = no bound",
    )
    clip_update_norm: float = setting(
        0.0,
        "scale each update's change from what its client was sent to at most this; 0 = off",
        ge=0,
        note="0 = no clipping",
    )
    max_examples: int = setting(
        0,
        "most examples a training reply may claim; 0 = the batches of a round x batch_size",
        ge=0,
        note="0 = train.local_steps x train.grad_accum_steps x train.batch_size",
    )
    server_device: str = setting(
        "model",
        "where the server aggregates: model (as model.device), auto, cpu, cuda or cuda:N",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        need(
            self.server_device in {"model", "auto"}
            or self.server_device.split(":")[0] in {"cpu", "cuda"},
            "federation.server_device",
            "model, auto, cpu, cuda or cuda:N",
            self.server_device,
        )


@dataclass
class StrategySection(Section, table="strategy"):
    """Server-side aggregation strategy and its knobs."""

    name: str = setting("fedavg", "aggregation strategy (see `fedpeft list`)")
    proximal_mu: float = setting(0.01, "FedProx proximal weight mu", ge=0)
    trim_beta: float = setting(
        0.2, "fedtrimmedavg: share cut from each tail, per coordinate", ge=0, lt=0.5, noun="a share"
    )
    server_lr: float = setting(
        1e-2, "server learning rate eta (FedAdam, FedYogi, FedAdagrad)", gt=0
    )
    momentum_lr: float = setting(
        1.0, "server learning rate of FedAvgM (1.0 = plain averaged step)", gt=0
    )
    server_momentum: float = setting(0.9, "server momentum (FedAvgM)", ge=0, lt=1)
    beta_1: float = setting(0.9, "first-moment decay (FedAdam, FedYogi)", ge=0, lt=1)
    beta_2: float = setting(0.99, "second-moment decay (FedAdam, FedYogi)", ge=0, lt=1)
    tau: float = setting(1e-3, "adaptivity epsilon (FedAdam, FedYogi, FedAdagrad)", gt=0)
    hetlora_gamma: float = setting(
        1e-3, "HetLoRA rank self-pruning regulariser weight (0 = off)", ge=0
    )
    hetlora_prune_threshold: float = setting(
        0.1, "HetLoRA: prune the rank tail when its norm is below this share of the head's", ge=0
    )
    hetlora_weighting: Literal["norm", "examples_norm"] = setting(
        "norm", "HetLoRA: weight clients by ||B_i A_i||_F (norm: the paper) or by examples x it"
    )
    svd_split: Literal["left", "sqrt"] = setting(
        "left", "FlexLoRA: factors B = U S, A = V^T (left: the authors' code) or sqrt(S) in both"
    )
    personal_head: bool = setting(
        True, "FedSA-LoRA: each client keeps its own task head (the authors' code), not averaged"
    )
    flexlora_svd: Literal["auto", "exact", "randomized", "streaming"] = setting(
        "auto",
        "FlexLoRA: top singular triplets exactly (factored QR + SVD), by a randomised range "
        "finder (many clients), by a streaming SVD folded as replies arrive (flat memory, "
        "for hundreds of large clients), or auto: exact or randomised, whichever is "
        "cheaper, while the round's factors fit in 1 GiB, streaming beyond",
    )


@dataclass
class TrainSection(Section, table="train"):
    """Local training on each client, and central evaluation on the server."""

    local_steps: int = setting(10, "optimizer steps per client per round", ge=1)
    epochs: float = setting(
        0.0,
        "passes over each client's training data per round, instead of local_steps "
        "(0 = use local_steps)",
        ge=0,
    )
    batch_size: int = setting(16, "training batch size", ge=1)
    grad_accum_steps: int = setting(
        1, "batches whose gradients add up to one optimizer step (effective batch = product)", ge=1
    )
    lr: float = setting(2e-3, "AdamW learning rate (the peak, with a schedule)", gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = setting(
        "constant",
        "learning rate over the whole federation's steps: constant, linear or cosine decay to "
        "min_lr (round r continues where round r-1 stopped)",
    )
    warmup_steps: int = setting(
        0, "optimizer steps of linear warm-up from 0 to lr, counted over the federation", ge=0
    )
    min_lr: float = setting(0.0, "linear, cosine: the learning rate at the last step", ge=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = setting(0.0, "clip gradients to this norm; 0 = no clipping", ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = setting(
        "auto", "autocast of the forward pass: auto (bf16 on CUDA if supported), fp32, bf16, fp16"
    )
    eval_batch_size: int = setting(64, "batch size for evaluation", ge=1)
    eval_generate: int = setting(
        16, "causal-lm: exact-match of greedy generation on the first N held-out examples", ge=0
    )
    max_new_tokens: int = setting(
        32, "causal-lm: tokens generated per example for exact-match", ge=1
    )
    dpo_beta: float = setting(
        0.1, "dpo: beta, how strongly the loss holds the model near its reference", gt=0
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        accepted = f"a number <= train.lr={self.lr:g}"
        need(self.min_lr <= self.lr, "train.min_lr", accepted, self.min_lr)

    def steps_for(self, size: int) -> int:
        """Optimizer steps a client with ``size`` training examples runs in a round.

        ``local_steps``; with ``epochs``, as many as ``epochs`` passes over its data take
        (a pass is ``ceil(size / batch_size)`` batches, ``grad_accum_steps`` to a step).
        """
        if not self.epochs:
            return self.local_steps
        batches = math.ceil(self.epochs * math.ceil(size / self.batch_size))
        return max(1, math.ceil(batches / self.grad_accum_steps))

    def batches_for(self, size: int) -> int:
        """Batches a client with ``size`` training examples draws in a round."""
        return self.steps_for(size) * self.grad_accum_steps

    @property
    def batches_per_round(self) -> int | None:
        """Batches every client draws in a round; None with ``epochs`` (it depends on size)."""
        return None if self.epochs else self.local_steps * self.grad_accum_steps


@dataclass
class SimulationSection(Section, table="simulation"):
    """Resources of each virtual client in Flower's Simulation Engine (Ray)."""

    engine: Literal["ray", "in-process"] = setting(
        "ray",
        "ray: Flower's Simulation Engine; in-process: every client in this one process, one "
        "after another (no Ray: quick to start, debuggers work; no round timeout)",
    )
    cpus_per_client: int = setting(
        1, "CPU cores reserved per virtual client (integer, as in Flower)", ge=1
    )
    gpus_per_client: float = setting(
        0.0, "GPU share per virtual client; fractions share one card", ge=0
    )
    ray_address: str = setting(
        "", "a running Ray cluster to join (HOST:PORT or auto); empty: a local Ray for the run"
    )
    dashboard: bool = setting(
        False, "start Ray's dashboard (http://127.0.0.1:8265; needs ray[default]) with a local Ray"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        need(
            not (self.dashboard and self.ray_address),
            "simulation.dashboard",
            "false with simulation.ray_address (a joined cluster has its own dashboard)",
            self.dashboard,
        )
        if self.engine == "in-process":
            need(
                not self.ray_address,
                "simulation.ray_address",
                'empty with simulation.engine="in-process" (no Ray runs)',
                self.ray_address,
            )
            need(
                not self.dashboard,
                "simulation.dashboard",
                'false with simulation.engine="in-process" (no Ray runs)',
                self.dashboard,
            )


@dataclass
class CompressionSection(Section, table="compression"):
    """How adapter updates are coded on the wire (see docs/compression.md)."""

    uplink: list[str] = setting(
        [], 'client -> server stages, in order: [] (none), "topk", then fp16|bf16|int8|int4'
    )
    downlink: list[str] = setting(
        [], "server -> client stages (same names; topk needs downlink_delta)"
    )
    topk_fraction: float = setting(0.1, "topk: share of the update's entries kept (largest |x|)")
    topk_scope: Literal["global", "tensor"] = setting(
        "global", "topk: keep that share of the whole update (one threshold), or of each tensor"
    )
    topk_score: Literal["loss", "magnitude"] = setting(
        "loss",
        "uplink topk ranks entries by |change x mean local gradient| (their first-order effect "
        "on the client's loss; magnitude under dp='local') or by |change|",
    )
    quant_granularity: Literal["tensor", "row"] = setting(
        "tensor", "int8/int4: one scale per tensor, or one per row"
    )
    stochastic_rounding: bool = setting(False, "int8/int4: unbiased stochastic rounding")
    error_feedback: bool = setting(
        False, "each client keeps what uplink compression dropped and adds it to its next update"
    )
    downlink_delta: bool = setting(
        False, "send a client the change since the adapter it last received (full when it has none)"
    )

    def __post_init__(self) -> None:
        # imported here: fedpeft.codecs loads torch and Flower, which `import fedpeft.config`
        # (the CLI's start, scenario docs) does without; and its adapters import this package
        from fedpeft.codecs.compression import CodecError, check_stages

        super().__post_init__()
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
        from fedpeft.codecs.compression import Pipeline  # lazy: torch, see __post_init__

        return Pipeline(
            tuple(getattr(self, direction)),
            self.topk_fraction,
            self.quant_granularity,
            self.stochastic_rounding and self.quantises(direction),
            self.topk_scope,
        )


@dataclass
class FaultsSection(Section, table="faults"):
    """Injected failures, for simulations and tests (docs/reliability.md).

    Each is drawn per (seed, round, client), so a run's failures are reproducible.
    """

    drop_rate: float = setting(
        0.0, "share of training instructions lost: the client never answers", **SHARE
    )
    crash_rate: float = setting(0.0, "share of training calls whose ClientApp raises", **SHARE)
    slow_rate: float = setting(
        0.0, "share of training calls that first sleep slow_seconds", **SHARE
    )
    slow_seconds: float = setting(
        5.0, "how long a slow client sleeps (past round_timeout: it is late)", ge=0, noun="seconds"
    )
    nan_rate: float = setting(0.0, "share of training replies whose update holds NaN", **SHARE)
    poison: Literal["none", "scale", "sign_flip", "inflate_examples"] = setting(
        "none",
        "what poison_clients do: scale or flip their change, or inflate their example count",
    )
    poison_scale: float = setting(
        10.0,
        "the change x this (scale), x -this (sign_flip); the example count x this (inflate)",
        gt=0,
    )
    poison_clients: list[int] = setting([], "partition ids of the poisoning clients")
    server_crash_round: int = setting(
        0,
        "the server crashes once, mid-round, in this round (0: never); --resume carries on",
        ge=0,
        noun="a round",
        note="0: never",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        need(
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
class PrivacySection(Section, table="privacy"):
    """Differential privacy of client updates (docs/privacy.md)."""

    dp: Literal["none", "central", "local"] = setting(
        "none",
        "central: the server clips each update and adds Gaussian noise to the aggregate; "
        "local: each client clips and noises its own update",
    )
    noise_multiplier: float = setting(1.0, "Gaussian noise std in units of clipping_norm", gt=0)
    clipping_norm: float = setting(
        0.1, "L2 bound on each client's update (change from what it got)", gt=0
    )
    delta: float = setting(1e-5, "delta at which epsilon is reported (RDP accountant)", gt=0, lt=1)
    secure_aggregation: bool = setting(
        False, "SecAgg+ (Flower's protocol): the server learns only the sum of the updates"
    )
    secagg_shares: float = setting(
        1.0,
        "SecAgg+: share of the round's clients each one shares its keys with (1.0: all)",
        gt=0,
        le=1,
        noun="a share",
    )
    secagg_threshold: float = setting(
        0.5,
        "SecAgg+: share of those shares that can rebuild a secret (dropout tolerance)",
        gt=0,
        le=1,
        noun="a share",
    )
    secagg_clipping_range: float = setting(
        8.0, "SecAgg+: each value of an update (change) is clipped to +-this, then quantized", gt=0
    )


@dataclass
class ReportSection(Section, table="report"):
    """Where each round's metrics go besides metrics.jsonl (``pip install 'fedpeft[tracking]'``)."""

    tensorboard: bool = setting(False, "TensorBoard event files under OUT/tb/, a scalar per metric")
    wandb: Literal["off", "offline", "online"] = setting(
        "off", "Weights & Biases: off, offline (a run folder under OUT/wandb/) or online"
    )
    wandb_project: str = setting("fedpeft", "W&B project")
    wandb_run_name: str = setting("", "W&B run name; empty: the output folder's name")


@dataclass
class EvalSection(Section, table="eval"):
    """Benchmarks the server scores the global adapter on (causal-lm and dpo tasks)."""

    benchmarks: list[str] = setting(
        [],
        "multiple-choice benchmarks scored after the last round: wordnet-mc (bundled), a "
        "local csv/jsonl/parquet file or a hub id such as cais/mmlu:all",
    )
    every: int = setting(
        0, "also score the benchmarks every N rounds (0 = after the last round only)", ge=0
    )
    questions: int = setting(0, "score each benchmark's first N questions (0 = all)", ge=0)
    few_shot: int = setting(0, "solved examples written before each question", ge=0)
    chat_template: bool = setting(
        False, "write each question as a user turn of the tokenizer's chat template"
    )
