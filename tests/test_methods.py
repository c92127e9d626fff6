"""One table for every PEFT method on every task it applies to, run through one tester.

Each row checks: only trainable tensors travel; adapter state round-trips exactly;
aggregating identical updates returns them; a two-round federated run (the real server,
strategy and ClientApp, in process) changes the adapter and lowers the training loss;
the saved adapter reloads (with plain peft where peft saved it, else fedpeft's loader).
"""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch
from peft import PeftModel

from fedpeft.adapter_files import META_FILE, load_adapter, save_adapter
from fedpeft.adapters import (
    _canonical,
    count_trainable,
    get_adapter_state,
    set_adapter_state,
)
from fedpeft.clients.app import app as client_app
from fedpeft.codecs import arrayrecord_to_state, payload_nbytes, state_to_arrayrecord
from fedpeft.config import Scenario, ScenarioError, load_scenario
from fedpeft.data import client_split, load_task_data
from fedpeft.methods import METHODS, build_peft_model, get_method
from fedpeft.models import load_base_model
from fedpeft.server.inprocess import InProcessGrid
from fedpeft.server.outputs import ADAPTER_DIR
from fedpeft.server.run import run_federation
from fedpeft.strategies.testing import aggregate_with
from fedpeft.train import evaluate

TASK_SCENARIOS = {"seq-cls": "smoke", "causal-lm": "smoke-llm", "image-cls": "smoke-vision"}

# method id -> extra --set overrides (on top of the task's smoke scenario)
METHOD_ROWS: dict[str, list[str]] = {
    "lora": [],
    "lora-rslora-gaussian": ["peft.use_rslora=true", 'peft.init="gaussian"'],
    "dora": [],
    "loha": [],
    "lokr": [],
    "vera": [],
    "adalora": ["peft.adalora_target_r=2"],
    "ia3": [],
    "prompt_tuning": ["train.lr=0.05"],
    "prefix_tuning": ["train.lr=0.05"],
    "p_tuning": ["train.lr=0.01"],
    "adapter": [],
    "bitfit": ["train.lr=0.01"],
    "sparse": ["peft.sparse_fraction=0.05", "train.lr=0.01"],
    "sparse-magnitude": ['peft.sparse_selection="magnitude"', "peft.sparse_fraction=0.05"],
    "lora+bitfit": [],
    "prefix_tuning+lora": ["train.lr=0.02"],
    "full": ["train.lr=1e-3"],
}


def _names(row: str) -> list[str]:
    return row.split("-")[0].split("+")


def _method_value(row: str) -> str:
    names = _names(row)
    return json.dumps(names[0] if len(names) == 1 else names)


def _applies(row: str, task: str) -> bool:
    return all(task in get_method(name).tasks for name in _names(row))


ROWS = [
    pytest.param(row, task, id=f"{row}/{task}")
    for row in METHOD_ROWS
    for task in TASK_SCENARIOS
    if _applies(row, task)
]
NOT_APPLICABLE = [
    pytest.param(row, task, id=f"{row}/{task}")
    for row in METHOD_ROWS
    for task in TASK_SCENARIOS
    if not _applies(row, task)
]


def scenario_for(row: str, task: str, *extra: str) -> Scenario:
    """The task's smoke scenario with this row's method and settings."""
    overrides = [f"peft.method={_method_value(row)}", *METHOD_ROWS[row], *extra]
    return load_scenario(TASK_SCENARIOS[task], overrides)


def fresh_model(scenario: Scenario) -> torch.nn.Module:
    """A newly built adapted model (not the per-process cache: tests change it)."""
    labels = load_task_data(scenario.data).num_labels
    base = load_base_model(scenario.model, labels)
    return build_peft_model(base, scenario.peft, scenario.model.task, scenario.seed)


@cache
def _inputs(task: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if task == "image-cls":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}
    ids = torch.randint(1000, 5000, (2, 9), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def outputs(model: torch.nn.Module, task: str) -> torch.Tensor:
    """The model's logits on a fixed input."""
    model.eval()
    with torch.no_grad():
        return model(**_inputs(task)).logits.float()


def _perturb(model: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))


