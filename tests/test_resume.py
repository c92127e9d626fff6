"""Crash-safe resume: a run killed mid-round and resumed ends bit-identical to one never killed."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from procs import MINILM_RUN, run_fedpeft, session_folder, sigkill_fedpeft

from fedpeft.clients.app import app as client_app
from fedpeft.config import ScenarioError, load_scenario
from fedpeft.server.checkpoint import CHECKPOINT, checkpoint_dir, checkpointed, load_checkpoint
from fedpeft.server.inprocess import InProcessGrid
from fedpeft.server.reliability import ServerCrash
from fedpeft.server.run import run_federation
from fedpeft.state import ClientStateStore
from fedpeft.strategies import STRATEGIES, build_strategy
from fedpeft.tools.cli import main

ADAPTER = Path("adapter") / "adapter_model.safetensors"
SAME = (
    "round",
    "eval_accuracy",
    "eval_loss",
    "train_loss",
    "bytes_up",
    "bytes_down",
    "clients_sampled",
    "personal_accuracy",
)


def rows(out: Path) -> list[dict]:
    """The metrics rows, without what depends on the clock or on random node ids."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k in SAME} for line in lines]


def crash_and_resume(sets: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """Run ``smoke-resume`` (4 rounds, 2 of 4 clients) once straight through and once
    crashing mid-round 3 and resumed on a new grid (new run id, new node ids)."""
    plain = load_scenario("smoke-resume", [*sets, "faults.server_crash_round=0"])
    # folder names of equal length: the state folder's path travels in every message
    straight = tmp_path / "straight"
    run_federation(InProcessGrid(client_app, 4), plain, straight, "in-process")
    crashing = load_scenario("smoke-resume", sets)
    resumed = tmp_path / "restored"
    with pytest.raises(ServerCrash, match="--resume"):
        run_federation(InProcessGrid(client_app, 4), crashing, resumed, "in-process")
    assert checkpointed(resumed)[1] == 2  # round 3 crashed after its clients wrote state
    grid = InProcessGrid(client_app, 4, run_id=2, first_node_id=901)
    summary = run_federation(grid, plain, resumed, "in-process", resume=True)
    assert summary["resumed_after_rounds"] == [2]
    assert summary["scenario"] == crashing.to_dict()  # the checkpoint's, not the one passed
    return straight, resumed


@pytest.mark.parametrize(
    "sets",
    [
        [],  # FedSA-LoRA's personal B and top-k + int8 error-feedback residuals per client
        ['strategy.name="fedadam"', "compression.uplink=[]", "compression.error_feedback=false"],
        [
            'strategy.name="hetlora"',
            "peft.client_ranks=[2, 4, 2, 4]",
            "compression.uplink=[]",
            "compression.error_feedback=false",
        ],
        ['strategy.name="fedex_lora"', "compression.downlink_delta=true"],
    ],
    ids=["fedsa-topk-ef", "fedadam", "hetlora-ranks", "fedex-downlink-delta"],
)
@pytest.mark.slow(10)
def test_crash_and_resume_is_bit_identical(sets: list[str], tmp_path: Path) -> None:
    straight, resumed = crash_and_resume(sets, tmp_path)
    assert (resumed / ADAPTER).read_bytes() == (straight / ADAPTER).read_bytes()
    assert rows(resumed) == rows(straight)
    assert [r["round"] for r in rows(resumed)] == [1, 2, 3, 4]  # round 3 not logged twice


def test_resume_restores_client_state_written_after_the_checkpoint(tmp_path: Path) -> None:
    crashing = load_scenario("smoke-resume")
    out = tmp_path / "run"
    with pytest.raises(ServerCrash):
        run_federation(InProcessGrid(client_app, 4), crashing, out, "in-process")
    # round 3's clients replaced their files after the checkpoint of round 2 was taken
    where = checkpoint_dir(out)
    assert where is not None
    stale = [
        p.relative_to(out)
        for p in (out / "client_state").rglob("*.safetensors")
        if p.read_bytes() != (where / p.relative_to(out)).read_bytes()
    ]
    assert stale, "round 3 should have changed some client's state"
    load_checkpoint(out)
    for path in stale:
        assert (out / path).read_bytes() == (where / path).read_bytes()


def test_a_checkpoint_half_swapped_is_still_found(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ServerCrash):
        run_federation(
            InProcessGrid(client_app, 4),
            load_scenario("smoke-resume"),
            out,
            "in-process",
        )
    os.replace(out / CHECKPOINT, out / f"{CHECKPOINT}.old")  # killed between the two renames
    scenario, done = checkpointed(out)
    assert (scenario.name, done) == ("smoke-resume", 2)
    assert load_checkpoint(out).arrays.keys()


def test_a_folder_without_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="holds no checkpoint") as err:
        checkpointed(tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_pickles_into_a_checkpoint(name: str) -> None:
    sets = [f'strategy.name="{name}"']
    if STRATEGIES[name].heterogeneous_ranks:
        sets.append("peft.client_ranks=[2, 4]")
    strategy = build_strategy(load_scenario("smoke", sets))
    copy = pickle.loads(pickle.dumps(strategy))
    assert type(copy) is type(strategy)
    assert vars(copy).keys() == vars(strategy).keys()


def test_state_store_keeps_runs_apart_and_survives_a_restart(tmp_path: Path) -> None:
    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7}
    ClientStateStore(tmp_path, run_tag=11).save(3, tensors)
    reopened = ClientStateStore(tmp_path, run_tag=11).load(3)  # a new process, same run
    assert reopened.keys() == {"b"} and torch.equal(reopened["b"], tensors["b"])
    assert ClientStateStore(tmp_path, run_tag=12).load(3) == {}  # another run's state
    assert torch.equal(ClientStateStore(tmp_path).load(3)["b"], tensors["b"])


