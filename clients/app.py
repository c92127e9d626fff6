"""Flower ClientApp: unpack the message, call fedpeft, pack the reply.

What a client trains, sends and keeps is not hard-coded per strategy: the server's
instructions in the ConfigRecord name the factors (``lora_A``, ``lora_B``, ``head``) for
each, and per-client state (a personal B, a pruned rank) lives in a state store on disk.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft import models, records
from fedpeft.adapters import (
    AdapterState,
    adapter_parameters,
    base_delta_from_state,
    factor_of,
    fold_base_delta,
    get_adapter_state,
    set_adapter_state,
    set_trainable,
)
from fedpeft.clients.compression import compression_mod, run_tag, state_dir
from fedpeft.clients.faults import fault_mod
from fedpeft.clients.instructions import Instructions
from fedpeft.clients.packing import packing_mod
from fedpeft.clients.privacy import local_dp_mod
from fedpeft.clients.secagg import secagg_mod
from fedpeft.codecs import arrayrecord_to_state, state_to_arrayrecord
from fedpeft.config import PeftSection, Scenario
from fedpeft.data import (
    client_split,
    forget_loaded_data,
    load_task_data,
    node_split,
    personal_eval_split,
)
from fedpeft.lora import lora_alpha_for, lora_scaling
from fedpeft.methods import before_round
from fedpeft.models import (
    cached_peft_model,
    device_label,
    initial_adapter_state,
    resolve_device,
)
from fedpeft.state import ClientStateStore
from fedpeft.strategies import get_strategy
from fedpeft.strategies.client_hook import ClientHook
from fedpeft.tasks import forget_processors, get_task
from fedpeft.train import (
    TrainResult,
    evaluate,
    learning_rate,
    round_steps,
    scenario_collate,
    train_steps,
)

# outermost first: a deployment's packed records are unpacked (and the reply packed last),
# SecAgg+ (its key stages never reach the other mods), then payloads are decoded (and the
# reply coded last), local DP noises the reply, faults are injected (if asked), the handler
app = ClientApp(mods=[packing_mod, secagg_mod, compression_mod, local_dp_mod, fault_mod])


@dataclass
class Job:
    """Everything one message asks of this client, and what it works with."""

    scenario: Scenario
    asked: Instructions
    partition_id: int
    rank: int  # the rank of this client's adapter tensors
    current_rank: int  # HetLoRA: the rank left after self-pruning (components past it are 0)
    model: torch.nn.Module
    device: torch.device
    store: ClientStateStore | None
    hook: ClientHook  # the strategy's client-side work


def _partition_id(context: Context, scenario: Scenario) -> int:
    """Return the node's partition, checked against the scenario's number of clients."""
    node = context.node_config
    partition_id = int(str(node[records.NODE_PARTITION_ID]))
    num_partitions = int(str(node.get(records.NODE_NUM_PARTITIONS, scenario.data.num_clients)))
    if num_partitions != scenario.data.num_clients:
        raise ValueError(
            f"this node is partition {partition_id} of {num_partitions}, but the scenario "
            f"splits its data among data.num_clients={scenario.data.num_clients}; make them "
            "equal (Flower's num-supernodes, or --set data.num_clients=N)"
        )
    return partition_id


def client_peft(scenario: Scenario, rank: int, shared_scaling: bool = False) -> PeftSection:
    """The PEFT section of a rank-``rank`` client.

    Peft's own scaling at that rank, or with ``shared_scaling`` (HetLoRA) the scaling of
    the largest rank: ``lora_alpha`` is set so that padded factors of every rank add up in
    the same units, with or without rsLoRA.
    """
    peft = scenario.peft_for_rank(rank)
    if not shared_scaling:
        return peft
    shared = lora_scaling(peft.alpha, scenario.max_rank, peft.use_rslora)
    return dataclasses.replace(peft, alpha=lora_alpha_for(shared, rank, peft.use_rslora))


def fit_rank(
    received: AdapterState,
    like: AdapterState,
    per_rank_scaling: bool = True,
    use_rslora: bool = False,
) -> AdapterState:
    """Cut (or zero-pad) received LoRA factors to this client's rank.

    Keeping the leading components is the rank-r truncation for SVD-ordered (FlexLoRA)
    and HetLoRA factors. Under peft's per-rank scaling a rank-r client would apply another
    scaling than the sender's rank did, so B is rescaled by ``s(r_sent) / s(r)`` (``r /
    r_sent``, or ``sqrt(r / r_sent)`` with rsLoRA) to keep the update ``s * B @ A`` the same.
    """
    out = {}
    for key, value in received.items():
        target = like[key].shape
        if value.shape == target:
            out[key] = value
            continue
        fitted = torch.zeros(target, dtype=value.dtype)
        rows, cols = min(value.shape[0], target[0]), min(value.shape[1], target[1])
        fitted[:rows, :cols] = value[:rows, :cols]
        if per_rank_scaling and factor_of(key) == "lora_B":
            fitted *= lora_scaling(1.0, value.shape[1], use_rslora) / lora_scaling(
                1.0, target[1], use_rslora
            )
        out[key] = fitted
    return out


def _prepare(msg: Message, context: Context) -> Job:
    """Model with the global adapter, this client's personal part and its rank applied."""
    if threads := os.environ.get("FEDPEFT_THREADS_PER_CLIENT"):
        torch.set_num_threads(int(threads))
    config = msg.content.config_records[records.CONFIG]
    asked = Instructions.parse(config)
    scenario = asked.scenario
    partition_id = _partition_id(context, scenario)
    folder = state_dir(context, config)
    store = ClientStateStore(folder, run_tag(context, config)) if folder else None
    personal = store.load(partition_id) if store else {}
    # a real node may state its own rank (flower-supernode --node-config "rank=4")
    rank = int(str(context.node_config.get(records.NODE_RANK, scenario.rank_of(partition_id))))
    peft_cfg = client_peft(scenario, rank, asked.shared_scaling)
    num_labels = load_task_data(scenario.data).num_labels
    # a real node may name its own device (flower-supernode --node-config 'device="cuda:0"')
    device = resolve_device(
        str(context.node_config.get(records.NODE_DEVICE, scenario.model.device))
    )
    model = cached_peft_model(scenario.model, peft_cfg, num_labels, scenario.seed, device)
    model.to(device)
    hook = get_strategy(scenario.strategy.name).client_hook
    current = hook.current_rank(personal, rank)
    job = Job(scenario, asked, partition_id, rank, current, model, device, store, hook)

    # frozen base: W0 plus whatever the strategy folded into it (FLoRA, FedEx-LoRA)
    content = msg.content.array_records
    fold_base_delta(
        model,
        base_delta_from_state(arrayrecord_to_state(content[records.BASE_DELTA]))
        if records.BASE_DELTA in content
        else {},
    )
    # initial adapter (same seed everywhere) <- global tensors <- this client's own tensors
    initial = initial_adapter_state(scenario.model, peft_cfg, num_labels, scenario.seed)
    received = fit_rank(
        arrayrecord_to_state(msg.content.array_records[records.ARRAYS]),
        initial,
        per_rank_scaling=not asked.shared_scaling,
        use_rslora=scenario.peft.use_rslora,
    )
    keep = asked.personal_factors
    mine = {k: v for k, v in personal.items() if k in initial and factor_of(k) in keep}
    set_adapter_state(model, hook.restore({**initial, **received, **mine}, personal))
    return job


