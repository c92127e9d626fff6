"""[report] trackers: TensorBoard event files and a W&B offline run hold the run's metrics,
read back with TensorBoard's own reader and W&B's record format."""

import json
import struct
from pathlib import Path

import pytest

from fedpeft.clients.app import app as client_app
from fedpeft.config import ScenarioError, load_scenario
from fedpeft.server.inprocess import InProcessGrid
from fedpeft.server.run import run_federation
from fedpeft.tools.cli import main
from fedpeft.tracking import check_tracking


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked") / "run"
    sets = ["report.tensorboard=true", "report.wandb='offline'", "report.wandb_project='tests'"]
    scenario = load_scenario("smoke", sets)
    run_federation(InProcessGrid(client_app, 2), scenario, out, "in-process")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    initial = json.loads((out / "summary.json").read_text())["initial"]
    return out, rows, initial


def test_tensorboard_reads_every_rounds_metrics_and_each_clients(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, rows, initial = tracked_run
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    accuracy = [(e.step, e.value) for e in events.Scalars("eval_accuracy")]
    expected = [(0, initial["eval_accuracy"])] + [(r["round"], r["eval_accuracy"]) for r in rows]
    assert accuracy == [(step, pytest.approx(value, rel=1e-6)) for step, value in expected]
    losses = [e.value for e in events.Scalars("train_loss")]
    assert losses == [pytest.approx(r["train_loss"], rel=1e-6) for r in rows]
    for client in rows[-1]["client_metrics"]:
        tag = f"client/{client['partition-id']}/train_loss"
        assert events.Scalars(tag)[-1].value == pytest.approx(client["train_loss"], rel=1e-6)


def _wandb_history(run_file: Path) -> list[dict[str, float]]:
    """The history records of a W&B run file (a LevelDB-style log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, block, pos, pending, history = run_file.read_bytes(), 32768, 7, b"", []
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                history.append(
                    {
                        "/".join(i.nested_key) or i.key: json.loads(i.value_json)
                        for i in record.history.item
                    }
                )
    return history


def test_a_wandb_offline_run_folder_holds_the_same_rows(tracked_run):
    out, rows, initial = tracked_run
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history = {int(h["_step"]): h for h in _wandb_history(run_file)}
    assert sorted(history) == [0, 1, 2]
    assert history[0]["eval_accuracy"] == pytest.approx(initial["eval_accuracy"])
    for row in rows:
        logged = history[row["round"]]
        assert logged["eval_loss"] == pytest.approx(row["eval_loss"])
        assert logged["bytes_up"] == row["bytes_up"]
        for client in row["client_metrics"]:
            key = f"client/{client['partition-id']}/num-examples"
            assert logged[key] == client["num-examples"]


def test_a_missing_tracker_package_is_one_line_before_any_round(monkeypatch, capsys, quiet_env):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ScenarioError, match=r"pip install 'fedpeft\[tracking\]'"):
        check_tracking(load_scenario("smoke", ["report.wandb='offline'"]).report)
    assert main(["run", "smoke", "--set", "report.wandb='offline'"]) == 2
    err = capsys.readouterr().err
    assert "report.wandb='offline' needs the wandb package" in err and err.count("\n") == 1
