"""Whole federations through the real ServerApp code, strategy and ClientApp, in process.

Flower's engines only move the messages; what a run computes is the same without them
(:class:`fedpeft.server.inprocess.InProcessGrid`), so these checks skip Ray's start-up.
The runs that need the engine itself (Ctrl-C, SIGKILL and resume, a round timeout, a
Ray cluster, a deployment) stay in test_e2e, test_resume, test_cluster and test_deploy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message, MessageType
from safetensors.torch import load_file

from fedpeft import records
from fedpeft.clients.app import app as client_app
from fedpeft.codecs import arrayrecord_to_state
from fedpeft.config import Scenario, load_scenario
from fedpeft.data import client_split, client_train_size
from fedpeft.server.grid import DelegatingGrid
from fedpeft.server.inprocess import InProcessGrid
from fedpeft.server.run import run_federation

PEFT_AWARE = "fedit,ffa_lora,fedsa_lora,rolora,flora,flexlora,hetlora,fedex_lora"


class Recording(DelegatingGrid):
    """Keeps each round's global arrays as sent for training, and the training replies.

    The global arrays after round t are those sent in round t + 1.
    """

    def __init__(self, grid: InProcessGrid) -> None:
        super().__init__(grid)
        self.sent: dict[int, dict[str, np.ndarray]] = {}  # round -> global arrays (train)
        self.replies: dict[int, list[tuple[dict[str, np.ndarray], int]]] = {}

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for message in messages:
            if message.metadata.message_type == MessageType.TRAIN:
                config = message.content.config_records[records.CONFIG]
                server_round = int(str(config[records.SERVER_ROUND]))
                self.sent[server_round] = _arrays(message)
                self.replies[server_round] = [
                    (
                        _arrays(r),
                        int(str(r.content.metric_records[records.METRICS][records.NUM_EXAMPLES])),
                    )
                    for r in replies
                ]
        return replies


def _arrays(message: Message) -> dict[str, np.ndarray]:
    state = arrayrecord_to_state(message.content.array_records[records.ARRAYS])
    return {k: v.double().numpy() for k, v in state.items()}


def _run(scenario: Scenario, out: Path, **grid_args) -> tuple[dict, Recording]:
    grid = Recording(InProcessGrid(client_app, scenario.data.num_clients, **grid_args))
    return run_federation(grid, scenario, out, "in-process"), grid


def _weighted_mean(replies: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    total = sum(n for _, n in replies)
    return {k: sum(a[k] * n for a, n in replies) / total for k in replies[0][0]}


def test_fedprox_aggregates_the_weighted_mean_of_the_replies(tmp_path):
    """FedProx changes the clients' objective, not the server's rule: McMahan's mean."""
    scenario = load_scenario("smoke", ["strategy.name='fedprox'", "federation.rounds=3"])
    summary, grid = _run(scenario, tmp_path)
    assert summary["rounds_completed"] == 3
    for server_round in (1, 2):
        expected = _weighted_mean(grid.replies[server_round])
        assert any(not np.allclose(grid.sent[server_round][k], expected[k]) for k in expected), (
            "the clients did not move the adapter"
        )
        for key, value in expected.items():
            np.testing.assert_allclose(
                grid.sent[server_round + 1][key], value, rtol=1e-6, atol=1e-8
            )


