"""Run a federation from a scenario on any Flower Grid: build, run rounds, write outputs."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpeft import records
from fedpeft.adapters import (
    base_model_tensors,
    count_trainable,
    fold_base_delta,
    save_adapter,
    set_adapter_state,
    set_trainable,
)
from fedpeft.codecs import (
    arrayrecord_to_state,
    payload_nbytes,
    state_to_arrayrecord,
    tensors_nbytes,
)
from fedpeft.config import Scenario, ScenarioError
from fedpeft.data import client_train_size, eval_split, load_task_data, partition_summary
from fedpeft.methods import get_method
from fedpeft.models import (
    cached_peft_model,
    describe_base,
    initial_adapter_state,
    load_processor,
    resolve_device,
    total_params,
)
from fedpeft.report import (
    SUMMARY_FILE,
    RoundLog,
    console,
    model_card,
    plot_run,
    step,
    write_json_atomic,
)
from fedpeft.server.checkpoint import (
    CHECKPOINT,
    STATE_DIRS,
    Progress,
    load_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from fedpeft.server.compression import CodecGrid
from fedpeft.server.grid import CountingGrid, PollingGrid
from fedpeft.server.privacy import PrivacyGrid
from fedpeft.server.reliability import ExampleBound, FaultyGrid, ServerCrash, ValidatingGrid
from fedpeft.server.rounds import run_rounds
from fedpeft.server.secagg import SecAggGrid
from fedpeft.strategies import build_strategy
from fedpeft.strategies.adapter_strategy import AdapterStrategy
from fedpeft.train import evaluate

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


def default_out_dir(scenario: Scenario) -> Path:
    """``runs/<scenario>-<timestamp>/`` under the current folder."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{scenario.name}-{stamp}"


def eval_data_record(scenario: Scenario, examples: int) -> dict[str, Any]:
    """Where the held-out examples come from, so a user can re-evaluate without fedpeft."""
    from fedpeft.data import BUNDLED, bundled_path

    path = str(bundled_path(scenario.data.name)) if scenario.data.name in BUNDLED else None
    return {
        "name": scenario.data.name,
        "path": path,  # datasets.load_from_disk(path)[split]
        "split": "test",
        "examples": examples,  # the first N examples of that split
        "max_length": scenario.data.max_length,
    }


def save_final_adapter(
    strategy: Strategy, model: torch.nn.Module, scenario: Scenario, num_labels: int, where: Path
) -> None:
    """Save the final global adapter (see :func:`fedpeft.adapters.save_adapter` for formats).

    A strategy that changed the base weights (FLoRA, FedEx-LoRA) exports an adapter that
    carries the change too; it is saved from a fresh copy of the untouched base model. The
    saved config keeps the scenario's ``use_rslora``: the export's ``lora_alpha`` is the one
    that gives its tensors their scaling under it (``fedpeft.lora.lora_alpha_for``).
    """
    if not isinstance(strategy, AdapterStrategy):
        save_adapter(model, where)
        return
    state, rank, alpha = strategy.export()
    server_peft = scenario.peft_for_rank(scenario.max_rank)
    if (rank, alpha) == (server_peft.r, server_peft.alpha) and not strategy.base_delta:
        set_adapter_state(model, state)
        save_adapter(model, where)
        return
    export_peft = dataclasses.replace(server_peft, r=rank, alpha=alpha)
    fresh = cached_peft_model(scenario.model, export_peft, num_labels, scenario.seed)
    set_adapter_state(fresh, state)
    save_adapter(fresh, where)


def write_model_card(
    where: Path, summary: dict[str, Any], scenario: Scenario, command: str
) -> None:
    """Replace peft's empty model card in the adapter folder with this run's own."""
    peft_format = (where / "adapter_config.json").is_file()
    card = model_card(summary, describe_base(scenario.model.name), command, where, peft_format)
    (where / "README.md").write_text(card, encoding="utf-8")


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


