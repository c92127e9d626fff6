"""The processes a deployment starts, and stopping them: only those, found by PID.

Each process gets its own process group; stopping walks the parent links down from the
processes started here, since Flower detaches some children into sessions of their own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


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

    def start(
        self, name: str, cmd: list[str], log: Path, *, append: bool = False
    ) -> subprocess.Popen:
        """Start ``cmd`` with its output in ``log`` (after what it holds, with ``append``)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a" if append else "w") as out:
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
