"""`fedpeft compare`: the value splitter, the table and plots on synthetic run folders, and
one real sweep through the console entry point."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedpeft.config import ScenarioError
from fedpeft.tools.cli import main
from fedpeft.tools.compare import (
    Cell,
    parse_vary,
    plan_cells,
    plot_rows,
    split_top_level,
    summarise_cells,
    write_table,
)
from fedpeft.tools.compare.running import _reason
from fedpeft.tools.compare.tabulating import _mean_curve

PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("1e-3,1e-2", ["1e-3", "1e-2"]),
        ("[2,4],[4,8]", ["[2,4]", "[4,8]"]),
        ("[[1,2],[3]], 5", ["[[1,2],[3]]", "5"]),
        ('"a,b",\'c,d\',"x\\",y"', ['"a,b"', "'c,d'", '"x\\",y"']),
        ("{a=1,b=[1,2]},{a=2}", ["{a=1,b=[1,2]}", "{a=2}"]),
        ("fedavg", ["fedavg"]),
    ],
)
def test_split_top_level(text, items):
    assert split_top_level(text) == items


@pytest.mark.parametrize("text", ["[2,4", "2,4]", "[2,4}", '"abc', "1,,2", "1,"])
def test_split_top_level_rejects_malformed(text):
    with pytest.raises(ScenarioError):
        split_top_level(text)


def test_parse_vary_and_plan_cells(tmp_path):
    vary = parse_vary(["peft.client_ranks=[2,4],[4,8]", "train.lr=1e-3"])
    assert vary == {"peft.client_ranks": ["[2,4]", "[4,8]"], "train.lr": ["1e-3"]}
    cells = plan_cells(["fedavg", "fedprox"], vary, [0, 1], ["federation.rounds=1"], tmp_path)
    assert len(cells) == 2 * 2 * 1 * 2
    ids = [c.cell_id for c in cells]
    assert ids[0] == "fedavg-peft.client_ranks=2_4-train.lr=1e-3-seed0"
    assert ids[3] == "fedavg-peft.client_ranks=4_8-train.lr=1e-3-seed1"
    assert len(set(ids)) == len(ids)
    assert cells[5].overrides == [
        "federation.rounds=1",
        'strategy.name="fedprox"',
        "seed=1",
        "peft.client_ranks=[2,4]",
        "train.lr=1e-3",
    ]
    with pytest.raises(ScenarioError, match="--seeds"):
        parse_vary(["seed=1,2"])
    with pytest.raises(ScenarioError, match="twice"):
        parse_vary(["train.lr=1,2", "train.lr=3"])


# ---------------------------------------------------------------------------- summary


def _run_folder(out: Path, accs, final_loss, up, down, wall, personal=None) -> Path:
    """A run folder in `fedpeft run`'s format: per-round bytes are constant."""
    out.mkdir(parents=True)
    rows = [
        {"round": i, "eval_accuracy": a, "eval_loss": 9.0, "bytes_up": up, "bytes_down": down}
        for i, a in enumerate(accs, 1)
    ]
    rows[-1]["eval_loss"] = final_loss
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = {"eval_accuracy": accs[-1], "eval_loss": final_loss}
    if personal is not None:
        final["personal_accuracy"] = personal
    summary = {
        "final": final,
        "bytes_up_total": up * len(accs),
        "bytes_down_total": down * len(accs),
        "wall_seconds": wall,
    }
    (out / "summary.json").write_text(json.dumps(summary))
    return out


@pytest.fixture
def synthetic_cells(tmp_path):
    cells_dir = tmp_path / "cells"
    avg0 = _run_folder(cells_dir / "a0", [0.2, 0.5, 0.4], 1.0, 1e6, 2e6, 10.0, personal=0.7)
    avg1 = _run_folder(cells_dir / "a1", [0.3, 0.6, 0.8], 0.5, 2e6, 4e6, 20.0, personal=0.9)
    prox0 = _run_folder(cells_dir / "p0", [0.1, 0.3], 2.0, 1e6, 1e6, 30.0)
    (cells_dir / "p1").mkdir()  # failed before writing anything
    (cells_dir / "y0").mkdir()
    return [
        Cell("fedavg", {"train.lr": "1e-3"}, 0, avg0),
        Cell("fedavg", {"train.lr": "1e-3"}, 1, avg1),
        Cell("fedprox", {"train.lr": "1e-3"}, 0, prox0),
        Cell("fedprox", {"train.lr": "1e-3"}, 1, cells_dir / "p1", error="run failed: OOM"),
        Cell("fedyogi", {"train.lr": "1e-3"}, 0, cells_dir / "y0", error="refuses ranks"),
    ]