def test_cli_resume_takes_no_other_settings(tmp_path: Path, capsys, quiet_env) -> None:
    assert main(["run", "smoke", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "drop the scenario" in err and err.count("\n") == 1


@pytest.mark.slow(110)
def test_sigkill_mid_round_then_resume_matches_an_uninterrupted_run(
    request, tmp_path_factory, worker_id, capsys, quiet_env
) -> None:
    """The acceptance test: Flower's Simulation Engine, the server SIGKILLed in round 2.

    The uninterrupted run is the session's MiniLM run (``minilm_run``, 2 rounds of both
    clients), which this one repeats from a folder whose path has the same length (the
    state folder's path travels in every message). With two clients a round, the order in
    which their replies arrive changes no sum, so the two Ray workers may answer in any.
    """
    cwd = session_folder(tmp_path_factory, worker_id) / "minilm-sigkilled"  # 16 characters
    cwd.mkdir()
    killed = cwd / "out"
    saved = killed / CHECKPOINT / "progress.pkl"
    lines = sigkill_fedpeft(
        *MINILM_RUN, "--out", str(killed), cwd=cwd, after="round 1/2", file=saved
    )
    assert not (killed / "summary.json").exists(), "".join(lines)
    last = checkpointed(killed)[1]  # 1, unless round 2 finished in the moment the kill took
    assert last in (1, 2), "".join(lines)
    resumed = run_fedpeft("run", "--resume", str(killed), cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming smoke" in resumed.stdout
    straight, _ = request.getfixturevalue("minilm_run")
    assert len(str(straight)) == len(str(killed))
    assert (killed / ADAPTER).read_bytes() == (straight / ADAPTER).read_bytes()
    assert rows(killed) == rows(straight)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_after_rounds"] == [last] and summary["rounds_completed"] == 2
    capsys.readouterr()
    assert main(["run", "--resume", str(killed)]) == 0  # in process: the check is quick
    assert "nothing to resume" in capsys.readouterr().out