def local_data(job: Job, context: Context) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The client's (train, local held-out) data.

    A real node may bring its own file (``fedpeft deploy supernode --data PATH``); else it
    serves its partition of the scenario's data set. A node with a state folder keeps its
    partition there, so its ClientApp (a fresh process per message) reads it back.
    """
    node = context.node_config
    data = job.scenario.data
    path, folder = node.get(records.NODE_DATA_PATH), node.get(records.NODE_STATE_DIR)
    key = repr((data, job.scenario.seed, job.partition_id, path, folder))
    if key not in PARTITIONS:  # a long-lived process (a node's trainer) splits once per run
        if path is not None:
            parts = node_split(data, str(path), load_task_data(data).label_names or None)
        else:
            cache = Path(str(folder)) / "cache" if folder is not None else None
            parts = client_split(data, job.scenario.seed, job.partition_id, cache_dir=cache)
        if len(PARTITIONS) >= 4:
            PARTITIONS.pop(next(iter(PARTITIONS)))
        PARTITIONS[key] = parts
    return PARTITIONS[key]


#: this process's latest client splits (train, held-out), by data set, seed, partition, node
PARTITIONS: dict[str, tuple[datasets.Dataset, datasets.Dataset]] = {}


def forget_data_and_processors() -> None:
    """Drop this process's loaded data sets, partitioners and tokenizers.

    A node's trainer calls it between runs, with :func:`fedpeft.models.free_cached_models`.
    """
    PARTITIONS.clear()
    forget_loaded_data()
    forget_processors()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train as instructed on this client's partition; reply with the factors to send."""
    started = time.perf_counter()
    job = _prepare(msg, context)
    result = _train_locally(job, context)
    sent, sent_rank = _send_and_keep(job, get_adapter_state(job.model))
    content = RecordDict(
        {
            records.ARRAYS: state_to_arrayrecord(sent),
            records.METRICS: _train_metrics(job, result, sent_rank, started),
            records.NODE_INFO: _node_info(job.device),
        }
    )
    if result.mean_gradients:  # for top-k's ranking; the compression mod takes it out
        content[records.GRADIENT] = _gradient_record(job, result, sent, sent_rank)
    return Message(content, reply_to=msg)


