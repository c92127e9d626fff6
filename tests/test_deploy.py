"""``fedpeft deploy``: certificates, node keys, and a real SuperLink with TLS and node auth.

The live test starts Flower's own SuperLink and SuperNodes on 127.0.0.1 (free ports the
test picks), registers one node's key with Flower's CLI, and checks that the registered
node joins and an unregistered one is refused; it stops every process it started, by PID.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from procs import CONTRACT_ROW_KEYS, SUMMARY_KEYS, interrupt_fedpeft, run_fedpeft

from fedpeft.tools.cli import main
from fedpeft.tools.deploy import (
    APP_CONFIG,
    CA_CERT,
    READY_SUPERLINK,
    READY_SUPERNODE,
    REFUSED_SUPERNODE,
    SERVER_CERT,
    SERVER_KEY,
    DeployError,
    Processes,
    SuperLinkOptions,
    SuperNodeOptions,
    deploy_env,
    flower_bin,
    free_port,
    make_certs,
    make_node_key,
    superlink_command,
    supernode_command,
    wait_for_text,
    write_app,
    write_connection,
    write_run_config,
)


def test_certs_chain_to_the_ca_and_name_every_host(tmp_path) -> None:
    paths = make_certs(tmp_path, ["fl.example.org", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate(paths[CA_CERT].read_bytes())
    server = x509.load_pem_x509_certificate(paths[SERVER_CERT].read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert ips == {"10.1.2.3", "127.0.0.1"}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (paths[SERVER_KEY].stat().st_mode & 0o777) == 0o600
    with pytest.raises(DeployError, match="not a host name"):
        make_certs(tmp_path / "bad", ["two words"])


def test_node_key_is_the_openssh_ec_key_flower_reads_and_is_never_overwritten(tmp_path) -> None:
    private, public = make_node_key(tmp_path / "keys" / "node0")
    key = load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert (private.stat().st_mode & 0o777) == 0o600
    with pytest.raises(DeployError, match="never overwritten"):
        make_node_key(private)


def test_a_superlink_without_certificates_or_insecure_exits_2_in_one_line(capsys) -> None:
    assert main(["deploy", "superlink"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--certs DIR" in err and "--insecure" in err


def test_superlink_command_is_tls_and_auth_by_default(tmp_path) -> None:
    make_certs(tmp_path, ["localhost"])
    cmd = superlink_command(SuperLinkOptions(certs=tmp_path, port=9999))
    assert cmd[0].endswith("flower-superlink")
    flags = ["--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"]
    for flag in [*flags, "--disable-runtime-dependency-installation"]:
        assert flag in cmd
    assert "--insecure" not in cmd
    plain = superlink_command(SuperLinkOptions(insecure=True))
    assert "--insecure" in plain and "--enable-supernode-auth" not in plain
    with pytest.raises(DeployError, match="lacks"):
        superlink_command(SuperLinkOptions(certs=tmp_path / "empty"))


def test_supernode_command_carries_the_node_config_and_refuses_what_cannot_work(tmp_path):
    make_certs(tmp_path, ["localhost"])
    key, _ = make_node_key(tmp_path / "node0")
    opts = SuperNodeOptions(
        "10.0.0.1:8000",
        1,
        3,
        certs=tmp_path,
        key=key,
        device="cuda:0",
        rank=4,
        state_dir=tmp_path / "state",
    )
    cmd = supernode_command(opts)
    config = cmd[cmd.index("--node-config") + 1]
    assert config == (
        f'partition-id=1 num-partitions=3 rank=4 device="cuda:0" '
        f'state-dir="{(tmp_path / "state").resolve()}"'
    )
    parsed = tomllib.loads("\n".join(config.split(" ")))  # Flower reads each value as TOML
    assert parsed["partition-id"] == 1 and parsed["device"] == "cuda:0"
    assert cmd[cmd.index("--root-certificates") + 1] == str((tmp_path / CA_CERT).resolve())
    assert "--auth-supernode-private-key" in cmd and "--insecure" not in cmd
    for bad, match in [
        (dataclasses.replace(opts, partition_id=3), "must be in 0..2"),
        (dataclasses.replace(opts, certs=None), "needs the federation's CA"),
        (dataclasses.replace(opts, insecure=True), "takes no --certs"),
        (dataclasses.replace(opts, device="tpu"), "expected cpu"),
    ]:
        with pytest.raises(DeployError, match=match):
            supernode_command(bad)


@pytest.mark.slow(15)
def test_a_registered_node_joins_a_tls_superlink_and_an_unregistered_one_is_refused(
    tmp_path,
) -> None:
    certs, home = tmp_path / "certs", tmp_path / "flwr-home"
    make_certs(certs, ["localhost"])
    good, good_pub = make_node_key(tmp_path / "keys" / "good")
    stranger, _ = make_node_key(tmp_path / "keys" / "stranger")
    port = free_port()
    connection = write_connection(home, f"127.0.0.1:{port}", certs / CA_CERT)
    procs = Processes({**deploy_env(), "FLWR_HOME": str(home)}, cwd=tmp_path)

    def supernode(key: Path, node_port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "fedpeft.tools.cli",
            "deploy",
            "supernode",
            "--superlink",
            f"127.0.0.1:{port}",
            "--partition-id",
            "0",
            "--num-partitions",
            "1",
            "--certs",
            str(certs),
            "--key",
            str(key),
            "--port",
            str(node_port),
        ]

    try:
        link_log = tmp_path / "superlink.log"
        command = ["deploy", "superlink", "--certs", str(certs), "--host", "127.0.0.1"]
        link = procs.start(
            "superlink",
            [sys.executable, "-m", "fedpeft.tools.cli", *command, "--port", str(port)],
            link_log,
        )
        assert wait_for_text(link_log, READY_SUPERLINK, link, 60), link_log.read_text()
        registered = subprocess.run(
            [flower_bin("flwr"), "supernode", "register", str(good_pub), connection],
            env=procs.env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert registered.returncode == 0, registered.stdout + registered.stderr
        node_log, stranger_log = tmp_path / "good.log", tmp_path / "stranger.log"
        node = procs.start("good", supernode(good, free_port()), node_log)
        refused = procs.start("stranger", supernode(stranger, free_port()), stranger_log)
        assert wait_for_text(node_log, READY_SUPERNODE, node, 60), node_log.read_text()
        assert refused.wait(timeout=60) != 0
        assert REFUSED_SUPERNODE in stranger_log.read_text()
        assert node.poll() is None and link.poll() is None  # the federation goes on
    finally:
        procs.stop_all()  # only what this test started, by PID
    assert all(proc.poll() is not None for _, proc in procs.started)


def _kill_trainer_in_round_one(log: Path, killed: list[int], done: threading.Event) -> None:
    """Kill the trainer writing ``log`` once it has started a round-1 training message."""
    while not done.is_set():
        text = log.read_text() if log.exists() else ""
        if "train message (round 1) starts" in text:
            pid = int(re.findall(r"listening on .* \(pid (\d+)\)", text)[0])
            os.kill(pid, signal.SIGKILL)  # a trainer this test's deployment started
            killed.append(pid)
            return
        time.sleep(0.05)


@pytest.mark.slow(100)
def test_deploy_local_runs_a_secure_federation_refuses_a_stranger_and_stops_everything(
    tmp_path,
) -> None:
    """Also: node 0's trainer is killed mid-task; the round counts it failed, then it is back."""
    out = tmp_path / "out"
    killed: list[int] = []
    done = threading.Event()
    killer = threading.Thread(
        target=_kill_trainer_in_round_one,
        args=(out / "deploy/logs/trainer-0.log", killed, done),
    )
    killer.start()
    proc = run_fedpeft(
        "deploy",
        "local",
        "smoke",
        "--nodes",
        "2",
        "--unregistered",
        "1",
        "--set",
        "federation.rounds=2",
        "--set",
        "train.local_steps=20",  # a round-1 message long enough to be killed in
        "--out",
        str(out),
        cwd=tmp_path,
        timeout=420,
    )
    done.set()
    killer.join()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the outputs of a simulation, from a deployment with TLS and node authentication
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert len(killed) == 1
    assert rows[0]["clients_failed"] == 1  # the node whose trainer died mid-message
    # answered at once by the restarted trainer, not a minute later by Flower's heartbeats
    assert "the node's trainer died during this task" in rows[0]["failures"][0]
    assert [c["partition-id"] for c in rows[0]["client_metrics"]] == [1]
    for row in rows[1:]:  # its trainer was restarted: both nodes train in round 2
        assert row["clients_sampled"] == 2 and row["clients_failed"] == 0
        assert sorted(c["partition-id"] for c in row["client_metrics"]) == [0, 1]
        # each trainer built its model once and kept it (node 0's new trainer: once too)
        assert [c["model_loads"] for c in row["client_metrics"]] == [1, 1]
    for row in rows:
        assert CONTRACT_ROW_KEYS <= set(row)
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["engine"] == "deployment" and summary["secure"] is True
    assert summary["scenario"]["data"]["num_clients"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "plots" / "metrics_vs_round.png").read_bytes()[:4] == b"\x89PNG"
    # the unregistered node was refused by the SuperLink, and the run went on without it
    record = json.loads((out / "deploy" / "deployment.json").read_text())
    assert [s["refused"] for s in record["strangers"]] == [True]
    assert len({n["node_id"] for n in record["nodes"]}) == 2
    stranger_log = Path(record["strangers"][0]["log"]).read_text()
    assert "Failed to activate SuperNode" in stranger_log
    assert [t["restarts"] for t in record["trainers"]] == [1, 0]
    # every process it started was stopped (run_fedpeft also checks none is left)
    assert all(not psutil.pid_exists(p["pid"]) or _is_zombie(p["pid"]) for p in record["stopped"])


