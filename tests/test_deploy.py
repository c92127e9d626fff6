"""``fedpeft deploy``: certificates, node keys, and a real SuperLink with TLS and node auth.

The live test starts Flower's own SuperLink and SuperNodes on 127.0.0.1 (free ports the
test picks), registers one node's key with Flower's CLI, and checks that the registered
node joins and an unregistered one is refused; it stops every process it started, by PID.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedpeft.cli import main
from fedpeft.deploy import (
    CA_CERT,
    SERVER_CERT,
    SERVER_KEY,
    DeployError,
    SuperLinkOptions,
    SuperNodeOptions,
    deploy_env,
    flower_bin,
    make_certs,
    make_node_key,
    superlink_command,
    supernode_command,
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
    opts = SuperNodeOptions("10.0.0.1:8000", 1, 3, certs=tmp_path, key=key, device="cuda:0",
                            rank=4, state_dir=tmp_path / "state")  # fmt: skip
    cmd = supernode_command(opts)
    config = cmd[cmd.index("--node-config") + 1]
    assert config == (f'partition-id=1 num-partitions=3 rank=4 device="cuda:0" '
                      f'state-dir="{(tmp_path / "state").resolve()}"')  # fmt: skip
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(path: Path, text: str, proc: subprocess.Popen, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        if proc.poll() is not None:
            return text in path.read_text(errors="replace") if path.exists() else False
        time.sleep(0.2)
    return False


def test_a_registered_node_joins_a_tls_superlink_and_an_unregistered_one_is_refused(
    tmp_path,
) -> None:
    certs, home = tmp_path / "certs", tmp_path / "flwr-home"
    make_certs(certs, ["localhost"])
    good, good_pub = make_node_key(tmp_path / "keys" / "good")
    stranger, _ = make_node_key(tmp_path / "keys" / "stranger")
    port = _free_port()
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{(certs / CA_CERT).resolve()}"\n'
    )
    env = {**deploy_env(), "FLWR_HOME": str(home)}
    started: list[subprocess.Popen] = []

    def spawn(args: list[str], log: Path) -> subprocess.Popen:
        with log.open("w") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=tmp_path, start_new_session=True)  # fmt: skip
        started.append(proc)
        return proc

    def supernode(key: Path, node_port: int) -> list[str]:
        return [sys.executable, "-m", "fedpeft.cli", "deploy", "supernode", "--superlink",
                f"127.0.0.1:{port}", "--partition-id", "0", "--num-partitions", "1",
                "--certs", str(certs), "--key", str(key), "--port", str(node_port)]  # fmt: skip

    try:
        link_log = tmp_path / "superlink.log"
        command = ["deploy", "superlink", "--certs", str(certs), "--host", "127.0.0.1"]
        link = spawn([sys.executable, "-m", "fedpeft.cli", *command, "--port", str(port)], link_log)
        assert _wait_for(link_log, "Uvicorn running on https://", link, 60), link_log.read_text()
        registered = subprocess.run(
            [flower_bin("flwr"), "supernode", "register", str(good_pub), "test"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert registered.returncode == 0, registered.stdout + registered.stderr
        node_log, stranger_log = tmp_path / "good.log", tmp_path / "stranger.log"
        node = spawn(supernode(good, _free_port()), node_log)
        refused = spawn(supernode(stranger, _free_port()), stranger_log)
        assert _wait_for(node_log, "SuperNode ID", node, 60), node_log.read_text()
        assert refused.wait(timeout=60) != 0
        assert "Failed to activate SuperNode" in stranger_log.read_text()
        assert node.poll() is None and link.poll() is None  # the federation goes on
    finally:
        for proc in reversed(started):  # only what this test started, by PID
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
    assert all(proc.poll() is not None for proc in started)