def test_fedadam_steps_as_reddi_et_al_over_every_round(tmp_path):
    """x_{t+1} = x_t + eta_t m_t / (sqrt(v_t) + tau), moments carried across rounds."""
    scenario = load_scenario("smoke", ["strategy.name='fedadam'", "federation.rounds=3"])
    eta, b1, b2, tau = (
        scenario.strategy.server_lr,
        scenario.strategy.beta_1,
        scenario.strategy.beta_2,
        scenario.strategy.tau,
    )
    summary, grid = _run(scenario, tmp_path)
    assert summary["rounds_completed"] == 3
    m: dict[str, np.ndarray] = {}
    v: dict[str, np.ndarray] = {}
    for t in (1, 2):
        x, mean = grid.sent[t], _weighted_mean(grid.replies[t])
        # Flower's bias-corrected step size at server round t
        eta_t = eta * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        for key in mean:
            delta = mean[key] - x[key]
            m[key] = b1 * m.get(key, 0.0) + (1 - b1) * delta
            v[key] = b2 * v.get(key, 0.0) + (1 - b2) * delta**2
            expected = x[key] + eta_t * m[key] / (np.sqrt(v[key]) + tau)
            np.testing.assert_allclose(grid.sent[t + 1][key], expected, rtol=1e-5, atol=1e-7)
    moved = sum(float(np.abs(grid.sent[3][k] - grid.sent[1][k]).sum()) for k in grid.sent[1])
    assert moved > 0


