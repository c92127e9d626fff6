"""Flower ClientApp: unpack the message, call fedpeft, pack the reply."""

from __future__ import annotations

import os
import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft import models, records
from fedpeft.adapters import get_adapter_state, set_adapter_state
from fedpeft.codecs import arrayrecord_to_state, state_to_arrayrecord
from fedpeft.config import Scenario
from fedpeft.data import client_partition, eval_split, load_task_data
from fedpeft.models import cached_peft_model, load_tokenizer, resolve_device
from fedpeft.train import evaluate, train_steps

app = ClientApp()


def _prepare(msg: Message) -> tuple[Scenario, torch.nn.Module, torch.device]:
    """Scenario from the message, this process's cached model with the global adapter in it."""
    if threads := os.environ.get("FEDPEFT_THREADS_PER_CLIENT"):
        torch.set_num_threads(int(threads))
    scenario = Scenario.from_json(str(msg.content.config_records[records.CONFIG][records.SCENARIO]))
    num_labels = load_task_data(scenario.data).num_labels
    model = cached_peft_model(scenario.model, scenario.peft, num_labels, scenario.seed)
    device = resolve_device(scenario.model.device)
    model.to(device)
    set_adapter_state(model, arrayrecord_to_state(msg.content.array_records[records.ARRAYS]))
    return scenario, model, device


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


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter on this client's partition; reply with the new adapter."""
    started = time.perf_counter()
    scenario, model, device = _prepare(msg)
    config = msg.content.config_records[records.CONFIG]
    partition_id = _partition_id(context, scenario)
    server_round = int(str(config.get(records.SERVER_ROUND, 0)))
    data = client_partition(scenario.data, scenario.seed, partition_id)
    t = scenario.train
    result = train_steps(
        model,
        load_tokenizer(scenario.model.name),
        data,
        steps=t.local_steps,
        batch_size=t.batch_size,
        lr=t.lr,
        max_length=scenario.data.max_length,
        # distinct, reproducible batch order per (seed, round, client)
        seed=(scenario.seed * 1_000_003 + server_round) * 10_007 + partition_id,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        proximal_mu=float(str(config.get(records.PROXIMAL_MU, 0.0))),
        device=device,
    )
    metrics = MetricRecord(
        {
            records.TRAIN_LOSS: result.train_loss,
            records.NUM_EXAMPLES: result.num_examples,
            records.PARTITION_ID: partition_id,
            records.TRAIN_SECONDS: time.perf_counter() - started,
            records.MODEL_LOADS: models.LOADS["base_model"],
        }
    )
    arrays: ArrayRecord = state_to_arrayrecord(get_adapter_state(model))
    return Message(RecordDict({records.ARRAYS: arrays, records.METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the received adapter on the held-out split (federated evaluation)."""
    scenario, model, device = _prepare(msg)
    data = eval_split(scenario.data)
    result = evaluate(
        model,
        load_tokenizer(scenario.model.name),
        data,
        batch_size=scenario.train.eval_batch_size,
        max_length=scenario.data.max_length,
        device=device,
    )
    metrics = MetricRecord({**result, records.NUM_EXAMPLES: len(data)})
    return Message(RecordDict({records.METRICS: metrics}), reply_to=msg)
