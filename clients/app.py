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
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft import models, records
from fedpeft.adapters import (
    AdapterState,
    adapter_parameters,
    base_delta_from_state,
    factor_of,
    fold_base_delta,
    get_adapter_state,
    lora_pairs,
    set_adapter_state,
    set_trainable,
)
from fedpeft.clients.compression import compression_mod, run_tag, state_dir
from fedpeft.clients.secagg import secagg_mod
from fedpeft.codecs import arrayrecord_to_state, state_to_arrayrecord
from fedpeft.config import PeftSection, Scenario
from fedpeft.data import client_split, load_task_data, node_split
from fedpeft.faults import fault_mod
from fedpeft.methods import before_round
from fedpeft.models import (
    cached_peft_model,
    device_label,
    initial_adapter_state,
    resolve_device,
)
from fedpeft.privacy import local_dp_mod
from fedpeft.state import ClientStateStore, scalar
from fedpeft.strategies.lora_math import (
    hetlora_prune_rank,
    hetlora_self_pruning_penalty,
    lora_alpha_for,
    lora_scaling,
)
from fedpeft.train import evaluate, scenario_collate, train_steps

# outermost first: SecAgg+ (its key stages never reach the other mods), then payloads are
# decoded (and the reply coded last), local DP noises the reply, faults are injected (if
# asked), then the handler
app = ClientApp(mods=[secagg_mod, compression_mod, local_dp_mod, fault_mod])

RANK_KEY = "__rank__"  # a client's own (possibly self-pruned) rank, kept in its state store


@dataclass
class Job:
    """Everything one message asks of this client."""

    scenario: Scenario
    config: ConfigRecord
    partition_id: int
    rank: int  # the rank of this client's adapter tensors
    current_rank: int  # HetLoRA: the rank left after self-pruning (components past it are 0)
    model: torch.nn.Module
    device: torch.device
    store: ClientStateStore | None

    def factors(self, key: str) -> set[str]:
        """A comma-separated factor list from the instructions."""
        return records.factor_set(self.config, key)


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
    scenario = Scenario.from_json(str(config[records.SCENARIO]))
    partition_id = _partition_id(context, scenario)
    folder = state_dir(context, config)
    store = ClientStateStore(folder, run_tag(context, config)) if folder else None
    personal = store.load(partition_id) if store else {}
    shared_scaling = str(config.get(records.ALPHA_MODE, "per-rank")) == "shared-scaling"
    # a real node may state its own rank (flower-supernode --node-config "rank=4")
    rank = int(str(context.node_config.get(records.NODE_RANK, scenario.rank_of(partition_id))))
    peft_cfg = client_peft(scenario, rank, shared_scaling)
    num_labels = load_task_data(scenario.data).num_labels
    # a real node may name its own device (flower-supernode --node-config 'device="cuda:0"')
    device = resolve_device(
        str(context.node_config.get(records.NODE_DEVICE, scenario.model.device))
    )
    model = cached_peft_model(scenario.model, peft_cfg, num_labels, scenario.seed, device)
    model.to(device)
    current = int(personal[RANK_KEY].item()) if RANK_KEY in personal else rank
    job = Job(scenario, config, partition_id, rank, min(current, rank), model, device, store)

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
        per_rank_scaling=not shared_scaling,
        use_rslora=scenario.peft.use_rslora,
    )
    keep = job.factors(records.PERSONAL_FACTORS)
    mine = {k: v for k, v in personal.items() if k in initial and factor_of(k) in keep}
    state = {**initial, **received, **mine}
    if RANK_KEY in personal:  # HetLoRA: components past the self-pruned rank stay zero
        state = _zero_tail(state, int(personal[RANK_KEY].item()))
    set_adapter_state(model, state)
    return job