def discover_nodes(
    grid: CountingGrid, scenario: Scenario, strategy: Strategy, guess: dict[int, int] | None = None
) -> None:
    """Learn every connected node's partition and rank before round 1.

    Node ids are random per run; knowing each node's partition lets the seeded sampler
    pick the same clients in every run, and lets heterogeneous-rank strategies send each
    node its own rank from the first round. Each node is asked (a query message), unless
    ``guess`` gives the partitions (:func:`simulated_partitions`): then 8 nodes spread
    over it are asked, and any disagreement falls back to asking every node.
    """
    config = ConfigRecord({records.SCENARIO: scenario.to_json()})
    answers: dict[int, tuple[int, int]] = {}  # node -> (partition, rank)
    if guess:
        nodes = list(guess)
        probes = sorted({nodes[round(i * (len(nodes) - 1) / 7)] for i in range(8)})
        answers = _ask(grid, config, scenario.federation.round_timeout, probes)
        if all(answers.get(n, (None,))[0] == guess[n] for n in probes):
            answers |= {n: (p, scenario.rank_of(p)) for n, p in guess.items() if n not in answers}
        else:
            logger.warning("node partitions differ from Flower's registration order; asking all")
            guess = None
    if not guess:
        answers = _ask(grid, config, scenario.federation.round_timeout, grid.get_node_ids())
    for node, (partition, rank) in answers.items():
        grid.partitions[node] = partition
        if rank != scenario.max_rank and not getattr(strategy, "heterogeneous_ranks", False):
            raise ScenarioError(
                f"node {node} (partition {partition}) trains LoRA rank {rank}, but "
                f"strategy.name={scenario.strategy.name!r} needs every client at rank "
                f"{scenario.max_rank}; use flora, flexlora or hetlora, or drop the node's rank"
            )
        if isinstance(strategy, AdapterStrategy):
            strategy.node_ranks[node] = rank
    grid.take()  # discovery traffic is not a training round's


def simulated_partitions(grid: Grid) -> dict[int, int] | None:
    """Node id -> partition id in Flower's Simulation Engine, without asking the nodes.

    The engine registers node i for partition i, in order, and its in-memory state keeps
    its nodes in that order. Asking 10,000 virtual nodes instead takes minutes, because
    Flower's in-memory state scans every pending message for every node. None where the
    order cannot be read (any other Grid or state); :func:`discover_nodes` checks a guess.
    """
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    registered = getattr(getattr(grid, "state", None), "nodes", None)
    if not isinstance(grid, InMemoryGrid) or not isinstance(registered, dict):
        return None
    live = set(grid.get_node_ids())
    order = [node for node in registered if node in live]
    return {node: i for i, node in enumerate(order)} if len(order) == len(live) else None


def _ask(
    grid: Grid, config: ConfigRecord, timeout: float, nodes: Iterable[int]
) -> dict[int, tuple[int, int]]:
    """Each answering node's (partition, rank), asked in batches."""
    answers = {}
    for reply in _ask_in_batches(grid, config, timeout, list(nodes)):
        if not reply.has_error():
            metrics = reply.content.metric_records[records.METRICS]
            partition = int(str(metrics[records.PARTITION_ID]))
            rank = int(str(metrics[records.CLIENT_RANK]))
            answers[reply.metadata.src_node_id] = (partition, rank)
    return answers


def _ask_in_batches(
    grid: Grid, config: ConfigRecord, timeout: float, nodes: list[int], batch: int = 256
) -> Iterator[Message]:
    """Query ``nodes``, ``batch`` at a time.

    Flower's in-memory state scans every pending message on each delivery, so one query to
    10,000 nodes at once would take quadratic time.
    """
    for start in range(0, len(nodes), batch):
        messages = [
            Message(
                RecordDict({records.CONFIG: config}), dst_node_id=n, message_type=MessageType.QUERY
            )
            for n in nodes[start : start + batch]
        ]
        yield from grid.send_and_receive(messages, timeout=timeout)