@pytest.mark.parametrize("row,task", ROWS)
def test_only_trainable_tensors_travel(row: str, task: str) -> None:
    model = fresh_model(scenario_for(row, task))
    state = get_adapter_state(model)
    trainable = {_canonical(n): p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {_canonical(n) for n, p in model.named_parameters() if not p.requires_grad}

    assert set(state) == set(trainable) and state
    assert not set(state) & frozen
    assert sum(v.numel() for v in state.values()) == count_trainable(model)
    if row != "full":
        assert count_trainable(model) < 0.5 * sum(p.numel() for p in model.parameters())
    if row == "vera":  # the shared projections are buffers from the seed: they never travel
        assert not any("vera_A" in k or "vera_B" in k for k in state)


@pytest.mark.parametrize("row,task", ROWS)
def test_adapter_state_round_trips_exactly(row: str, task: str) -> None:
    model = fresh_model(scenario_for(row, task))
    _perturb(model)
    state = get_adapter_state(model)
    expected = outputs(model, task)

    wire = arrayrecord_to_state(state_to_arrayrecord(state))
    other = fresh_model(scenario_for(row, task))
    set_adapter_state(other, wire)

    assert all(torch.equal(wire[k], state[k]) for k in state)
    assert all(torch.equal(v, state[k]) for k, v in get_adapter_state(other).items())
    assert torch.equal(outputs(other, task), expected)


@pytest.mark.parametrize("row,task", ROWS)
def test_aggregating_identical_updates_returns_them(row: str, task: str) -> None:
    scenario = scenario_for(row, task, "data.num_clients=3", "federation.clients_per_round=3")
    model = fresh_model(scenario)
    _perturb(model)
    state = get_adapter_state(model)

    got = aggregate_with("fedavg", [state] * 3, [5, 7, 11], scenario=scenario)

    for key, value in state.items():
        torch.testing.assert_close(got[key], value.double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("row,task", ROWS)
def test_two_federated_rounds_change_the_adapter_and_lower_the_loss(row, task, tmp_path):
    """The training loss is measured on fixed training examples (client 0's first 64),
    before and after: each round's own batches differ too much to compare rounds."""
    scenario = scenario_for(
        row, task, "train.local_steps=4", "data.eval_examples=32", "train.eval_generate=0"
    )
    seen = client_split(scenario.data, scenario.seed, 0)[0].select(range(64))
    initial = fresh_model(scenario)
    before, initial_out = evaluate(initial, scenario, seen)["eval_loss"], outputs(initial, task)

    summary = run_federation(
        InProcessGrid(client_app, scenario.data.num_clients), scenario, tmp_path, "in-process"
    )

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["clients_failed"] == 0
    final = load_adapter(tmp_path / ADAPTER_DIR)  # the saved global adapter, reloaded
    assert not torch.allclose(outputs(final, task), initial_out, rtol=0, atol=1e-6)
    assert evaluate(final, scenario, seen)["eval_loss"] < before
    assert [m["name"] for m in summary["methods"]] == scenario.peft.methods


@pytest.mark.parametrize("row,task", ROWS)
def test_saved_adapter_reloads(row: str, task: str, tmp_path) -> None:
    scenario = scenario_for(row, task)
    model = fresh_model(scenario)
    _perturb(model)
    labels = load_task_data(scenario.data).num_labels
    from fedpeft.methods import META_ATTR

    getattr(model, META_ATTR).update(model=scenario.to_dict()["model"], num_labels=labels)
    save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())

    if meta["format"] == "peft":  # plain peft, no fedpeft import needed
        base = load_base_model(scenario.model, labels)
        for name in scenario.peft.methods:  # prefix tuning on transformers 5 needs its shim
            if (prepare := get_method(name).prepare) is not None:
                prepare(base)
        reloaded = PeftModel.from_pretrained(base, str(tmp_path))
    else:
        reloaded = load_adapter(tmp_path)

    torch.testing.assert_close(outputs(reloaded, task), outputs(model, task), rtol=0, atol=1e-5)
    single_peft = len(scenario.peft.methods) == 1 and METHODS[scenario.peft.methods[0]].kind
    assert meta["format"] == {"peft": "peft", "full": "transformers"}.get(single_peft, "fedpeft")


@pytest.mark.parametrize("row,task", NOT_APPLICABLE)
def test_a_method_that_cannot_apply_to_a_task_is_refused_in_one_line(row, task) -> None:
    with pytest.raises(ScenarioError) as err:
        fresh_model(scenario_for(row, task))
    assert "cannot apply to model.task" in str(err.value) and "\n" not in str(err.value)


def test_sparse_uplink_scales_with_masked_entries_not_matrix_size() -> None:
    sent, nnz = {}, {}
    for fraction in (0.02, 0.08):
        model = fresh_model(scenario_for("sparse", "seq-cls", f"peft.sparse_fraction={fraction}"))
        _perturb(model)  # trained values differ: no identical chunks for Flower to send once
        state = get_adapter_state(model)
        values = {k: v for k, v in state.items() if k.endswith(".values")}
        sent[fraction] = payload_nbytes(state_to_arrayrecord(values))
        nnz[fraction] = sum(v.numel() for v in values.values())
        matrices = [p for n, p in model.named_parameters() if n.endswith(".original")]
        assert values and len(values) == len(matrices)
        assert nnz[fraction] == sum(round(fraction * p.numel()) for p in matrices)

    # 4 bytes per masked entry: the payload grows with the mask by its new floats (plus
    # a few bytes of headers whose digits grow with the shapes)
    assert sent[0.08] - sent[0.02] == pytest.approx(4 * (nnz[0.08] - nnz[0.02]), rel=0.01)
    overhead = [(sent[f] - 4 * nnz[f]) / len(values) for f in sent]
    # per array, a constant: the .npy header, key and object ids, whatever the matrix size
    assert overhead[0] == overhead[1] < 600
    matrices = {n: p.detach() for n, p in model.named_parameters() if n.endswith(".original")}
    assert sent[0.08] < payload_nbytes(state_to_arrayrecord(matrices)) / 4


@pytest.mark.parametrize(
    "methods,reason",
    [
        ('["lora","dora"]', "a hybrid takes one of them"),
        ('["vera","bitfit"]', "cannot be combined"),
        ('["adalora","sparse"]', "cannot be combined"),
        ('["full","bitfit"]', "cannot be combined"),
        ('["prompt_tuning","p_tuning"]', "combines prompt methods"),
        ('["lora","lora"]', "distinct method names"),
    ],
)
def test_a_hybrid_that_cannot_work_is_refused_in_one_line(methods, reason) -> None:
    with pytest.raises(ScenarioError) as err:
        fresh_model(load_scenario("smoke", [f"peft.method={methods}"]))
    assert reason in str(err.value) and "\n" not in str(err.value)