def _train_locally(job: Job, context: Context) -> TrainResult:
    """Run the local steps on the factors the server asked to train, then unfreeze all."""
    scenario, asked = job.scenario, job.asked
    server_round = asked.server_round
    end_round: Callable[[], None] | None = None
    try:
        set_trainable(job.model, set(asked.train_factors) or None)
        end_round = before_round(job.model, server_round, scenario.federation.rounds)  # AdaLoRA
        train_part, _ = local_data(job, context)
        t = scenario.train
        steps = t.steps_for(len(train_part))  # local_steps, or what train.epochs take
        # the schedule runs across rounds
        first_step, total_steps = round_steps(server_round, scenario.federation.rounds, steps)
        return train_steps(
            job.model,
            scenario_collate(scenario),
            train_part,
            steps=steps,
            batch_size=t.batch_size,
            lr=t.lr,
            lr_at=lambda step: learning_rate(t, first_step + step, total_steps),
            grad_accum_steps=t.grad_accum_steps,
            # distinct, reproducible batch order per (seed, round, client)
            seed=(scenario.seed * 1_000_003 + server_round) * 10_007 + job.partition_id,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            proximal_mu=asked.proximal_mu,
            regulariser=job.hook.regulariser(
                adapter_parameters(job.model), job.current_rank, asked.prune_gamma, job.device
            ),
            device=job.device,
            precision=t.precision,
            track_gradient=scenario.compression.scores_by_gradient(scenario.privacy),
            objective=get_task(scenario.model.task).objective(t),
        )
    finally:  # the cached model serves the next message: leave it as it was
        if end_round is not None:
            end_round()
        set_trainable(job.model, None)


def _send_and_keep(job: Job, state: AdapterState) -> tuple[AdapterState, int]:
    """The factors to send and the rank they have; what this client keeps goes to its store."""
    asked = job.asked
    sent_rank = job.hook.rank_to_send(
        state, job.current_rank, asked.prune_gamma, asked.prune_threshold
    )
    send = asked.send_factors
    sent = {k: v for k, v in state.items() if factor_of(k) in send} if send else state
    sent = job.hook.outgoing(sent, sent_rank)
    keep = asked.personal_factors
    extra = job.hook.kept(sent_rank, job.rank)
    if job.store is not None and (keep or extra):
        own = {k: v for k, v in state.items() if factor_of(k) in keep}
        job.store.save(job.partition_id, {**own, **extra})
    return sent, sent_rank


def _train_metrics(job: Job, result: TrainResult, sent_rank: int, started: float) -> MetricRecord:
    """The reply's training metrics (``started``: when the handler began, for its wall time)."""
    return MetricRecord(
        {
            records.TRAIN_LOSS: result.train_loss,
            records.NUM_EXAMPLES: result.num_examples,
            records.LEARNING_RATE: result.learning_rate,
            records.PARTITION_ID: job.partition_id,
            records.CLIENT_RANK: sent_rank,
            records.TRAIN_SECONDS: time.perf_counter() - started,
            records.MODEL_LOADS: models.LOADS["base_model"],
            records.STEP_SECONDS: result.step_seconds,
            records.PEAK_MEMORY_MB: result.peak_memory_mb,
        }
    )


def _node_info(device: torch.device) -> ConfigRecord:
    """Where this client ran: its device, host and (in simulation) Ray node."""
    node_info = ConfigRecord(
        {records.INFO_DEVICE: device_label(device), records.INFO_HOST: socket.gethostname()}
    )
    ray = sys.modules.get("ray")  # in simulation: which Ray node ran this client
    if ray is not None and ray.is_initialized():
        node_info[records.INFO_RAY_NODE] = str(ray.get_runtime_context().get_node_id())
    return node_info


def _gradient_record(
    job: Job, result: TrainResult, sent: AdapterState, sent_rank: int
) -> ArrayRecord:
    """The mean gradient of each sent tensor, shaped as sent (top-k ranks entries by it)."""
    params = adapter_parameters(job.model)
    gradient = {
        key: result.mean_gradients[param]
        for key in sent
        if (param := params.get(key)) is not None and param in result.mean_gradients
    }
    return state_to_arrayrecord(job.hook.outgoing(gradient, sent_rank))


@app.query()
def describe_node(msg: Message, context: Context) -> Message:
    """Tell the server which partition (and LoRA rank) this node serves, before round 1."""
    config = msg.content.config_records[records.CONFIG]
    scenario = Scenario.from_json(str(config[records.SCENARIO]))
    partition_id = _partition_id(context, scenario)
    rank = int(str(context.node_config.get(records.NODE_RANK, scenario.rank_of(partition_id))))
    metrics = MetricRecord({records.PARTITION_ID: partition_id, records.CLIENT_RANK: rank})
    return Message(RecordDict({records.METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate_personal(msg: Message, context: Context) -> Message:
    """Evaluate this client's model (global part + its own part) on its local held-out part."""
    job = _prepare(msg, context)
    scenario = job.scenario
    holdout = personal_eval_split(local_data(job, context)[1], scenario.data)
    result = evaluate(job.model, scenario, holdout, device=job.device)
    metrics = MetricRecord(
        {
            records.PERSONAL_ACCURACY: result["eval_accuracy"],
            records.PERSONAL_LOSS: result["eval_loss"],
            records.NUM_EXAMPLES: len(holdout),
            records.PARTITION_ID: job.partition_id,
        }
    )
    return Message(RecordDict({records.METRICS: metrics}), reply_to=msg)