def check_node_count(grid: Grid, scenario: Scenario, wait_s: float = 300.0) -> None:
    """In simulation every virtual node must match the data split.

    Flower registers the virtual nodes while the ServerApp starts (thousands take seconds),
    so wait while their number still grows towards ``data.num_clients``.
    """
    wanted, deadline = scenario.data.num_clients, time.monotonic() + wait_s
    nodes, grew = len(list(grid.get_node_ids())), time.monotonic()
    while 0 < nodes < wanted and time.monotonic() < min(deadline, grew + 5.0):
        time.sleep(0.5)
        if (now := len(list(grid.get_node_ids()))) != nodes:
            nodes, grew = now, time.monotonic()
    if nodes and nodes != scenario.data.num_clients:
        raise ScenarioError(
            f"the federation has {nodes} virtual SuperNodes but data.num_clients="
            f"{scenario.data.num_clients}; make them equal (options.num-supernodes of the "
            f"Flower connection, or --run-config / --set data.num_clients={nodes})"
        )


def wait_for_nodes(grid: Grid, scenario: Scenario, poll_s: float = 1.0) -> None:
    """Deployment: wait (5 minutes at most) for ``data.num_clients`` nodes to connect.

    SuperNodes join when they start, so the first round could otherwise begin with only
    some of them known. Past the deadline the run goes on with the nodes it has.
    """
    wanted = scenario.data.num_clients
    deadline = time.monotonic() + min(scenario.federation.round_timeout, 300.0)
    shown = -1
    while (have := len(list(grid.get_node_ids()))) < wanted and time.monotonic() < deadline:
        if have != shown:
            console.print(f"waiting for SuperNodes: {have}/{wanted} connected")
            shown = have
        time.sleep(poll_s)
    if have < wanted:
        console.print(f"[yellow]going on with {have}/{wanted} SuperNodes[/]")


