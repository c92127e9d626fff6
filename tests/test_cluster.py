"""Simulation on a Ray cluster the user runs: fedpeft joins it, spreads over it, leaves it up.

The test starts a two-node cluster on 127.0.0.1 with Ray's own ``ray start`` (a head and a
worker, one CPU each), runs ``smoke`` on it, and stops exactly the processes it started,
by PID (they carry this test's environment marker).
"""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from procs import kill_pids, pids_marked, run_fedpeft

from fedpeft.tools.deploy import free_port

RAY = str(Path(sys.executable).parent / "ray")


def _start(args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(
        [RAY, "start", *args, "--disable-usage-stats"],
        env=env,
        text=True,
        capture_output=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _stop(marker: str) -> None:
    """Stop every process this test's cluster started (by PID), and wait for them to go."""
    for _ in range(3):
        pids = pids_marked(marker)
        if not pids:
            return
        kill_pids(pids)
        psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=10)
        time.sleep(0.5)


def _names(pids: set[int]) -> list[str]:
    names = []
    for pid in pids:
        try:
            names.append(psutil.Process(pid).name())
        except psutil.NoSuchProcess:
            continue
    return sorted(names)


@pytest.mark.slow(50)
def test_smoke_on_a_two_node_ray_cluster_spreads_and_leaves_it_running(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    env = {**os.environ, "FEDPEFT_TEST_RUN": marker, "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    try:
        _start(
            [
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={port}",
                "--num-cpus=1",
                '--resources={"head": 1}',
                "--include-dashboard=false",
            ],
            env,
        )
        _start(
            [
                f"--address={address}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=1",
                '--resources={"worker": 1}',
            ],
            env,
        )
        daemons = {
            p for p in pids_marked(marker) if _names({p})[:1] in (["raylet"], ["gcs_server"])
        }
        assert _names(daemons) == ["gcs_server", "raylet", "raylet"]

        out = tmp_path / "run"
        # HetLoRA: each node's own rank, learned by discovery, reaches it through Ray
        hetlora = ["--set", 'strategy.name="hetlora"', "--set", "peft.client_ranks=[2, 4]"]
        done = run_fedpeft(
            "run", "smoke", *hetlora, "--ray-address", address, "--out", str(out), cwd=tmp_path
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"joined the Ray cluster at {address}: 2 node(s), 2 CPUs" in done.stdout

        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        nodes = {c["ray_node"] for row in rows for c in row["client_metrics"]}
        assert len(nodes) == 2, nodes  # one virtual client per one-CPU node: both did work
        ranks = {c["partition-id"]: c["rank"] for row in rows for c in row["client_metrics"]}
        assert ranks == {0: 2, 1: 4}
        summary = json.loads((out / "summary.json").read_text())
        assert summary["scenario"]["simulation"]["ray_address"] == address
        assert summary["rounds_completed"] == 2

        # fedpeft disconnected; the cluster it joined is still up
        time.sleep(2)
        assert all(psutil.pid_exists(p) for p in daemons)
        alive = [p for p in daemons if psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert len(alive) == 3
    finally:
        _stop(marker)
        # `ray start --head` notes its address for later `ray.init()` calls; it is ours
        note = Path("/tmp/ray/ray_current_cluster")
        if note.is_file() and note.read_text().strip().endswith(f":{port}"):
            note.unlink()
    assert not pids_marked(marker)


@pytest.mark.slow(10)
def test_an_address_where_no_cluster_listens_fails_in_one_line(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    proc = run_fedpeft(
        "run", "smoke", "--ray-address", f"127.0.0.1:{port}", cwd=tmp_path, timeout=60
    )
    assert proc.returncode == 2
    assert "no Ray cluster answers" in proc.stderr and proc.stderr.count("\n") == 1