def test_heterogeneous_ranks_run_with_flexlora(tmp_path):
    scenario = load_scenario("smoke", ["peft.client_ranks=[2,4]", "strategy.name='flexlora'"])
    _run(scenario, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ranks = {c["partition-id"]: c["rank"] for c in rows[-1]["client_metrics"]}
    assert ranks == {0: 2, 1: 4}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [c["rank"] for c in summary["clients"]] == [2, 4]


def test_same_seed_same_run_whatever_the_node_ids(tmp_path):
    """Node ids are random per run; sampling by partition keeps runs reproducible."""
    scenario = load_scenario(
        "smoke", ["data.num_clients=4", "federation.rounds=3", "federation.clients_per_round=2"]
    )
    adapters, sampled = [], []
    for i, ids in enumerate(([101, 102, 103, 104], [90731, 17, 5502, 442])):
        out = tmp_path / f"o{i}"
        _run(scenario, out, node_ids=ids)
        adapters.append((out / "adapter" / "adapter_model.safetensors").read_bytes())
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        sampled.append([sorted(c["partition-id"] for c in r["client_metrics"]) for r in rows])
    assert sampled[0] == sampled[1]
    assert len({tuple(s) for s in sampled[0]}) > 1, "every round sampled the same clients"
    assert adapters[0] == adapters[1]


@pytest.mark.parametrize("name", PEFT_AWARE.split(","))
def test_every_peft_aware_strategy_runs_a_federation(name, tmp_path):
    scenario = load_scenario("smoke", [f'strategy.name="{name}"'])
    summary, grid = _run(scenario, tmp_path)
    assert summary["rounds_completed"] == 2
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
    assert grid.replies[2], "no client trained in round 2"


class PersonalCounts(DelegatingGrid):
    """The example counts of the personalised evaluation replies, by partition."""

    def __init__(self, grid: InProcessGrid) -> None:
        super().__init__(grid)
        self.examples: dict[int, list[int]] = {}

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        for reply in self._grid.send_and_receive(messages, timeout=timeout):
            metrics = reply.content.metric_records.get(records.METRICS, {})
            if records.PERSONAL_ACCURACY in metrics:
                partition = int(str(metrics[records.PARTITION_ID]))
                count = int(str(metrics[records.NUM_EXAMPLES]))
                self.examples.setdefault(partition, []).append(count)
            yield reply


@pytest.mark.parametrize("cap", [0, 30])
def test_personal_evaluation_reads_the_first_client_eval_examples_of_the_holdout(cap, tmp_path):
    """``data.client_eval_examples`` cuts the evaluation, not the held-out share or training."""
    sets = ['strategy.name="fedsa_lora"', "data.client_holdout=0.002", "federation.rounds=1"]
    scenario = load_scenario("smoke", [*sets, f"data.client_eval_examples={cap}"])
    grid = PersonalCounts(InProcessGrid(client_app, scenario.data.num_clients))
    run_federation(grid, scenario, tmp_path, "in-process")
    holdouts = {p: len(client_split(scenario.data, scenario.seed, p)[1]) for p in (0, 1)}
    assert all(n > 30 for n in holdouts.values()), holdouts  # the cap has something to cut
    expected = {p: [min(n, cap or n)] for p, n in holdouts.items()}
    assert grid.examples == expected
    trained = sum(client_train_size(scenario.data, scenario.seed, p) for p in (0, 1))
    assert trained == 80115 - sum(holdouts.values())


def test_a_cosine_schedule_runs_across_rounds_and_each_round_logs_its_rate(tmp_path):
    """4 rounds of 3 steps, 2 of warm-up: round r starts at step 3(r - 1) of 12."""
    scenario = load_scenario(
        "smoke",
        [
            "federation.rounds=4",
            "train.local_steps=3",
            "train.lr_schedule='cosine'",
            "train.warmup_steps=2",
            "train.min_lr=1e-4",
            "train.grad_accum_steps=2",
        ],
    )
    peak, low = scenario.train.lr, scenario.train.min_lr
    _run(scenario, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [0.0] + [
        low + (peak - low) * 0.5 * (1 + math.cos(math.pi * (3 * (r - 1) - 2) / 10))
        for r in (2, 3, 4)
    ]
    assert [row["lr"] for row in rows] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    for row in rows:  # every client trained at the round's rate, on 3 steps x 2 batches
        assert {c["lr"] for c in row["client_metrics"]} == {row["lr"]}
        batches = 3 * 2
        assert {c[records.NUM_EXAMPLES] for c in row["client_metrics"]} == {batches * 8}


def test_epochs_replace_local_steps_and_each_client_passes_over_its_data_once(tmp_path):
    from fedpeft.data import client_train_size

    rows = ["text,label"] + [f"gloss number {i},class{i % 3}" for i in range(60)]
    (tmp_path / "small.csv").write_text("\n".join(rows) + "\n")
    scenario = load_scenario(
        "smoke",
        [
            f"data.name='{tmp_path / 'small.csv'}'",
            "train.epochs=1",
            "train.lr_schedule='linear'",
            "federation.rounds=2",
        ],
    )
    _run(scenario, tmp_path / "out")
    log = [
        json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    ]
    for row in log:
        assert row["updates_rejected"] == 0 and row["clients_failed"] == 0
        for client in row["client_metrics"]:
            size = client_train_size(
                scenario.data, scenario.seed, int(client[records.PARTITION_ID])
            )
            assert client[records.NUM_EXAMPLES] == size  # one pass: every example once
        rates = [c[records.LEARNING_RATE] for c in row["client_metrics"]]
        assert row["lr"] == pytest.approx(sum(rates) / len(rates))
    assert log[0]["lr"] == scenario.train.lr > log[1]["lr"] > 0  # linear decay across rounds


def test_fedpeft_run_serves_its_clients_in_process_when_asked(tmp_path, capsys, quiet_env):
    """``simulation.engine = "in-process"``: the whole command, without Ray."""
    from fedpeft.tools.cli import main

    out = tmp_path / "run"
    engine = 'simulation.engine="in-process"'
    assert main(["run", "smoke", "--set", engine, "--out", str(out)]) == 0
    console = capsys.readouterr().out
    assert "serving 2 virtual clients in this process" in console and "Ray" not in console
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "in-process" and summary["rounds_completed"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_sampled"] - r["clients_failed"] for r in rows] == [2, 2]
    assert all("ray_node" not in c for r in rows for c in r["client_metrics"])
    # what it computes is the in-process Grid's own run of the same scenario
    twin = tmp_path / "twin"
    scenario = load_scenario("smoke", [engine])
    run_federation(InProcessGrid(client_app, 2), scenario, twin, "in-process")
    adapter = "adapter/adapter_model.safetensors"
    assert (out / adapter).read_bytes() == (twin / adapter).read_bytes()