def test_summarise_cells_by_hand(synthetic_cells):
    avg, prox, yogi = summarise_cells(synthetic_cells)
    # fedavg: finals 0.4, 0.8 -> mean 0.6, population std 0.2; bests 0.5, 0.8 -> 0.65
    assert avg["strategy"] == "fedavg" and avg["train.lr"] == "1e-3" and avg["seeds"] == "2/2"
    assert avg["final_eval_accuracy_mean"] == pytest.approx(0.6)
    assert avg["final_eval_accuracy_std"] == pytest.approx(0.2)
    assert avg["best_eval_accuracy_mean"] == pytest.approx(0.65)
    assert avg["final_eval_loss_mean"] == pytest.approx(0.75)
    assert avg["personal_accuracy_mean"] == pytest.approx(0.8)
    assert avg["bytes_up_total_mean"] == pytest.approx((3e6 + 6e6) / 2)
    assert avg["bytes_down_total_mean"] == pytest.approx((6e6 + 12e6) / 2)
    assert avg["wall_seconds_mean"] == pytest.approx(15.0)
    assert avg["status"] == "ok"
    # fedprox: one of two seeds ok; one seed has std 0; no personalised accuracy
    assert prox["seeds"] == "1/2"
    assert prox["final_eval_accuracy_mean"] == pytest.approx(0.3)
    assert prox["final_eval_accuracy_std"] == 0.0
    assert prox["best_eval_accuracy_mean"] == pytest.approx(0.3)
    assert prox["personal_accuracy_mean"] is None
    assert prox["bytes_up_total_mean"] == pytest.approx(2e6)
    assert prox["status"] == "1/2 failed: run failed: OOM"
    # fedyogi: nothing ran
    assert yogi["seeds"] == "0/1" and yogi["status"] == "failed: refuses ranks"
    assert yogi["final_eval_accuracy_mean"] is None and yogi["wall_seconds_mean"] is None


