"""Run a federation from a scenario on any Flower Grid, in named steps.

:func:`run_federation` reads top-down: prepare the output folder (or its checkpoint), load
the server's model, connect the nodes (:mod:`fedpeft.server.nodes`), build the Grid stack
the strategy talks to, run the rounds with a :class:`RoundRecorder` logging, checkpointing
and evaluating each one, then write the outputs (:mod:`fedpeft.server.outputs`).
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpeft import records
from fedpeft.adapters import base_model_tensors, fold_base_delta, set_adapter_state, set_trainable
from fedpeft.codecs import (
    arrayrecord_to_state,
    payload_nbytes,
    state_to_arrayrecord,
    tensors_nbytes,
)
from fedpeft.config import Scenario, ScenarioError
from fedpeft.data import client_train_size, eval_split, load_task_data
from fedpeft.evaluation.multiple_choice import load_benchmark, metric_name, score_benchmark
from fedpeft.models import cached_peft_model, initial_adapter_state, load_processor, resolve_device
from fedpeft.report import RoundLog, console
from fedpeft.server.checkpoint import (
    CHECKPOINT,
    STATE_DIRS,
    Checkpoint,
    Progress,
    load_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from fedpeft.server.compression import CodecGrid
from fedpeft.server.grid import CountingGrid
from fedpeft.server.nodes import connect_nodes
from fedpeft.server.outputs import ADAPTER_DIR, run_summary, save_final_adapter, write_outputs
from fedpeft.server.privacy import PrivacyGrid
from fedpeft.server.reliability import ExampleBound, FaultyGrid, ServerCrash, ValidatingGrid
from fedpeft.server.rounds import PHASES, run_rounds
from fedpeft.server.secagg import SecAggGrid
from fedpeft.strategies import build_strategy
from fedpeft.strategies.adapter_strategy import AdapterStrategy
from fedpeft.tracking import Trackers
from fedpeft.train import evaluate, round_learning_rate


def default_out_dir(scenario: Scenario) -> Path:
    """``runs/<scenario>-<timestamp>/`` under the current folder."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{scenario.name}-{stamp}"


def server_side(scenario: Scenario, device: torch.device) -> Scenario:
    """The scenario as the server builds its own model: unquantized where it has no CUDA.

    Clients may load their base in 4 or 8 bits (``model.quantization``, CUDA only); the
    server only evaluates and exports the adapter, whose tensors are the same either way,
    so a CPU-only SuperLink machine loads the base in full precision.
    """
    if scenario.model.quantization == "none" or device.type == "cuda":
        return scenario
    console.print(
        f"[yellow]the server has no CUDA device: it evaluates on an unquantized base "
        f"(clients load theirs in {scenario.model.quantization})[/]"
    )
    model = dataclasses.replace(scenario.model, quantization="none")
    return dataclasses.replace(scenario, model=model)


def new_run_tag() -> int:
    """A new run's tag for the client state store (from the OS: seeded RNGs stay as they are).

    Its top bit is fixed, so every tag serializes to the same number of bytes: byte counts
    stay reproducible.
    """
    return (1 << 61) | int.from_bytes(os.urandom(8), "little") >> 3


def example_bound(scenario: Scenario, engine: str) -> ExampleBound:
    """The most examples a training reply may claim (see :class:`ExampleBound`).

    Outside a deployment every client serves its partition of the scenario's data set,
    which the server can size; a deployed node may bring its own data.
    """
    if engine == "deployment":
        if scenario.train.epochs and not scenario.federation.max_examples:
            raise ScenarioError(
                "train.epochs in a deployment needs federation.max_examples: the server cannot "
                "size a node's own data, so nothing else bounds the examples a reply may claim"
            )
        return ExampleBound(scenario)
    return ExampleBound(scenario, lambda pid: client_train_size(scenario.data, scenario.seed, pid))


