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
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.config import Scenario
from fedpeft.tools.deploy.certs import CA_CERT, make_certs, make_node_key
from fedpeft.tools.deploy.errors import DeployError
from fedpeft.tools.deploy.flower import (
    SuperLinkOptions,
    SuperNodeOptions,
    deploy_env,
    flower_bin,
    superlink_command,
    supernode_command,
)
from fedpeft.tools.deploy.processes import Processes, free_port, last_line, wait_for_text
from fedpeft.tools.deploy.submit import submit_run, write_connection
from fedpeft.tools.deploy.trainer import TrainerSupervisor, sigterm_as_interrupt

READY_SUPERLINK = "Uvicorn running on https://"
READY_SUPERNODE = "SuperNode ID"
REFUSED_SUPERNODE = "Failed to activate SuperNode"


def deploy_local(
    scenario: Scenario,
    nodes: int,
    out_dir: Path,
    *,
    strangers: int = 0,
    wait_s: float = 90.0,
    trainer: bool = True,
    poll_interval: float | None = None,
    forwarder: bool = False,
) -> dict[str, Any]:
    """Run ``scenario`` on a TLS, authenticated deployment of ``nodes`` SuperNodes here.

    ``strangers`` extra SuperNodes start with keys that were never registered; the
    SuperLink must refuse them while the run goes on. Each node has its trainer
    (:mod:`fedpeft.tools.deploy.trainer`), which runs the node's tasks itself (with
    ``forwarder``: answers a ClientApp process per message), unless ``trainer`` is False;
    ``poll_interval``
    shortens Flower's 3 s wait between a node's empty pulls. Returns the run's
    summary.json, after writing ``deploy/deployment.json`` (ports, PIDs, node ids,
    refusals, trainers, timings).
    """
    if scenario.data.num_clients != nodes:
        raise DeployError(f"data.num_clients={scenario.data.num_clients} but --nodes {nodes}")
    out_dir = out_dir.resolve()
    work = out_dir / "deploy"
    make_certs(work / "certs", ["localhost"])
    env = {**deploy_env(), "FLWR_HOME": str(work / "flwr-home")}
    # N nodes share this machine's cores: torch's default (every core per process) would
    # oversubscribe them when several ClientApps train at once
    env.setdefault("FEDPEFT_THREADS_PER_CLIENT", str(max(1, (os.cpu_count() or 1) // nodes)))
    federation = _Federation(
        work, Processes(env, cwd=work), wait_s, trainer, poll_interval, forwarder
    )
    clock = time.perf_counter()
    with sigterm_as_interrupt():
        try:
            address = federation.start_superlink()
            joining = federation.start_nodes(address, nodes)
            refusing = federation.start_strangers(address, nodes, strangers)
            federation.wait_for_nodes(joining)
            federation.check_refused(refusing)
            federation.record["setup_seconds"] = time.perf_counter() - clock
            federation.run(scenario, address, out_dir)
        finally:
            federation.stop(clock)
    summary: dict[str, Any] = json.loads((out_dir / "summary.json").read_text())
    return summary


@dataclass
class _Federation:
    """One local deployment under way: its folder, the processes it started, its record."""

    work: Path
    procs: Processes
    wait_s: float  # how long a process may take to say it is up (or refused)
    trainer: bool  # a long-lived trainer per node (False: a ClientApp process per message)
    poll_interval: float | None  # the nodes' wait between empty pulls (None: Flower's 3 s)
    forwarder: bool = False  # a ClientApp process per message forwards it to the trainer
    trainers: list[TrainerSupervisor] = field(default_factory=list)
    # what deploy/deployment.json says: ports, PIDs, node ids, refusals, timings
    record: dict[str, Any] = field(
        default_factory=lambda: {"nodes": [], "strangers": [], "secure": True}
    )

    @property
    def certs(self) -> Path:
        """The CA and the SuperLink's certificate."""
        return self.work / "certs"

    @property
    def logs(self) -> Path:
        """A log per process."""
        return self.work / "logs"

    def start_superlink(self) -> str:
        """Start the SuperLink (TLS, node authentication) on a free port; return its address."""
        port = free_port()
        address = f"127.0.0.1:{port}"
        self.record["superlink"] = address
        log = self.logs / "superlink.log"
        opts = SuperLinkOptions(certs=self.certs, host="127.0.0.1", port=port)
        link = self.procs.start("superlink", superlink_command(opts), log)
        if not wait_for_text(log, READY_SUPERLINK, link, self.wait_s):
            raise DeployError(f"the SuperLink did not start: {last_line(log)} (log: {log})")
        # for the registrations below
        write_connection(self.work / "flwr-home", address, self.certs / CA_CERT)
        _print(f"SuperLink up at https://{address} (TLS, node authentication)")
        return address

    def start_nodes(
        self, address: str, nodes: int
    ) -> list[tuple[int, subprocess.Popen, Path, int]]:
        """Register a key per node, then start the nodes: (partition, process, log, port)."""
        keypairs = [make_node_key(self.work / "keys" / f"node-{i}") for i in range(nodes)]
        _register([pub for _, pub in keypairs], self.procs.env, self.work)
        _print(f"registered {nodes} node keys")
        ports = [free_port() for _ in range(nodes)]
        if self.trainer:
            self.start_trainers(ports)
        starting = []
        for i, (private, _) in enumerate(keypairs):
            trainer = self.trainers[i] if self.trainers else None
            opts = SuperNodeOptions(
                superlink=address,
                partition_id=i,
                num_partitions=nodes,
                certs=self.certs,
                key=private,
                port=ports[i],
                state_dir=self.work / "nodes" / f"node-{i}",
                trainer_socket=trainer.socket if trainer and self.forwarder else None,
                executor_secret=trainer.secret if trainer and not self.forwarder else None,
                poll_interval=self.poll_interval,
            )
            log = self.logs / f"supernode-{i}.log"
            proc = self.procs.start(f"supernode-{i}", supernode_command(opts), log)
            starting.append((i, proc, log, opts.port))
        return starting

    def start_trainers(self, ports: list[int]) -> None:
        """Start one trainer per node, each with a private folder of its own.

        It runs the tasks of the node on ``ports[i]``, or with ``forwarder`` answers that
        node's forwarders on a socket in its folder.
        """
        for i, port in enumerate(ports):
            # a short path: a Unix socket's path may not exceed about 100 bytes
            folder = Path(tempfile.mkdtemp(prefix="fedpeft-trainer-"))
            supervisor = TrainerSupervisor(
                self.procs,
                folder,
                self.logs / f"trainer-{i}.log",
                name=f"trainer-{i}",
                runtime_port=None if self.forwarder else port,
            )
            supervisor.launch()
            self.trainers.append(supervisor)
        for supervisor in self.trainers:
            supervisor.wait_ready(self.wait_s)
        how = "answers its forwarders" if self.forwarder else "runs its node's tasks"
        _print(f"{len(ports)} node trainers up, each {how} (the model loads once per run)")

    def start_strangers(
        self, address: str, nodes: int, strangers: int
    ) -> list[tuple[int, subprocess.Popen, Path]]:
        """Start ``strangers`` nodes whose keys were never registered: (index, process, log)."""
        runs = []
        for j in range(strangers):
            private, _ = make_node_key(self.work / "keys" / f"stranger-{j}")
            opts = SuperNodeOptions(
                superlink=address,
                partition_id=j % nodes,
                num_partitions=nodes,
                certs=self.certs,
                key=private,
                port=free_port(),
            )
            log = self.logs / f"stranger-{j}.log"
            runs.append((j, self.procs.start(f"stranger-{j}", supernode_command(opts), log), log))
        return runs

    def wait_for_nodes(self, starting: list[tuple[int, subprocess.Popen, Path, int]]) -> None:
        """Wait until every registered node has joined; record its PID, port and node id."""
        for i, proc, log, node_port in starting:
            if not wait_for_text(log, READY_SUPERNODE, proc, self.wait_s):
                raise DeployError(f"SuperNode {i} did not join: {last_line(log)} (log: {log})")
            self.record["nodes"].append(
                {
                    "partition_id": i,
                    "pid": proc.pid,
                    "port": node_port,
                    "node_id": _node_id(log),
                    "log": str(log),
                }
            )
        _print(f"{len(starting)} SuperNodes joined")

    def check_refused(self, runs: list[tuple[int, subprocess.Popen, Path]]) -> None:
        """Record and say, for each unregistered node, whether the SuperLink refused it."""
        for j, proc, log in runs:
            refused = wait_for_text(log, REFUSED_SUPERNODE, proc, self.wait_s)
            self.record["strangers"].append(
                {"pid": proc.pid, "refused": refused, "exit_code": proc.poll(), "log": str(log)}
            )
            _print(
                f"unregistered node {j}: "
                + ("refused by the SuperLink" if refused else "NOT refused")
            )

    def run(self, scenario: Scenario, address: str, out_dir: Path) -> None:
        """Submit the run with ``flwr run --stream`` and wait for its summary.json."""
        started = time.perf_counter()
        code = submit_run(
            scenario.to_json(),
            address,
            self.certs / CA_CERT,
            str(out_dir),
            secure=True,
            work=self.work,
            env=self.procs.env,
        )
        self.record["run_seconds"] = time.perf_counter() - started
        if code != 0 or not (out_dir / "summary.json").is_file():
            raise DeployError(
                f"the run failed (flwr run exit {code}); logs in {self.logs} and "
                f"{self.work / 'flwr-run.log'}"
            )

    def stop(self, clock: float) -> None:
        """Stop every process started here, then write deploy/deployment.json."""
        for supervisor in self.trainers:
            supervisor.stop()
        self.procs.stop_all()
        for supervisor in self.trainers:
            supervisor.remove_socket_folder()
        self.record["trainers"] = [
            {"log": str(t.log), "restarts": t.restarts} for t in self.trainers
        ]
        self.record["stopped"] = [
            {"name": name, "pid": p.pid, "exit_code": p.returncode}
            for name, p in self.procs.started
        ]
        self.record["wall_seconds"] = time.perf_counter() - clock
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "deployment.json").write_text(json.dumps(self.record, indent=2) + "\n")


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