def test_write_table_and_plots(synthetic_cells, tmp_path):
    out = tmp_path / "out"
    rows = summarise_cells(synthetic_cells)
    write_table(rows, out, "smoke", "fedpeft compare smoke --strategies fedavg,fedprox,fedyogi")
    with (out / "comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["strategy"] for r in table] == ["fedavg", "fedprox", "fedyogi"]
    assert list(table[0])[:3] == ["strategy", "train.lr", "seeds"]
    assert float(table[0]["final_eval_accuracy_std"]) == pytest.approx(0.2)
    assert table[1]["personal_accuracy_mean"] == ""
    assert table[2]["status"] == "failed: refuses ranks"
    md = (out / "comparison.md").read_text().splitlines()
    assert md[0] == "# compare smoke"
    assert "`fedpeft compare smoke --strategies fedavg,fedprox,fedyogi`" in md
    body = [line for line in md if line.startswith("| fed")]
    assert len(body) == 3
    assert (
        "| 0.6000 | 0.2000 | 0.6500 | 0.7500 | 0.8000 |  |  |  | 4500000 | 9000000 | 15.0 | ok |"
        in body[0]
    )
    assert body[2].endswith("| failed: refuses ranks |")

    written = plot_rows(synthetic_cells, out, "smoke")
    assert [p.name for p in written] == [
        "accuracy_vs_bytes_per_client_round.png",
        "accuracy_vs_round.png",
        "accuracy_vs_megabytes.png",
        "accuracy_vs_uplink_megabytes.png",
    ]
    for png in written:
        assert png.parent == out / "plots" and png.read_bytes()[:8] == PNG
    # the fedavg line: per-round means over both seeds, cumulative MB per seed then averaged
    rounds, acc, mb, up = _mean_curve(synthetic_cells[:2])
    assert rounds == [1, 2, 3]
    assert acc == pytest.approx([0.25, 0.55, 0.6])
    assert mb == pytest.approx([4.5, 9.0, 13.5])  # seed 0: 3, 6, 9 MB; seed 1: 6, 12, 18 MB
    assert up == pytest.approx([1.5, 3.0, 4.5])  # uplink only: seed 0 1 MB a round, seed 1 2 MB


def test_a_cell_is_kept_only_if_it_finished_with_the_same_settings(tmp_path):
    from fedpeft.config import load_scenario
    from fedpeft.tools.compare.planning import Cell
    from fedpeft.tools.compare.running import finished_before

    overrides = ["strategy.name='fedavg'", "seed=1", "train.lr=0.01"]
    cell = Cell("fedavg", {"train.lr": "0.01"}, 1, tmp_path / "cell", overrides)
    assert not finished_before("smoke", cell)  # nothing there yet
    cell.out_dir.mkdir()
    scenario = load_scenario("smoke", overrides).to_dict()
    summary = {"scenario": scenario, "rounds_completed": 2}
    (cell.out_dir / "summary.json").write_text(json.dumps(summary))
    assert finished_before("smoke", cell)
    other = Cell("fedavg", {"train.lr": "0.02"}, 1, cell.out_dir, [*overrides[:2], "train.lr=0.02"])
    assert not finished_before("smoke", other)  # same folder, other settings: run again
    (cell.out_dir / "summary.json").write_text(json.dumps({**summary, "rounds_completed": 1}))
    assert not finished_before("smoke", cell)  # stopped early
    (cell.out_dir / "summary.json").write_text("{not json")
    assert not finished_before("smoke", cell)


def test_failure_reason_is_the_last_stderr_line(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("round 1/2 ...\nfedpeft: error: fedavg refuses ranks\n\n")
    assert _reason(log, 2) == "fedavg refuses ranks"
    log.write_text("")
    assert _reason(log, 1) == "exit status 1"
    assert _reason(tmp_path / "missing.txt", -9) == "killed by signal 9"


# ---------------------------------------------------------------------------- end to end


def _compare(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedpeft.tools.cli", "compare", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


#: one `fedpeft run` process per cell, its clients served in process (the comparison, not
#: the engine, is under test here; Ray runs in test_e2e, test_resume and test_cluster):
#: personal metrics (FedSA-LoRA), base deltas in every message (FLoRA), per-node ranks
#: (HetLoRA)
CELLS = ["fedsa_lora", "flora", "hetlora"]


@pytest.mark.slow(65)
def test_compare_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "smoke", "--strategies", "fedavg,nosuch"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "nosuch" in lines[0], lines
    assert not (tmp_path / "runs").exists()

    out = tmp_path / "cmp"
    args = ["smoke", "--strategies", ",".join(CELLS), "--set", "federation.rounds=1"]
    args += ["--set", 'simulation.engine="in-process"']
    proc = _compare(*args, "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (out / "comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["strategy"] for r in table] == CELLS
    for row in table:
        assert row["status"] == "ok" and row["seeds"] == "1/1"
        assert 0.0 <= float(row["final_eval_accuracy_mean"]) <= 1.0
        assert float(row["final_eval_accuracy_std"]) == 0.0
        assert float(row["bytes_up_total_mean"]) > 0
    body = [ln for ln in (out / "comparison.md").read_text().splitlines() if ln.endswith("| ok |")]
    assert len(body) == len(CELLS)
    for strategy in CELLS:
        cell = out / "cells" / f"{strategy}-seed0"
        summary = json.loads((cell / "summary.json").read_text())
        assert summary["scenario"]["strategy"]["name"] == strategy
        assert summary["rounds_completed"] == 1 and summary["engine"] == "in-process"
        assert (cell / "log.txt").is_file()
        assert f"{strategy}-seed0: eval_accuracy" in proc.stderr
    fedsa = json.loads((out / "cells" / "fedsa_lora-seed0" / "summary.json").read_text())
    assert 0.0 <= fedsa["final"]["personal_accuracy"] <= 1.0
    for png in ("accuracy_vs_round.png", "accuracy_vs_megabytes.png"):
        assert (out / "plots" / png).read_bytes()[:8] == PNG
    # rerun into the same folder (in process: nothing starts): the finished cells are kept
    table_before = (out / "comparison.csv").read_text()
    capsys.readouterr()
    assert main(["compare", *args, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("finished before, kept") == len(CELLS), err[-3000:]
    assert (out / "comparison.csv").read_text() == table_before