def seed_everything(seed: int) -> None:
    """Seed the RNGs the server uses (Flower samples clients with ``random``)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_out_dir(out_dir: Path, resume: bool) -> Checkpoint | None:
    """The checkpoint to carry on from, or None: then the folder is cleared for a new run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        return load_checkpoint(out_dir)
    (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    # a new run starts every client afresh: no personal state from an earlier run here
    for name in (*STATE_DIRS, CHECKPOINT, f"{CHECKPOINT}.old"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    return None


@dataclass
class ServerModel:
    """The server's copy of the global model: what it evaluates and exports."""

    scenario: Scenario  #: as the server builds it (:func:`server_side`)
    model: torch.nn.Module
    processor: Any  #: tokenizer or image preparation
    device: torch.device
    test: Any  #: the held-out split
    num_labels: int
    label_names: list[str] | None
    reference: dict[str, torch.Tensor]  #: the initial adapter state
    initial: ArrayRecord  #: the same, as sent in round 1

    @classmethod
    def load(cls, scenario: Scenario) -> ServerModel:
        """Load data, model and processor; under heterogeneous ranks, at the largest rank.

        The order is the one every earlier run used: some steps draw from the seeded RNGs
        (Flower samples clients from ``random``), so reordering them changes a run.
        """
        data = load_task_data(scenario.data)
        test = eval_split(scenario.data)
        device = resolve_device(scenario.model.device)
        local = server_side(scenario, device)
        server_peft = scenario.peft_for_rank(scenario.max_rank)
        model = cached_peft_model(local.model, server_peft, data.num_labels, scenario.seed)
        set_trainable(model, None)
        model.to(device)
        processor = load_processor(scenario.model)  # tokenizer or image preparation
        reference = initial_adapter_state(local.model, server_peft, data.num_labels, scenario.seed)
        return cls(
            scenario=local,
            model=model,
            processor=processor,
            device=device,
            test=test,
            num_labels=data.num_labels,
            label_names=data.label_names,
            reference=reference,
            initial=state_to_arrayrecord(reference),
        )

    def evaluate(
        self, scenario: Scenario, arrays: ArrayRecord, base_delta: Any
    ) -> dict[str, float]:
        """Evaluate ``arrays`` (and a strategy's base-weight change) on the held-out split."""
        fold_base_delta(self.model, base_delta)
        set_adapter_state(self.model, arrayrecord_to_state(arrays))
        return evaluate(
            self.model, scenario, self.test, processor=self.processor, device=self.device
        )


@dataclass
class GridStack:
    """The layers the strategy talks to, outermost first.

    [central DP] -> validation -> [lost instructions (faults)] -> [SecAgg+] -> [codec]
    -> byte counting -> Flower's Grid. Layers in brackets exist only when configured.
    """

    counting: CountingGrid
    codec: CodecGrid | None
    validating: ValidatingGrid
    private: PrivacyGrid | None

    @property
    def top(self) -> Grid:
        """The outermost layer: the Grid the strategy is given."""
        return self.private or self.validating

    @classmethod
    def build(
        cls,
        counting: CountingGrid,
        scenario: Scenario,
        engine: str,
        reference: dict[str, torch.Tensor],
        out_dir: Path,
    ) -> GridStack:
        """Wrap ``counting`` in the layers ``scenario`` asks for."""
        copies = out_dir / "server_state" / "copies"  # what each node holds (downlink deltas)
        codec = (
            CodecGrid(counting, scenario.compression, copies, scenario.seed)
            if scenario.compression.enabled
            else None
        )
        inner: Grid = codec or counting
        if scenario.privacy.secure_aggregation:
            inner = SecAggGrid(inner, counting, scenario)
        if scenario.faults.drop_rate > 0:
            inner = FaultyGrid(inner, counting, scenario)
        validating = ValidatingGrid(
            inner, counting, reference, scenario, example_bound(scenario, engine)
        )
        private = (
            PrivacyGrid(validating, scenario, counting.partitions)
            if scenario.privacy.dp != "none"
            else None
        )
        return cls(counting, codec, validating, private)


class RoundRecorder:
    """Flower's per-round callbacks: evaluate and log each round, checkpoint after it.

    Holds the round clock, the metrics log and the progress a resumed run carries on from.
    """

    def __init__(
        self,
        out_dir: Path,
        scenario: Scenario,
        server: ServerModel,
        stack: GridStack,
        strategy: Strategy,
        checkpoint: Checkpoint | None,
        started: float,
    ) -> None:
        self.out_dir, self.scenario, self.server = out_dir, scenario, server
        self.stack, self.strategy, self.resumed = stack, strategy, checkpoint is not None
        self.started = started  #: when the command's run began (for wall_seconds)
        self.round_started = self.phase_started = time.perf_counter()
        #: seconds of each rounds.PHASES since the last row (so a round's checkpoint is next's)
        self.phases: dict[str, float] = {}
        self.trackers = (
            Trackers(scenario.report, out_dir, scenario.to_dict())
            if scenario.report.tensorboard or scenario.report.wandb != "off"
            else None
        )
        self.log = RoundLog(out_dir, scenario.federation.rounds, trackers=self.trackers)
        #: read before round 1, so a benchmark that cannot load stops the run at once
        self.benchmarks = [
            load_benchmark(n, scenario.eval.questions) for n in scenario.eval.benchmarks
        ]
        keys = [metric_name(n) for n in scenario.eval.benchmarks]
        if len(set(keys)) < len(keys):
            raise ScenarioError(
                f"eval.benchmarks={scenario.eval.benchmarks} gives two of them the same "
                f"metrics.jsonl key ({', '.join(keys)}); rename a file"
            )
        self.initial_metrics: dict[str, float] = {}
        self.done = checkpoint.progress if checkpoint else Progress(0, new_run_tag(), [], {}, 0.0)
        if checkpoint is not None:
            self.log.restore(self.done.rows)  # metrics.jsonl loses rounds past the checkpoint
            self.initial_metrics.update(self.done.initial_metrics)
            if stack.private is not None:
                stack.private.restore(self.done.privacy)
            console.print(f"[bold]resuming[/] {out_dir} after round {self.done.round}")

    def close(self) -> None:
        """Finish the trackers' runs (TensorBoard, W&B) once the outputs are written."""
        if self.trackers is not None:
            self.trackers.close()

    def train_config(self) -> ConfigRecord:
        """What every instruction carries: the scenario, the client state folder, the run's tag."""
        state_dir = self.out_dir / "client_state"  # per-client state of this run
        return ConfigRecord(
            {
                records.SCENARIO: self.scenario.to_json(),
                records.STATE_DIR: str(state_dir.resolve()),
                records.RUN_TAG: self.done.run_tag,
            }
        )

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Evaluate the global arrays; after a training round, log its row."""
        base_delta = getattr(self.strategy, "base_delta", {})
        metrics = self.server.evaluate(self.scenario, arrays, base_delta)
        self.phase_end("evaluate")
        if server_round == 0:
            self.initial_metrics.update(metrics)
            if self.trackers is not None:
                self.trackers.log(0, dict(metrics))
            console.print(
                f"round 0  eval_accuracy {metrics['eval_accuracy']:.4f} (initial adapter)"
            )
        else:
            scores = self.benchmark_scores(server_round)
            metrics.update({metric_name(name): r["accuracy"] for name, r in scores.items()})
            row = self.round_row(server_round, metrics)
            self.log.append({**row, "benchmarks": scores} if scores else row)
        return MetricRecord(dict(metrics.items()))

    def phase_end(self, name: str) -> None:
        """Add the seconds since the last phase ended to ``name``'s (rounds.PHASES)."""
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.phase_started
        self.phase_started = now

    def benchmark_scores(self, server_round: int) -> dict[str, dict[str, Any]]:
        """``eval.benchmarks`` scored on the global model after this round, if they run now.

        They run after the last round, and every ``eval.every`` rounds when that is set.
        """
        ev, rounds = self.scenario.eval, self.scenario.federation.rounds
        if not self.benchmarks or not (
            server_round == rounds or (ev.every and server_round % ev.every == 0)
        ):
            return {}
        scores = {}
        for bench in self.benchmarks:
            scores[bench.name] = score_benchmark(
                self.server.model,
                self.server.processor,
                bench,
                few_shot=ev.few_shot,
                chat_template=ev.chat_template,
                batch_size=self.scenario.train.eval_batch_size,
                device=self.server.device,
            )
            got = scores[bench.name]
            console.print(
                f"round {server_round}  {bench.name} accuracy {got['accuracy']:.4f} "
                f"on {got['questions']} questions"
            )
        return scores

    def round_row(self, server_round: int, metrics: dict[str, float]) -> dict[str, Any]:
        """metrics.jsonl's row for a round: metrics, failures, rejections, bytes, time."""
        traffic = self.stack.counting.take()
        codec, private = self.stack.codec, self.stack.private
        plain_up, plain_down = codec.take() if codec else (traffic.bytes_up, traffic.bytes_down)
        now = time.perf_counter()
        seconds, self.round_started = now - self.round_started, now
        return {
            "round": server_round,
            "strategy": self.scenario.strategy.name,
            "train_loss": traffic.train_loss,
            "lr": self.round_lr(server_round, traffic.clients),
            **metrics,
            **traffic.personal_metrics,
            "clients_sampled": traffic.clients_sampled,
            "clients_failed": traffic.clients_failed,
            "failures": traffic.failures,
            "updates_rejected": len(traffic.rejections),
            "rejections": traffic.rejections,
            "aggregated": traffic.not_aggregated is None,
            **({"epsilon": private.epsilon()} if private else {}),
            "bytes_up": traffic.bytes_up,
            "bytes_down": traffic.bytes_down,
            "bytes_up_uncompressed": plain_up,
            "bytes_down_uncompressed": plain_down,
            "round_seconds": seconds,
            "phase_seconds": self.take_phases(),
            "client_metrics": traffic.clients,
        }

    def take_phases(self) -> dict[str, float]:
        """The seconds of each phase since the last row (benchmark scoring in "evaluate")."""
        self.phase_end("evaluate")  # the benchmarks scored after the central evaluation
        return {name: round(self.phases.pop(name, 0.0), 3) for name in PHASES}

    def round_lr(self, server_round: int, clients: list[dict[str, float | str]]) -> float | None:
        """The learning rate of the round's first step.

        Under train.epochs each client runs its own number of steps: the mean of theirs.
        """
        t = self.scenario.train
        if not t.epochs:
            return round_learning_rate(t, server_round, self.scenario.federation.rounds)
        rates = [float(c[records.LEARNING_RATE]) for c in clients if records.LEARNING_RATE in c]
        return sum(rates) / len(rates) if rates else None

    def wall_seconds(self) -> float:
        """The run's wall time over every attempt so far."""
        return self.done.wall_seconds + time.perf_counter() - self.started

    def round_end(self, server_round: int, arrays: ArrayRecord) -> None:
        """Checkpoint after the round: arrays, strategy, metrics, RNG states, privacy books."""
        private = self.stack.private
        progress = Progress(
            round=server_round,
            run_tag=self.done.run_tag,
            rows=self.log.rows,
            initial_metrics=self.initial_metrics,
            wall_seconds=self.wall_seconds(),
            privacy=private.books() if private else {},
            rng=rng_states(),
            resumed_after=self.done.resumed_after,
        )
        save_checkpoint(self.out_dir, self.scenario, arrays, self.strategy, progress)

    def replies_in(self, server_round: int) -> None:
        """The injected server crash (``faults.server_crash_round``), on a run's first attempt."""
        if server_round == self.scenario.faults.server_crash_round and not self.resumed:
            raise ServerCrash(
                f"faults.server_crash_round={server_round}: the server crashed mid-round "
                f"(injected); carry on with: fedpeft run --resume {self.out_dir}"
            )


def run_federation(
    grid: Grid,
    scenario: Scenario,
    out_dir: Path,
    engine: str = "simulation",
    *,
    secure: bool = False,
    resume: bool = False,
    command: str = "",
) -> dict[str, Any]:
    """Run every round of ``scenario`` on ``grid`` and write the run's outputs to ``out_dir``.

    ``secure`` is recorded in summary.json: a deployment with TLS and node authentication.
    With ``resume``, the run carries on from ``out_dir``'s checkpoint (its own scenario,
    strategy, RNG states, client state and metrics) at the round after it. ``command``,
    the command line that started the run, goes into the adapter's model card.
    """
    started = time.perf_counter()
    checkpoint = prepare_out_dir(out_dir, resume)
    scenario = checkpoint.scenario if checkpoint else scenario
    seed_everything(scenario.seed)
    server = ServerModel.load(scenario)
    strategy = checkpoint.strategy if checkpoint else build_strategy(scenario)
    if isinstance(strategy, AdapterStrategy):  # node ids are new in every attempt
        strategy.node_ranks.clear()
        strategy.last_trained = []
    counting = connect_nodes(grid, scenario, engine, strategy)
    stack = GridStack.build(counting, scenario, engine, server.reference, out_dir)
    recorder = RoundRecorder(out_dir, scenario, server, stack, strategy, checkpoint, started)
    console.print(
        f"[bold]fedpeft[/] {scenario.name}: {scenario.peft.label} on {scenario.model.name}, "
        f"{scenario.strategy.name}, {scenario.federation.rounds} rounds x "
        f"{scenario.federation.clients_per_round}/{scenario.data.num_clients} clients -> {out_dir}"
    )
    train_config = recorder.train_config()
    if checkpoint is not None:
        recorder.done.resumed_after.append(recorder.done.round)
        set_rng_states(recorder.done.rng)  # last: nothing above may draw from them
    recorder.round_started = recorder.phase_started = rounds_started = time.perf_counter()
    final = run_rounds(
        strategy,
        stack.top,
        checkpoint.arrays if checkpoint else server.initial,
        first_round=recorder.done.round + 1,
        last_round=scenario.federation.rounds,
        timeout=scenario.federation.round_timeout,
        train_config=train_config,
        evaluate_config=ConfigRecord(dict(train_config)),
        evaluate_fn=recorder.evaluate,
        round_end=recorder.round_end,
        replies_in=recorder.replies_in,
        phase_end=recorder.phase_end,
    )
    rounds_seconds = time.perf_counter() - rounds_started
    set_adapter_state(server.model, arrayrecord_to_state(final))
    where = out_dir / ADAPTER_DIR
    save_final_adapter(strategy, server.model, server.scenario, server.num_labels, where)
    summary = run_summary(
        scenario,
        recorder.log.rows,
        recorder.initial_metrics,
        server.model,
        engine=engine,
        secure=secure,
        resumed_after_rounds=recorder.done.resumed_after,
        wall_seconds=recorder.wall_seconds(),
        adapter_bytes=payload_nbytes(server.initial),
        full_model_bytes=tensors_nbytes(base_model_tensors(server.model)),
        epsilon=stack.private.epsilon() if stack.private else None,
        eval_examples=len(server.test),
        label_names=server.label_names,
    )
    rows = recorder.log.rows
    write_outputs(out_dir, scenario, summary, rows, command=command, rounds_seconds=rounds_seconds)
    recorder.close()  # after a failure: TensorBoard flushed each round, W&B ends at exit
    return summary
