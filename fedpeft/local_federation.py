"""``fedpeft deploy local``: a whole Flower deployment on 127.0.0.1, in one command.

It does what a user would do by hand on several machines (docs/deployment.md), with the
same Flower processes: certificates and one key per node, a SuperLink with TLS and
SuperNode authentication, each key registered with ``flwr supernode register``, N
SuperNodes (one partition each), ``flwr run --stream``, and the run's outputs. Every
process it starts gets its own process group; it stops those groups, by PID, when the
run ends, fails or is interrupted, and no other process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.config import Scenario
from fedpeft.deploy import (
    CA_CERT,
    DeployError,
    SuperLinkOptions,
    SuperNodeOptions,
    deploy_env,
    flower_bin,
    make_certs,
    make_node_key,
    submit_run,
    superlink_command,
    supernode_command,
    write_connection,
)

READY_SUPERLINK = "Uvicorn running on https://"
READY_SUPERNODE = "SuperNode ID"
REFUSED_SUPERNODE = "Failed to activate SuperNode"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_text(log: Path, text: str, proc: subprocess.Popen, seconds: float) -> bool:
    """Wait until ``text`` is in ``log``; False when ``proc`` exits or time runs out first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return True
        if proc.poll() is not None:
            return log.exists() and text in log.read_text(errors="replace")
        time.sleep(0.2)
    return False


def last_line(log: Path) -> str:
    """The last non-empty line of a log, for one-line errors."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(empty log)"


@dataclass
class Processes:
    """Processes this run started, each the leader of its own process group."""

    env: dict[str, str]
    cwd: Path
    started: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], log: Path) -> subprocess.Popen:
        """Start ``cmd`` with its output in ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        self.started.append((name, proc))
        return proc

    def stop_all(self, grace: float = 15.0) -> None:
        """Stop what this run started: each process, its group, and its descendants.

        Flower detaches some children into sessions of their own (the SuperLink's
        SuperExec, which starts the ServerApp), so a group signal alone would miss them;
        they are found by walking the parent links down from the processes started here.
        SIGTERM first, SIGKILL for whatever is left after ``grace`` seconds.
        """
        family = {d for _, proc in self.started for d in descendants(proc.pid)}
        for _, proc in reversed(self.started):
            _signal_group(proc, signal.SIGTERM)
        for pid in family:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, proc in reversed(self.started):
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        while (alive := {pid for pid in family if _alive(pid)}) and time.monotonic() < deadline:
            time.sleep(0.2)
        for _, proc in self.started:
            _signal_group(proc, signal.SIGKILL)  # whatever of each group is still there
            proc.wait()
        for pid in alive:
            _signal(pid, signal.SIGKILL)


def descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (Linux ``/proc``; an empty set elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; its parent has yet to reap it


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group proc leads: only processes this run started
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so the processes get stopped on either."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def deploy_local(
    scenario: Scenario, nodes: int, out_dir: Path, *, strangers: int = 0, wait_s: float = 90.0
) -> dict[str, Any]:
    """Run ``scenario`` on a TLS, authenticated deployment of ``nodes`` SuperNodes here.

    ``strangers`` extra SuperNodes start with keys that were never registered; the
    SuperLink must refuse them while the run goes on. Returns the run's summary.json,
    after writing ``deploy/deployment.json`` (ports, PIDs, node ids, refusals, timings).
    """
    if scenario.data.num_clients != nodes:
        raise DeployError(f"data.num_clients={scenario.data.num_clients} but --nodes {nodes}")
    out_dir = out_dir.resolve()
    work = out_dir / "deploy"
    certs, keys, home, logs = (work / d for d in ("certs", "keys", "flwr-home", "logs"))
    make_certs(certs, ["localhost"])
    env = {**deploy_env(), "FLWR_HOME": str(home)}
    # N nodes share this machine's cores: torch's default (every core per process) would
    # oversubscribe them when several ClientApps train at once
    env.setdefault("FEDPEFT_THREADS_PER_CLIENT", str(max(1, (os.cpu_count() or 1) // nodes)))
    procs = Processes(env, cwd=work)
    record: dict[str, Any] = {"nodes": [], "strangers": [], "secure": True}
    clock = time.perf_counter()
    with _sigterm_as_interrupt():
        try:
            port = free_port()
            address = f"127.0.0.1:{port}"
            record["superlink"] = address
            link_log = logs / "superlink.log"
            link = procs.start(
                "superlink",
                superlink_command(SuperLinkOptions(certs=certs, host="127.0.0.1", port=port)),
                link_log,
            )
            if not wait_for_text(link_log, READY_SUPERLINK, link, wait_s):
                raise DeployError(
                    f"the SuperLink did not start: {last_line(link_log)} (log: {link_log})"
                )
            write_connection(home, address, certs / CA_CERT)  # for the registrations below
            _print(f"SuperLink up at https://{address} (TLS, node authentication)")

            keypairs = [make_node_key(keys / f"node-{i}") for i in range(nodes)]
            _register([pub for _, pub in keypairs], procs.env, work)
            _print(f"registered {nodes} node keys")
            starting = []
            for i, (private, _) in enumerate(keypairs):
                opts = SuperNodeOptions(
                    superlink=address,
                    partition_id=i,
                    num_partitions=nodes,
                    certs=certs,
                    key=private,
                    port=free_port(),
                    state_dir=work / "nodes" / f"node-{i}",
                )
                log = logs / f"supernode-{i}.log"
                starting.append(
                    (i, procs.start(f"supernode-{i}", supernode_command(opts), log), log, opts.port)
                )
            stranger_runs = []
            for j in range(strangers):
                private, _ = make_node_key(keys / f"stranger-{j}")
                opts = SuperNodeOptions(
                    superlink=address,
                    partition_id=j % nodes,
                    num_partitions=nodes,
                    certs=certs,
                    key=private,
                    port=free_port(),
                )
                log = logs / f"stranger-{j}.log"
                stranger_runs.append(
                    (j, procs.start(f"stranger-{j}", supernode_command(opts), log), log)
                )
            for i, proc, log, node_port in starting:
                if not wait_for_text(log, READY_SUPERNODE, proc, wait_s):
                    raise DeployError(f"SuperNode {i} did not join: {last_line(log)} (log: {log})")
                node_id = _node_id(log)
                record["nodes"].append(
                    {
                        "partition_id": i,
                        "pid": proc.pid,
                        "port": node_port,
                        "node_id": node_id,
                        "log": str(log),
                    }
                )
            _print(f"{nodes} SuperNodes joined")
            for j, proc, log in stranger_runs:
                refused = wait_for_text(log, REFUSED_SUPERNODE, proc, wait_s)
                record["strangers"].append(
                    {"pid": proc.pid, "refused": refused, "exit_code": proc.poll(), "log": str(log)}
                )
                _print(
                    f"unregistered node {j}: "
                    + ("refused by the SuperLink" if refused else "NOT refused")
                )
            record["setup_seconds"] = time.perf_counter() - clock

            started = time.perf_counter()
            code = submit_run(
                scenario.to_json(),
                address,
                certs / CA_CERT,
                str(out_dir),
                secure=True,
                work=work,
                env=procs.env,
            )
            record["run_seconds"] = time.perf_counter() - started
            if code != 0 or not (out_dir / "summary.json").is_file():
                raise DeployError(
                    f"the run failed (flwr run exit {code}); logs in {logs} and "
                    f"{work / 'flwr-run.log'}"
                )
        finally:
            procs.stop_all()
            record["stopped"] = [
                {"name": name, "pid": p.pid, "exit_code": p.returncode} for name, p in procs.started
            ]
            record["wall_seconds"] = time.perf_counter() - clock
            work.mkdir(parents=True, exist_ok=True)
            (work / "deployment.json").write_text(json.dumps(record, indent=2) + "\n")
    summary: dict[str, Any] = json.loads((out_dir / "summary.json").read_text())
    return summary


def _print(text: str) -> None:
    print(f"fedpeft deploy: {text}", flush=True)


def _register(public_keys: list[Path], env: dict[str, str], cwd: Path) -> None:
    """``flwr supernode register KEY.pub fedpeft`` for each key, side by side."""
    runs = [
        (
            pub,
            subprocess.Popen(
                [flower_bin("flwr"), "supernode", "register", str(pub), "fedpeft"],
                env=env,
                cwd=cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
        )
        for pub in public_keys
    ]
    for pub, proc in runs:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            lines = [ln for ln in out.splitlines() if ln.strip()]
            raise DeployError(f"registering {pub} failed: {lines[-1] if lines else 'no output'}")


def _node_id(log: Path) -> int | None:
    for line in log.read_text(errors="replace").splitlines():
        if READY_SUPERNODE in line:
            digits = "".join(c for c in line.rsplit(READY_SUPERNODE, 1)[1] if c.isdigit())
            return int(digits) if digits else None
    return None
