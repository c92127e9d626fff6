"""Shared test settings: nothing may reach the internet; Flower and Ray stay quiet."""

from __future__ import annotations

import os
import subprocess

import pytest
from filelock import FileLock
from procs import MINILM_RUN, run_fedpeft, session_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slowest tests first (``@pytest.mark.slow(seconds)``: about what each takes alone
    on 2 cores): pytest-xdist hands tests out one at a time in this order, so the long ones
    start early, on every worker, instead of ending the suite on one."""

    def seconds(item: pytest.Item) -> float:
        mark = item.get_closest_marker("slow")
        return float(mark.args[0]) if mark is not None and mark.args else 0.0

    items.sort(key=seconds, reverse=True)


@pytest.fixture(scope="session")
def minilm_run(tmp_path_factory, worker_id):
    """`smoke` on the real pretrained MiniLM, run from an unrelated folder.

    Run once per session: under pytest-xdist the first worker that needs it runs it, in the
    session's common folder, and the others wait for it and read what it left.
    """
    shared = session_folder(tmp_path_factory, worker_id)
    with FileLock(str(shared / "minilm_run.lock")):
        cwd = shared / "minilm-elsewhere"
        if not (cwd / "returncode").exists():
            cwd.mkdir()
            done = run_fedpeft(*MINILM_RUN, "--out", str(cwd / "out"), cwd=cwd)
            (cwd / "stdout").write_text(done.stdout)
            (cwd / "stderr").write_text(done.stderr)
            (cwd / "returncode").write_text(str(done.returncode))
        args = ["fedpeft", "run", "smoke"]
        code, stdout, stderr = (
            (cwd / name).read_text() for name in ("returncode", "stdout", "stderr")
        )
    proc = subprocess.CompletedProcess(args, int(code), stdout, stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "out", proc


@pytest.fixture(autouse=True)
def _no_run_plots_in_process(monkeypatch):
    """Runs in this process skip their two PNGs (matplotlib: about 0.6 s a run, and the suite
    runs some two hundred). Runs in fresh processes draw them, and test_e2e, test_deploy and
    test_compare check them there."""
    monkeypatch.setattr("fedpeft.server.outputs.plot_run", lambda *args, **kwargs: [])


@pytest.fixture
def quiet_env(monkeypatch):
    """For ``fedpeft.tools.cli.main([...])`` in process: undo the settings it makes."""
    from fedpeft.tools.simulation import QUIET_ENV

    for key in QUIET_ENV:
        monkeypatch.setenv(key, os.environ.get(key, ""))
        if not os.environ[key]:
            monkeypatch.delenv(key)


@pytest.fixture
def moved_from_initial(tmp_path):
    """``moved(scenario, out_dir)``: L2 distance of a run's saved adapter from its initial one."""
    import math

    from safetensors.torch import load_file

    from fedpeft.adapter_files import save_adapter
    from fedpeft.adapters import set_adapter_state
    from fedpeft.data import load_task_data
    from fedpeft.models import cached_peft_model, initial_adapter_state

    def moved(scenario, out_dir) -> float:
        labels = load_task_data(scenario.data).num_labels
        peft_cfg = scenario.peft_for_rank(scenario.max_rank)
        model = cached_peft_model(scenario.model, peft_cfg, labels, scenario.seed)
        initial = initial_adapter_state(scenario.model, peft_cfg, labels, scenario.seed)
        set_adapter_state(model, initial)
        save_adapter(model, tmp_path / "initial-adapter")
        start = load_file(tmp_path / "initial-adapter" / "adapter_model.safetensors")
        end = load_file(out_dir / "adapter" / "adapter_model.safetensors")
        return math.sqrt(sum(float((end[k] - start[k]).double().square().sum()) for k in start))

    return moved
