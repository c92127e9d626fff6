"""Flower's own processes: where their programs are, their environment, their command lines.

``flower-superlink`` and ``flower-supernode`` start with TLS and SuperNode authentication
unless ``--insecure`` is asked for explicitly; every process gets no telemetry and no
runtime dependency installation.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from fedpeft.tools.deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY
from fedpeft.tools.deploy.errors import DeployError


def flower_bin(name: str) -> str:
    """Path of a Flower executable: next to this Python first (the venv), then on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"{name} not found next to {sys.executable} or on PATH; install flwr")
    return found


def deploy_env() -> dict[str, str]:
    """Environment for every Flower process fedpeft starts: no telemetry, no installs.

    This Python's folder goes first on PATH: the SuperLink and SuperNodes start
    ``flower-superexec`` and ``flwr-clientapp`` by name, from the same environment.
    """
    from fedpeft.tools.simulation import QUIET_ENV  # imports Flower: only when needed

    bin_dir = str(Path(sys.executable).parent)
    return {
        **QUIET_ENV,
        **os.environ,
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
        "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # a SuperNode's SuperExec looks for new messages every 1 s by default; every
        # message starts a ClientApp process, so each poll saved is a round's latency
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": os.environ.get(
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1"
        ),
    }


@dataclass
class SuperLinkOptions:
    """What ``fedpeft deploy superlink`` starts."""

    certs: Path | None = None  # folder from `fedpeft deploy certs`
    insecure: bool = False
    host: str = "0.0.0.0"
    port: int = 8000
    auth: bool = True  # SuperNode authentication (needs TLS)
    database: Path | None = None  # SuperLink state; default: in memory


def superlink_command(opts: SuperLinkOptions) -> list[str]:
    """The ``flower-superlink`` command line; refuses to run in plain text by accident."""
    if opts.certs is None and not opts.insecure:
        raise DeployError(
            "the SuperLink needs TLS: pass --certs DIR (make one with `fedpeft deploy certs "
            "DIR --host NAME_OR_IP`), or --insecure for plain text on a trusted network"
        )
    if opts.certs is not None and opts.insecure:
        raise DeployError("pass either --certs DIR or --insecure, not both")
    cmd = [
        flower_bin("flower-superlink"),
        "--host",
        opts.host,
        "--port",
        str(opts.port),
        "--disable-runtime-dependency-installation",
    ]
    if opts.certs is not None:
        certs = opts.certs.resolve()
        missing = [n for n in (CA_CERT, SERVER_CERT, SERVER_KEY) if not (certs / n).is_file()]
        if missing:
            raise DeployError(
                f"{certs} lacks {', '.join(missing)}; make them with `fedpeft deploy certs {certs}"
                " --host NAME_OR_IP`"
            )
        cmd += [
            "--ssl-ca-certfile",
            str(certs / CA_CERT),
            "--ssl-certfile",
            str(certs / SERVER_CERT),
            "--ssl-keyfile",
            str(certs / SERVER_KEY),
        ]
        if opts.auth:
            cmd.append("--enable-supernode-auth")
    else:
        cmd.append("--insecure")
    if opts.database is not None:
        cmd += ["--database", str(opts.database)]
    return cmd


@dataclass
class SuperNodeOptions:
    """What ``fedpeft deploy supernode`` starts."""

    superlink: str  # HOST:PORT of the SuperLink
    partition_id: int
    num_partitions: int
    certs: Path | None = None  # a folder holding ca.crt (or the ca.crt file itself)
    key: Path | None = None  # this node's private key, from `fedpeft deploy node-key`
    insecure: bool = False
    port: int = 9094  # this node's own Runtime API (distinct per node on one host)
    device: str | None = None  # cuda:0, cpu, mps; default: the scenario's model.device
    rank: int | None = None  # this node's LoRA rank, for heterogeneous-rank strategies
    state_dir: Path | None = None  # per-client state (personal factors, codec residuals)
    data: Path | None = None  # this node's own csv/jsonl/parquet file, in place of a partition
    trainer_socket: Path | None = None  # the trainer its per-message forwarders call
    #: the node's SuperExec secret: its trainer runs the node's tasks (isolation "process")
    executor_secret: Path | None = None
    poll_interval: float | None = None  # seconds between empty pulls (None: Flower's 3 s)


