"""The whole recipe: one :class:`Scenario` of every section, and its rules across sections."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from fedpeft.config.coercion import build
from fedpeft.config.fields import need, setting
from fedpeft.config.schema import (
    GENERATIVE_TASKS,
    CompressionSection,
    DataSection,
    EvalSection,
    FaultsSection,
    FederationSection,
    ModelSection,
    PeftSection,
    PrivacySection,
    ReportSection,
    SimulationSection,
    StrategySection,
    TrainSection,
)


@dataclass
class Scenario:
    """One federated fine-tuning experiment, fully resolved."""

    name: str = setting("scenario", "short name, used in the output folder")
    seed: int = setting(0, "seed for data split, initial adapter, sampling and local training")
    model: ModelSection = field(default_factory=ModelSection)
    peft: PeftSection = field(default_factory=PeftSection)
    data: DataSection = field(default_factory=DataSection)
    federation: FederationSection = field(default_factory=FederationSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    train: TrainSection = field(default_factory=TrainSection)
    simulation: SimulationSection = field(default_factory=SimulationSection)
    compression: CompressionSection = field(default_factory=CompressionSection)
    faults: FaultsSection = field(default_factory=FaultsSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    report: ReportSection = field(default_factory=ReportSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self) -> None:
        need(
            self.federation.clients_per_round <= self.data.num_clients,
            "federation.clients_per_round",
            f"at most data.num_clients ({self.data.num_clients})",
            self.federation.clients_per_round,
        )
        need(
            not (self.train.epochs and self.privacy.secure_aggregation)
            or self.federation.max_examples > 0,
            "federation.max_examples",
            "a positive bound with train.epochs under privacy.secure_aggregation (SecAgg+ "
            "bounds every weight before it sees one, and epochs make it depend on the data)",
            self.federation.max_examples,
        )
        need(
            self.federation.min_fit_clients <= self.federation.clients_per_round,
            "federation.min_fit_clients",
            f"at most federation.clients_per_round ({self.federation.clients_per_round})",
            self.federation.min_fit_clients,
        )
        need(
            self.simulation.engine != "in-process" or not self.faults.slow_rate,
            "faults.slow_rate",
            '0 with simulation.engine="in-process" (one process has no round timeout to miss)',
            self.faults.slow_rate,
        )
        need(
            not self.eval.benchmarks or self.model.task in GENERATIVE_TASKS,
            "eval.benchmarks",
            f"[] unless model.task is one of {', '.join(GENERATIVE_TASKS)} (a benchmark "
            "scores a language model's answers)",
            self.eval.benchmarks,
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
        return typing.cast(Scenario, build(cls, raw, prefix=""))

    @classmethod
    def from_json(cls, text: str) -> Scenario:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))
