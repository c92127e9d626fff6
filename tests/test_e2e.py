"""End to end through the real entry point: `fedpeft run` in a subprocess, then its outputs."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from procs import CONTRACT_ROW_KEYS, SUMMARY_KEYS, interrupt_fedpeft, run_fedpeft
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow(45)  # runs the session's MiniLM run; the tests below read it
def test_run_writes_the_contract_files(minilm_run):
    out, proc = minilm_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert CONTRACT_ROW_KEYS <= set(row)
        assert row["clients_sampled"] == 2 and row["clients_failed"] == 0
        assert 0.0 <= row["eval_accuracy"] <= 1.0
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
    # each client process built its base model once and reused it in round 2
    loads = {c["partition-id"]: c["model_loads"] for c in rows[1]["client_metrics"]}
    # placement: the Ray node and the device that ran each client
    assert all(c["ray_node"] and c["device"] == "cpu" for c in rows[1]["client_metrics"])
    assert sorted(loads) == [0, 1] and set(loads.values()) == {1}
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["engine"] == "simulation"
    assert summary["bytes_up_total"] == sum(r["bytes_up"] for r in rows)
    assert summary["final"]["eval_accuracy"] == rows[-1]["eval_accuracy"]
    assert sum(c["size"] for c in summary["clients"]) == 80115
    # LoRA r=4 on query/value + the 26-way head: a few hundred times less than full FT
    assert summary["full_model_bytes"] > 90e6
    assert summary["full_model_bytes"] / summary["bytes_up_per_client_round"] > 200
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    for png in ("metrics_vs_round.png", "accuracy_vs_megabytes.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "round 2/2" in proc.stderr and "ETA" in proc.stderr


def test_the_console_reads_clean_and_times_the_whole_command(minilm_run):
    out, proc = minilm_run
    console = proc.stdout + proc.stderr
    for noise in (
        "LOAD REPORT",
        "Manually terminating",
        "Saving the dataset",
        "Generating train split",
        "Traceback",
        "dashboard",
    ):
        assert noise not in console, console[-3000:]
    steps = proc.stdout.splitlines()
    assert steps[0].startswith("fedpeft run smoke with 1 --set override: Tiny random BERT")
    assert any("loading model minilm with lora" in line for line in steps)
    assert any("starting Ray and 2 virtual clients" in line for line in steps)
    summary = json.loads((out / "summary.json").read_text())
    done = float(steps[-1].split("done in ")[1].split("s")[0])
    assert done >= summary["wall_seconds"] - 1  # start-up and shutdown included


def test_the_adapter_card_says_what_made_it(minilm_run):
    out, _ = minilm_run
    card = (out / "adapter" / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
    assert "library_name: peft" in card
    for fact in (
        "| strategy | fedavg |",
        "| rounds | 2 of 2, with 2 of 2 clients a round |",
        "lora, r=4, alpha=8",
        "wordnet-supersense, iid partition",
        "eval_accuracy 0.",
        f"fedpeft run smoke --set model.name=minilm --out {out}",
    ):
        assert fact in card, card


def test_adapter_loads_without_fedpeft_and_reproduces_the_accuracy(minilm_run):
    out, _ = minilm_run
    script = REPO / "docs" / "verify_adapter.py"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(script), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=out,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    ours = {
        m for m in imported if m.split(".")[0] in {"fedpeft", "clients", "server", "strategies"}
    }
    assert not ours, f"the check imported {sorted(ours)}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["accuracy"] == result["reported"]


#: where a Ctrl-C lands: while Ray starts (the main thread waits in Ray's C++ calls), and
#: mid-run (round 3 in flight, the ServerApp in its own thread)
PHASES = {"ray-start-up": {"after_process": "raylet"}, "mid-round": {"after": "round 2/"}}


def _kept_rounds(out: Path) -> int:
    """Finished rounds the interrupted run kept: whole rows, numbered 1..n, checkpointed."""
    from fedpeft.report import read_metrics
    from fedpeft.server.checkpoint import checkpoint_dir, checkpointed

    rows = read_metrics(out)  # every line parses: no half-written row
    assert [r["round"] for r in rows] == list(range(1, len(rows) + 1))
    if checkpoint_dir(out) is not None:  # round k is logged, then checkpointed
        assert checkpointed(out)[1] in (len(rows) - 1, len(rows))
    return len(rows)


@pytest.mark.slow(30)
@pytest.mark.parametrize("phase", PHASES)
def test_ctrl_c_stops_a_run_promptly_and_keeps_finished_rounds(phase, tmp_path):
    out = tmp_path / "o"
    run = interrupt_fedpeft(
        "run",
        "smoke",
        "--set",
        "federation.rounds=200",
        "--set",
        "simulation.cpus_per_client=2",  # one Ray worker: the interruption is under test
        "--out",
        str(out),
        cwd=tmp_path,
        sig=signal.SIGINT,
        **PHASES[phase],
    )
    assert run.code == 130, run.output[-3000:]  # and no process was left behind
    # in order when it can; the run forces its exit 10 s after an unanswered Ctrl-C
    assert run.seconds < 30, run.output[-3000:]
    assert f"fedpeft: interrupted; rounds finished so far are in {out}" in run.output
    assert "Traceback" not in run.output, run.output[-3000:]
    assert _kept_rounds(out) >= (2 if phase == "mid-round" else 0)


@pytest.mark.slow(18)
def test_a_second_ctrl_c_stops_a_run_at_once(tmp_path):
    """While Ray starts, the main thread may sit in C++ for many seconds, deaf to the first."""
    out = tmp_path / "o"
    run = interrupt_fedpeft(
        "run",
        "smoke",
        "--set",
        "federation.rounds=200",
        "--set",
        "simulation.cpus_per_client=2",  # one Ray worker: the interruption is under test
        "--out",
        str(out),
        cwd=tmp_path,
        sig=signal.SIGINT,
        times=2,
        **PHASES["ray-start-up"],
    )
    assert run.code == 130, run.output[-3000:]  # and no process was left behind
    assert run.seconds < 5, run.output[-3000:]
    assert "fedpeft: interrupted; rounds finished so far are in" in run.output
    _kept_rounds(out)


@pytest.mark.slow(80)
def test_smoke_faults_finishes_through_lost_crashing_slow_and_nan_clients(tmp_path):
    """The bundled fault scenario on Flower's Simulation Engine (a real round timeout).

    Its first 3 rounds hold every kind of fault (round 3 the slow and the lost client)."""
    out = tmp_path / "o"
    proc = run_fedpeft(
        "run", "smoke-faults", "--set", "federation.rounds=3", "--out", str(out), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    failures = [f for r in rows for f in r["failures"]]
    for kind in ("instruction lost", "injected crash", "no reply within the round timeout"):
        assert any(kind in f for f in failures), (kind, failures)
    assert sum(r["updates_rejected"] for r in rows) > 0
    assert all(r["clients_failed"] == len(r["failures"]) for r in rows)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(bool(v.isfinite().all()) for v in adapter.values())
