"""``fedpeft bench`` writes RESULTS.md from the benchmarks' results; verdicts follow the numbers."""

import json
from pathlib import Path

import pytest

from fedpeft.tools import bench
from fedpeft.tools.cli import main


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(bench, "BENCH", tmp_path)
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    return tmp_path / "results"


def test_verdicts_follow_the_measured_numbers(results: Path) -> None:
    (results / "overhead.json").write_text(
        json.dumps(
            {
                "end_to_end_ratio": 1.1,
                "later_round_ratio": 1.2,
                "command": "python benchmarks/overhead.py --scenario smoke",
            }
        )
    )
    (results / "scale_memory.json").write_text(
        json.dumps(
            {
                "results": {
                    "fedavg": [
                        {"clients": 10, "server_peak_memory_mb": 100.0},
                        {"clients": 1000, "server_peak_memory_mb": 130.0},
                    ]
                }
            }
        )
    )
    rows = {t: (m, v) for t, _, m, v in bench.targets()}
    assert rows["framework overhead, end to end"] == ("1.10x (smoke)", "met")
    assert rows["framework overhead, rounds after the first"] == ("1.200x (smoke)", "gap")
    assert rows["server memory, 1,000 vs 10 clients (10 per round)"] == ("1.300x", "gap")
    assert rows["federated vs centralised LoRA"] == ("not measured", "gap")
    ranked = "strategies ranked under non-IID data with heterogeneous ranks"
    assert rows[ranked] == ("not measured (python benchmarks/ranking.py)", "gap")
    (results / "ranking.json").write_text(
        json.dumps(
            {
                "results": [
                    {"strategy": "flexlora", "final_accuracy": 0.243},
                    {"strategy": "flora", "final_accuracy": 0.232},
                ]
            }
        )
    )
    rows = {t: (m, v) for t, _, m, v in bench.targets()}
    assert rows[ranked] == (
        "flexlora 0.243 > flora 0.232 (Dirichlet 0.1, ranks 4/8/16)",
        "reported",
    )


def test_results_md_holds_the_targets_and_each_benchmarks_tables(results: Path) -> None:
    (results / "aggregation.md").write_text("# Aggregation cost on the server\n\n| a |\n")
    bench.write_results(quick=True, ran={"aggregation": "ok in 3 s"}, seconds=180.0)
    text = (results.parent / "RESULTS.md").read_text()
    assert "`fedpeft bench --quick`" in text and "| target | goal | measured | verdict |" in text
    assert "## Aggregation cost on the server" in text and "aggregation ok in 3 s" in text


def test_an_unknown_benchmark_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--only", "nope"]) == 2
    assert "unknown benchmark(s) nope" in capsys.readouterr().err


def test_a_factored_svd_slower_than_10x_at_any_size_is_a_gap_with_its_reason(
    results: Path,
) -> None:
    svd = [
        {"clients": 10, "d": 4096, "r": 16, "flexlora_speedup": 526.0, "flexlora_rel_diff": 3e-14},
        {"clients": 100, "d": 4096, "r": 16, "flexlora_speedup": 9.9, "flexlora_rel_diff": 2e-13},
    ]
    (results / "aggregation.json").write_text(json.dumps({"svd": svd, "strategies": []}))
    row = {t: (m, v) for t, _, m, v in bench.targets()}[
        "factored vs dense SVD at d = 4096 (FlexLoRA)"
    ]
    assert row[0] == "526.0x at K=10, 9.9x at K=100; relative difference 2e-13"
    assert row[1].startswith("gap at K=100: the stacked factors' rank K*r = 1600 is 0.39 of d")
    (results / "aggregation.json").write_text(json.dumps({"svd": svd[:1], "strategies": []}))
    row = {t: (m, v) for t, _, m, v in bench.targets()}[
        "factored vs dense SVD at d = 4096 (FlexLoRA)"
    ]
    assert row[1] == "met"