def _is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow(50)
def test_an_interrupted_deploy_local_stops_every_process_it_started(tmp_path) -> None:
    code = interrupt_fedpeft(
        "deploy",
        "local",
        "smoke",
        "--nodes",
        "2",
        "--set",
        "federation.rounds=50",
        "--out",
        str(tmp_path / "out"),
        cwd=tmp_path,
        # the federation is up: SuperLink, SuperNodes and the app processes that answered
        # the partition query and evaluated the initial adapter
        after="round 0 ",
        sig=signal.SIGTERM,
    ).code
    assert code == 130  # and interrupt_fedpeft checked that no process was left behind
    assert (tmp_path / "out" / "deploy" / "deployment.json").is_file()


def test_the_deployed_app_declares_the_run_config_keys_of_the_repository_app(tmp_path) -> None:
    """`flwr run` refuses run-config keys the FAB's pyproject does not declare."""
    repo = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    app = tomllib.loads((write_app(tmp_path / "app") / "pyproject.toml").read_text())
    assert app["tool"]["flwr"]["app"]["config"] == repo["tool"]["flwr"]["app"]["config"]
    assert app["tool"]["flwr"]["app"]["components"] == repo["tool"]["flwr"]["app"]["components"]
    config = tomllib.loads(
        write_run_config(tmp_path / "rc.toml", '{"a": "b \\" c"}', "/x", secure=True).read_text()
    )
    assert set(config) <= set(APP_CONFIG) and config["scenario-json"] == '{"a": "b \\" c"}'
    assert config["engine"] == "deployment" and config["secure"] is True


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--superlink", "https://h:8000", "--insecure"], "expected HOST:PORT"),
        (["--superlink", "h:8000"], "--certs DIR"),
        (["--superlink", "h:8000", "--insecure", "--certs", "c"], "not both"),
        (["--superlink", "h:8000", "--insecure", "--set", "strategy.name=nope"], "nope"),
    ],
)
def test_deploy_run_refuses_bad_arguments_in_one_line(args, expected, capsys) -> None:
    assert main(["deploy", "run", "smoke", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err


def test_a_supernode_may_bring_its_own_data_file(tmp_path) -> None:
    own = tmp_path / "mine.csv"
    own.write_text("text,label\nx,noun.act\n")
    opts = SuperNodeOptions("h:8000", 0, 2, insecure=True, data=own)
    config = supernode_command(opts)[supernode_command(opts).index("--node-config") + 1]
    assert tomllib.loads("\n".join(config.split(" ")))["data-path"] == str(own.resolve())
    with pytest.raises(DeployError, match="no such file"):
        supernode_command(dataclasses.replace(opts, data=tmp_path / "nope.csv"))


def test_stop_all_reaches_children_that_left_the_process_group(tmp_path) -> None:
    from fedpeft.tools.deploy import descendants

    procs = Processes(dict(os.environ), cwd=tmp_path)
    # a parent whose child detaches into its own session, as Flower's SuperExec does
    parent = procs.start("parent", ["sh", "-c", "setsid sleep 300 & sleep 300"], tmp_path / "l")
    deadline = time.monotonic() + 10
    while len(descendants(parent.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    family = descendants(parent.pid)
    assert len(family) == 2
    detached = [p for p in family if os.getpgid(p) != parent.pid]
    assert len(detached) == 1  # out of reach of a group signal
    procs.stop_all(grace=5)
    assert parent.poll() is not None
    assert not any(psutil.pid_exists(p) and not _is_zombie(p) for p in family)
