"""Deployment helpers: certificates, SuperNode keys, and Flower's SuperLink command line.

``fedpeft deploy`` is a thin, documented layer over Flower's own deployment engine
(``flower-superlink``, ``flower-supernode``, ``flwr``); it writes no transport of its own.
What it adds is safe defaults: TLS and SuperNode authentication unless ``--insecure`` is
asked for explicitly, certificates whose names cover every address in use, one key pair per
node in the format Flower 1.42 reads, no runtime dependency installation, no telemetry.

Flower 1.42 facts this relies on (docs/dev/flower-1.42-deployment-notes.md):
- The SuperLink serves its Fleet, Control and Runtime APIs over HTTPS on one port
  (``--host``/``--port``, default 127.0.0.1:8000). Its internal SuperExec connects to
  127.0.0.1, so the server certificate always names 127.0.0.1 too.
- SuperNode keys are EC keys on a NIST curve, the private key in OpenSSH format, the public
  key an OpenSSH line (``flwr supernode register KEY.pub CONNECTION``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
ALWAYS_NAMED = ("localhost", "127.0.0.1")  # the SuperLink's own SuperExec connects here


class DeployError(ValueError):
    """A deployment mistake; the message is one line meant for the user."""


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certs(out: Path | str, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """Write a CA and a SuperLink server certificate naming ``hosts`` (and 127.0.0.1).

    Returns the paths of ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key``. Keys
    are unencrypted PEM with mode 0600: keep ``ca.key`` off the SuperLink machine.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    names = list(dict.fromkeys([*hosts, *ALWAYS_NAMED]))
    for host in names:
        if not host or any(c.isspace() for c in host) or "/" in host:
            raise DeployError(f"--host {host!r} is not a host name or IP address")
    now = datetime.datetime.now(datetime.UTC)
    valid = {
        "not_valid_before": now - datetime.timedelta(minutes=5),
        "not_valid_after": now + datetime.timedelta(days=days),
    }

    def pem(key: rsa.RSAPrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpeft federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid["not_valid_before"])
        .not_valid_after(valid["not_valid_after"])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid["not_valid_before"])
        .not_valid_after(valid["not_valid_after"])
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {name: out / name for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)}
    _write(paths[CA_KEY], pem(ca_key), 0o600)
    _write(paths[CA_CERT], ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths[SERVER_KEY], pem(key), 0o600)
    _write(paths[SERVER_CERT], cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


def make_node_key(prefix: Path | str) -> tuple[Path, Path]:
    """Write a SuperNode key pair: ``PREFIX`` (OpenSSH EC P-384 private key), ``PREFIX.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = Path(prefix)
    public = private.with_name(private.name + ".pub")
    if private.exists():
        raise DeployError(f"{private} exists; a node key is never overwritten (delete it first)")
    key = ec.generate_private_key(ec.SECP384R1())
    _write(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(public, line + b"\n", 0o644)
    return private, public


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
    from fedpeft.server.simulation import QUIET_ENV

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
    return " ".join(pairs)


def supernode_command(opts: SuperNodeOptions) -> list[str]:
    """The ``flower-supernode`` command line: TLS and a node key unless ``insecure``."""
    cmd = [
        flower_bin("flower-supernode"),
        "--superlink",
        opts.superlink,
        "--port",
        str(opts.port),
        "--node-config",
        node_config(opts),
    ]
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


# --- submitting a run: `flwr run APP CONNECTION --stream` -------------------------------------

#: run-config keys of the fedpeft Flower app, with their defaults. The repository's
#: pyproject.toml declares the same keys (a test checks); Flower refuses any key a run
#: passes that the app does not declare.
APP_CONFIG: dict[str, str | bool] = {
    "scenario": "quickstart",  # a bundled scenario name or a scenario TOML path
    "out-dir": "",  # output folder on the SuperLink's machine; empty: runs/<name>-<time>/
    "scenario-json": "",  # the resolved scenario (what `fedpeft run` and `deploy run` pass)
    "engine": "",  # "deployment", "simulation"; empty: the ServerApp tells from its Grid
    "secure": False,  # the caller's word that TLS and SuperNode authentication are on
}
CONNECTION = "fedpeft"  # the connection name fedpeft writes into its own FLWR_HOME


def _toml_value(value: str | bool) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_app(folder: Path) -> Path:
    """Write the Flower app that ``flwr run`` packs (a FAB holding only this pyproject.toml).

    Its components, ``fedpeft.server.app:app`` and ``fedpeft.clients.app:app``, are
    imported from the fedpeft installed next to the SuperLink and every SuperNode, so the
    FAB carries no code and the run uses exactly the fedpeft those machines have.
    """
    from fedpeft import __version__

    folder.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f"{k} = {_toml_value(v)}" for k, v in APP_CONFIG.items())
    (folder / "pyproject.toml").write_text(
        "# Written by `fedpeft deploy`: the app code is the installed fedpeft package.\n"
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "fedpeft-app"\nversion = "{__version__}"\n'
        'description = "fedpeft ServerApp and ClientApp"\nlicense = "Apache-2.0"\n'
        "dependencies = []\n\n"
        '[tool.flwr.app]\npublisher = "fedpeft"\n\n'
        '[tool.flwr.app.components]\nserverapp = "fedpeft.server.app:app"\n'
        'clientapp = "fedpeft.clients.app:app"\n\n'
        f"[tool.flwr.app.config]\n{config}\n",
        encoding="utf-8",
    )
    return folder


def write_connection(home: Path, superlink: str, ca: Path | None) -> str:
    """Write ``FLWR_HOME/config.toml`` with one connection to ``superlink``; return its name.

    ``ca`` is the federation's CA certificate (TLS), or None for a plain-text SuperLink.
    """
    home.mkdir(parents=True, exist_ok=True)
    if ca is not None and not ca.is_file():
        raise DeployError(f"no CA certificate at {ca}")
    trust = (
        f"root-certificates = {_toml_value(str(ca.resolve()))}\n"  # Flower needs it absolute
        if ca is not None
        else "insecure = true\n"
    )
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f"address = {_toml_value(superlink)}\n{trust}",
        encoding="utf-8",
    )
    return CONNECTION


def write_run_config(path: Path, scenario_json: str, out_dir: str, secure: bool) -> Path:
    """The ``--run-config`` file of a deployed run: the resolved scenario and where to write."""
    values: dict[str, str | bool] = {
        "scenario-json": scenario_json,
        "out-dir": out_dir,
        "engine": "deployment",
        "secure": secure,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()))
    return path


def flwr_run_command(app: Path, connection: str, run_config: Path) -> list[str]:
    """``flwr run APP CONNECTION --stream --run-config FILE``."""
    return [
        flower_bin("flwr"),
        "run",
        str(app),
        connection,
        "--stream",
        "--run-config",
        str(run_config),
    ]


def submit_run(
    scenario_json: str,
    superlink: str,
    ca: Path | None,
    out_dir: str,
    secure: bool,
    work: Path,
    env: dict[str, str] | None = None,
) -> int:
    """Submit a scenario with ``flwr run --stream``; echo its progress; return its exit code.

    ``work`` receives the FLWR_HOME with one connection, the app and the run-config file,
    and ``flwr-run.log``, a copy of what was streamed. ``out_dir`` is where the ServerApp
    writes the outputs, on the SuperLink's machine (empty: its runs/ folder).
    """
    import subprocess

    home = work / "flwr-home"
    connection = write_connection(home, superlink, ca)
    app = write_app(work / "app")
    config = write_run_config(work / "run-config.toml", scenario_json, out_dir, secure)
    run_env = {**(env or deploy_env()), "FLWR_HOME": str(home)}
    with (work / "flwr-run.log").open("w") as log:
        proc = subprocess.Popen(
            flwr_run_command(app, connection, config),
            env=run_env,
            cwd=work,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            return proc.wait()
        finally:
            if proc.poll() is None:  # interrupted: the CLI goes; the run stays on the SuperLink
                proc.terminate()
                proc.wait()


def check_superlink_address(address: str) -> str:
    """``HOST:PORT`` as Flower takes it (no scheme), or a one-line DeployError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or "://" in address:
        raise DeployError(f"--superlink {address!r}: expected HOST:PORT, e.g. 10.0.0.5:8000")
    return address