def local_data(job: Job, context: Context) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The client's (train, local held-out) data.

    A real node may bring its own file (``fedpeft deploy supernode --data PATH``); else it
    serves its partition of the scenario's data set. A node with a state folder keeps its
    partition there, so its ClientApp (a fresh process per message) reads it back.
    """
    node = context.node_config
    data = job.scenario.data
    if (path := node.get(records.NODE_DATA_PATH)) is not None:
        return node_split(data, str(path), load_task_data(data).label_names or None)
    folder = node.get(records.NODE_STATE_DIR)
    cache = Path(str(folder)) / "cache" if folder is not None else None
    return client_split(data, job.scenario.seed, job.partition_id, cache_dir=cache)


def _zero_tail(state: AdapterState, rank: int) -> AdapterState:
    out = dict(state)
    for a_key, b_key in lora_pairs(list(state)).values():
        out[a_key] = state[a_key].clone()
        out[a_key][rank:, :] = 0
        out[b_key] = state[b_key].clone()
        out[b_key][:, rank:] = 0
    return out


def _pruning_penalty(job: Job) -> Callable[[], torch.Tensor] | None:
    """HetLoRA's rank self-pruning regulariser on this client's live factors, if asked."""
    gamma = float(str(job.config.get(records.PRUNE_GAMMA, 0.0)))
    if gamma <= 0:
        return None
    live = adapter_parameters(job.model)
    pairs = [(live[a], live[b]) for a, b in lora_pairs(list(live)).values()]

    def penalty() -> torch.Tensor:
        return sum(
            (hetlora_self_pruning_penalty(b, a, job.current_rank, gamma) for a, b in pairs),
            torch.zeros((), device=job.device),
        )

    return penalty


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train as instructed on this client's partition; reply with the factors to send."""
    started = time.perf_counter()
    job = _prepare(msg, context)
    scenario, config = job.scenario, job.config
    server_round = int(str(config.get(records.SERVER_ROUND, 0)))
    end_round: Callable[[], None] | None = None
    try:
        set_trainable(job.model, job.factors(records.TRAIN_FACTORS) or None)
        end_round = before_round(job.model, server_round, scenario.federation.rounds)  # AdaLoRA
        train_part, _ = local_data(job, context)
        t = scenario.train
        result = train_steps(
            job.model,
            scenario_collate(scenario),
            train_part,
            steps=t.local_steps,
            batch_size=t.batch_size,
            lr=t.lr,
            # distinct, reproducible batch order per (seed, round, client)
            seed=(scenario.seed * 1_000_003 + server_round) * 10_007 + job.partition_id,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            proximal_mu=float(str(config.get(records.PROXIMAL_MU, 0.0))),
            regulariser=_pruning_penalty(job),
            device=job.device,
            precision=t.precision,
            track_gradient=scenario.compression.scores_by_gradient(scenario.privacy),
        )
    finally:  # the cached model serves the next message: leave it as it was
        if end_round is not None:
            end_round()
        set_trainable(job.model, None)
    state = get_adapter_state(job.model)
    sent_rank = job.current_rank
    threshold = float(str(config.get(records.PRUNE_THRESHOLD, 0.0)))
    if float(str(config.get(records.PRUNE_GAMMA, 0.0))) > 0 and threshold > 0:
        sent_rank = _self_prune(job, state, threshold)
    send = job.factors(records.SEND_FACTORS)
    sent = {k: v for k, v in state.items() if factor_of(k) in send} if send else state
    sent = _truncate(sent, sent_rank)
    keep = job.factors(records.PERSONAL_FACTORS)
    if job.store is not None and (keep or sent_rank != job.rank):
        own = {k: v for k, v in state.items() if factor_of(k) in keep}
        if sent_rank != job.rank:
            own[RANK_KEY] = scalar(sent_rank)
        job.store.save(job.partition_id, own)
    metrics = MetricRecord(
        {
            records.TRAIN_LOSS: result.train_loss,
            records.NUM_EXAMPLES: result.num_examples,
            records.PARTITION_ID: job.partition_id,
            records.CLIENT_RANK: sent_rank,
            records.TRAIN_SECONDS: time.perf_counter() - started,
            records.MODEL_LOADS: models.LOADS["base_model"],
            records.STEP_SECONDS: result.step_seconds,
            records.PEAK_MEMORY_MB: result.peak_memory_mb,
        }
    )
    node_info = ConfigRecord(
        {records.INFO_DEVICE: device_label(job.device), records.INFO_HOST: socket.gethostname()}
    )
    ray = sys.modules.get("ray")  # in simulation: which Ray node ran this client
    if ray is not None and ray.is_initialized():
        node_info[records.INFO_RAY_NODE] = str(ray.get_runtime_context().get_node_id())
    content = RecordDict(
        {
            records.ARRAYS: state_to_arrayrecord(sent),
            records.METRICS: metrics,
            records.NODE_INFO: node_info,
        }
    )
    if result.mean_gradients:  # for top-k's ranking; the compression mod takes it out
        params = adapter_parameters(job.model)
        gradient = {
            key: result.mean_gradients[param]
            for key in sent
            if (param := params.get(key)) is not None and param in result.mean_gradients
        }
        content[records.GRADIENT] = state_to_arrayrecord(_truncate(gradient, sent_rank))
    return Message(content, reply_to=msg)


def _self_prune(job: Job, state: AdapterState, threshold: float) -> int:
    """HetLoRA's local rank self-pruning: the smallest rank any module still needs."""
    ranks = []
    for a_key, b_key in lora_pairs(list(state)).values():
        ranks.append(
            hetlora_prune_rank(state[b_key], state[a_key], job.current_rank, 0.5, threshold)
        )
    return max(1, min(job.current_rank, max(ranks) if ranks else job.current_rank))


def _truncate(state: AdapterState, rank: int) -> AdapterState:
    out = dict(state)
    for a_key, b_key in lora_pairs(list(state)).values():
        out[a_key], out[b_key] = state[a_key][:rank, :], state[b_key][:, :rank]
    return out


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
    _, holdout = local_data(job, context)
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