def compression_summary(
    scenario: Scenario, rows: list[dict[str, Any]], full_model_bytes: int
) -> dict[str, Any]:
    """Compression settings and ratios of the run.

    Wire bytes against the same traffic uncoded, and against full fine-tuning (each
    client sending and receiving every base weight).
    """
    up = sum(r["bytes_up"] for r in rows)
    down = sum(r["bytes_down"] for r in rows)
    replies = sum(r["clients_sampled"] - r["clients_failed"] for r in rows)
    sent = sum(r["clients_sampled"] for r in rows)

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    return {
        **dataclasses.asdict(scenario.compression),
        "ratio_up_vs_uncompressed": ratio(sum(r["bytes_up_uncompressed"] for r in rows), up),
        "ratio_down_vs_uncompressed": ratio(sum(r["bytes_down_uncompressed"] for r in rows), down),
        "ratio_up_vs_full": ratio(full_model_bytes * replies, up),
        "ratio_down_vs_full": ratio(full_model_bytes * sent, down),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    The server's: in simulation that includes Flower's engine and its virtual nodes.
    """
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
        return ExampleBound(scenario)
    return ExampleBound(scenario, lambda pid: client_train_size(scenario.data, scenario.seed, pid))


def seed_everything(seed: int) -> None:
    """Seed the RNGs the server uses (Flower samples clients with ``random``)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = load_checkpoint(out_dir) if resume else None
    if checkpoint is not None:
        scenario = checkpoint.scenario
    else:
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        # a new run starts every client afresh: no personal state from an earlier run here
        for name in (*STATE_DIRS, CHECKPOINT, f"{CHECKPOINT}.old"):
            shutil.rmtree(out_dir / name, ignore_errors=True)
    seed_everything(scenario.seed)

    data = load_task_data(scenario.data)
    test = eval_split(scenario.data)
    device = resolve_device(scenario.model.device)
    local = server_side(scenario, device)
    # Under heterogeneous ranks the server's model has the largest client rank.
    server_peft = scenario.peft_for_rank(scenario.max_rank)
    model = cached_peft_model(local.model, server_peft, data.num_labels, scenario.seed)
    set_trainable(model, None)
    model.to(device)
    processor = load_processor(scenario.model)  # tokenizer or image preparation
    reference = initial_adapter_state(local.model, server_peft, data.num_labels, scenario.seed)
    initial = state_to_arrayrecord(reference)
    adapter_bytes = payload_nbytes(initial)
    full_model_bytes = tensors_nbytes(base_model_tensors(model))

    strategy = checkpoint.strategy if checkpoint else build_strategy(scenario)
    if isinstance(strategy, AdapterStrategy):  # node ids are new in every attempt
        strategy.node_ranks.clear()
        strategy.last_trained = []
    if engine == "simulation":
        check_node_count(grid, scenario)
    elif engine == "deployment":
        wait_for_nodes(grid, scenario)
        grid = PollingGrid(grid)  # replies in ~0.1 s instead of Flower's 3 s pull interval
    if engine == "simulation":
        step("starting the client processes (each imports torch, then builds its model once)")
    elif engine == "deployment":
        step(f"asking the {len(list(grid.get_node_ids()))} SuperNodes which partition each serves")
    guess = simulated_partitions(grid)  # None on any Grid but Flower's in-memory one
    counting = CountingGrid(grid)
    discover_nodes(counting, scenario, strategy, guess)
    copies = out_dir / "server_state" / "copies"  # what each node holds (downlink deltas)
    codec = (
        CodecGrid(counting, scenario.compression, copies, scenario.seed)
        if scenario.compression.enabled
        else None
    )
    # what the strategy talks to: [central DP] -> validation -> [lost instructions (faults)]
    # -> [SecAgg+] -> [codec] -> byte counting -> Flower's Grid
    inner: Grid = codec or counting
    if scenario.privacy.secure_aggregation:
        inner = SecAggGrid(inner, counting, scenario)
    if scenario.faults.drop_rate > 0:
        inner = FaultyGrid(inner, counting, scenario)
    bound = example_bound(scenario, engine)
    validating = ValidatingGrid(inner, counting, reference, scenario, bound)
    private = (
        PrivacyGrid(validating, scenario, counting.partitions)
        if scenario.privacy.dp != "none"
        else None
    )
    log = RoundLog(out_dir, scenario.federation.rounds)
    initial_metrics: dict[str, float] = {}
    done = checkpoint.progress if checkpoint else Progress(0, new_run_tag(), [], {}, 0.0)
    if checkpoint is not None:
        log.restore(done.rows)  # metrics.jsonl loses rounds past the checkpoint
        initial_metrics.update(done.initial_metrics)
        if private is not None:
            private.restore(done.privacy)
        console.print(f"[bold]resuming[/] {out_dir} after round {done.round}")
    round_clock = [time.perf_counter()]
    console.print(
        f"[bold]fedpeft[/] {scenario.name}: {scenario.peft.label} on {scenario.model.name}, "
        f"{scenario.strategy.name}, {scenario.federation.rounds} rounds x "
        f"{scenario.federation.clients_per_round}/{scenario.data.num_clients} clients -> {out_dir}"
    )

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        fold_base_delta(model, getattr(strategy, "base_delta", {}))
        set_adapter_state(model, arrayrecord_to_state(arrays))
        metrics = evaluate(model, scenario, test, processor=processor, device=device)
        if server_round == 0:
            initial_metrics.update(metrics)
            console.print(
                f"round 0  eval_accuracy {metrics['eval_accuracy']:.4f} (initial adapter)"
            )
        else:
            traffic = counting.take()
            plain_up, plain_down = codec.take() if codec else (traffic.bytes_up, traffic.bytes_down)
            now = time.perf_counter()
            log.append(
                {
                    "round": server_round,
                    "strategy": scenario.strategy.name,
                    "train_loss": traffic.train_loss,
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
                    "round_seconds": now - round_clock[0],
                    "client_metrics": traffic.clients,
                }
            )
            round_clock[0] = now
        return MetricRecord(dict(metrics.items()))

    state_dir = out_dir / "client_state"  # per-client state of this run (personal factors)
    train_config = ConfigRecord(
        {
            records.SCENARIO: scenario.to_json(),
            records.STATE_DIR: str(state_dir.resolve()),
            records.RUN_TAG: done.run_tag,
        }
    )

    def round_end(server_round: int, arrays: ArrayRecord) -> None:
        progress = Progress(
            round=server_round,
            run_tag=done.run_tag,
            rows=log.rows,
            initial_metrics=initial_metrics,
            wall_seconds=done.wall_seconds + time.perf_counter() - started,
            privacy=private.books() if private else {},
            rng=rng_states(),
            resumed_after=done.resumed_after,
        )
        save_checkpoint(out_dir, scenario, arrays, strategy, progress)

    def replies_in(server_round: int) -> None:
        if server_round == scenario.faults.server_crash_round and checkpoint is None:
            raise ServerCrash(
                f"faults.server_crash_round={server_round}: the server crashed mid-round "
                f"(injected); carry on with: fedpeft run --resume {out_dir}"
            )

    if checkpoint is not None:
        done.resumed_after.append(done.round)
        set_rng_states(done.rng)  # last: nothing above may draw from them
    round_clock[0] = rounds_started = time.perf_counter()
    final = run_rounds(
        strategy,
        private or validating,
        checkpoint.arrays if checkpoint else initial,
        first_round=done.round + 1,
        last_round=scenario.federation.rounds,
        timeout=scenario.federation.round_timeout,
        train_config=train_config,
        evaluate_config=ConfigRecord(dict(train_config)),
        evaluate_fn=evaluate_fn,
        round_end=round_end,
        replies_in=replies_in,
    )
    rounds_seconds = time.perf_counter() - rounds_started
    set_adapter_state(model, arrayrecord_to_state(final))
    save_final_adapter(strategy, model, local, data.num_labels, out_dir / ADAPTER_DIR)
    rows = log.rows
    up_total = sum(r["bytes_up"] for r in rows)
    down_total = sum(r["bytes_down"] for r in rows)
    sent = [r["bytes_up"] / max(r["clients_sampled"] - r["clients_failed"], 1) for r in rows]
    per_client_up = sum(sent) / max(len(sent), 1)
    final_metrics = {
        k: v for k, v in rows[-1].items() if k.startswith(("eval_", "train_", "personal_"))
    }
    summary = {
        "scenario": scenario.to_dict(),
        "engine": engine,
        "secure": secure,
        "methods": [
            {"name": name, "family": get_method(name).family} for name in scenario.peft.methods
        ],
        "final": final_metrics,
        "initial": initial_metrics,
        "rounds_completed": len(rows),
        "resumed_after_rounds": done.resumed_after,
        "bytes_up_total": up_total,
        "bytes_down_total": down_total,
        "wall_seconds": done.wall_seconds + time.perf_counter() - started,  # every attempt
        "server_peak_memory_mb": peak_rss_mb(),
        "trainable_params": count_trainable(model),
        "total_params": total_params(model),
        "adapter_bytes": adapter_bytes,
        "full_model_bytes": full_model_bytes,
        "bytes_up_per_client_round": per_client_up,
        "saving_vs_full": full_model_bytes / per_client_up if per_client_up else None,
        "compression": compression_summary(scenario, rows, full_model_bytes),
        "privacy": {
            **dataclasses.asdict(scenario.privacy),
            "epsilon": private.epsilon() if private else None,
        },
        "clients": [
            {**row, "rank": scenario.rank_of(row["client"])}
            for row in partition_summary(scenario.data, scenario.seed)
        ],
        "eval_data": eval_data_record(scenario, len(test)),
        "label_names": data.label_names,
    }
    write_json_atomic(out_dir / SUMMARY_FILE, summary)
    write_model_card(out_dir / ADAPTER_DIR, summary, scenario, command)
    title = f"{scenario.name}: {scenario.peft.label} + {scenario.strategy.name}"
    plot_run(out_dir, rows, initial_metrics or None, title)
    console.print(
        f"[bold]finished[/] {len(rows)} round{'s' * (len(rows) != 1)} "
        f"({rounds_seconds:.0f}s of rounds here): "
        f"eval_accuracy {final_metrics.get('eval_accuracy', float('nan')):.4f}; each client sent "
        f"{per_client_up / 1e3:.0f} kB per round vs {full_model_bytes / 1e6:.1f} MB for full "
        f"fine-tuning ({summary['saving_vs_full'] or 0:.0f}x less). Outputs: {out_dir}"
    )
    return summary