def node_config(opts: SuperNodeOptions) -> str:
    """Flower's ``--node-config`` string: space-separated ``key=TOML value`` pairs."""
    if not 0 <= opts.partition_id < opts.num_partitions:
        raise DeployError(
            f"--partition-id {opts.partition_id} must be in 0..{opts.num_partitions - 1} "
            f"(--num-partitions {opts.num_partitions})"
        )
    pairs = [f"partition-id={opts.partition_id}", f"num-partitions={opts.num_partitions}"]
    if opts.rank is not None:
        if opts.rank < 1:
            raise DeployError(f"--rank must be a positive integer, got {opts.rank}")
        pairs.append(f"rank={opts.rank}")
    if opts.device is not None:
        if opts.device.split(":")[0] not in {"cpu", "cuda", "mps"}:
            raise DeployError(f"--device {opts.device!r}: expected cpu, cuda, cuda:N or mps")
        pairs.append(f'device="{opts.device}"')
    if opts.state_dir is not None:
        pairs.append(f'state-dir="{opts.state_dir.resolve()}"')
    if opts.data is not None:
        if not opts.data.is_file():
            raise DeployError(f"--data {opts.data}: no such file")
        pairs.append(f'data-path="{opts.data.resolve()}"')
    if opts.trainer_socket is not None:
        pairs.append(f'trainer-socket="{opts.trainer_socket}"')
    return " ".join(pairs)


def supernode_command(opts: SuperNodeOptions) -> list[str]:
    """The ``flower-supernode`` command line: TLS and a node key unless ``insecure``.

    With ``poll_interval`` the node runs through :mod:`fedpeft.tools.deploy.poll`, which
    says so in its log and shortens Flower's fixed 3 s wait between empty pulls.
    """
    if opts.poll_interval is None:
        program = [flower_bin("flower-supernode")]
    elif 0 < opts.poll_interval <= 3:
        program = [sys.executable, "-m", "fedpeft.tools.deploy.poll", str(opts.poll_interval)]
    else:
        raise DeployError(f"--poll-interval {opts.poll_interval}: expected seconds in (0, 3]")
    cmd = [
        *program,
        "--superlink",
        opts.superlink,
        "--port",
        str(opts.port),
        "--node-config",
        node_config(opts),
    ]
    if opts.executor_secret is not None:  # no flwr-clientapp per message: the trainer runs them
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(opts.executor_secret)]
    if opts.insecure:
        if opts.certs is not None or opts.key is not None:
            raise DeployError("--insecure takes no --certs or --key (plain text has no TLS)")
        return [*cmd, "--insecure"]
    if opts.certs is None:
        raise DeployError(
            "the SuperNode needs the federation's CA: pass --certs DIR (or the ca.crt file), "
            "or --insecure for a plain-text SuperLink"
        )
    ca = opts.certs / CA_CERT if opts.certs.is_dir() else opts.certs
    if not ca.is_file():
        raise DeployError(f"no CA certificate at {ca}")
    cmd += ["--root-certificates", str(ca.resolve())]
    if opts.key is not None:
        if not opts.key.is_file():
            raise DeployError(f"no node key at {opts.key}; make one with `fedpeft deploy node-key`")
        cmd += ["--auth-supernode-private-key", str(opts.key.resolve())]
    return cmd


def check_superlink_address(address: str) -> str:
    """``HOST:PORT`` as Flower takes it (no scheme), or a one-line DeployError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or "://" in address:
        raise DeployError(f"--superlink {address!r}: expected HOST:PORT, e.g. 10.0.0.5:8000")
    return address
