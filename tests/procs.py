"""Run the ``fedpeft`` console script in a fresh process, and find what it left behind.

Every process a run starts inherits its environment, so a marker variable set for one
run identifies exactly the processes that run started (Ray's daemons, Flower's SuperLink,
SuperNodes and app processes alike); tests stop only those.
"""

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

# what the output contract (../shared/DESIGN.md) promises in metrics.jsonl rows and summary.json
CONTRACT_ROW_KEYS = {
    "round",
    "strategy",
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "clients_sampled",
    "clients_failed",
    "bytes_up",
    "bytes_down",
    "round_seconds",
}
SUMMARY_KEYS = {
    "scenario",
    "final",
    "bytes_up_total",
    "bytes_down_total",
    "wall_seconds",
    "trainable_params",
    "total_params",
    "full_model_bytes",
    "engine",
    "clients",
}


def session_folder(tmp_path_factory, worker_id: str) -> Path:
    """The folder every pytest-xdist worker of this session shares (each has its own below)."""
    shared = tmp_path_factory.getbasetemp()
    return shared.parent if worker_id != "master" else shared


#: the session's one MiniLM run on Flower's Simulation Engine (the fixture below)
MINILM_RUN = ("run", "smoke", "--set", "model.name=minilm")


def pids_marked(marker: str) -> set[int]:
    """Processes whose environment carries ``marker``: exactly those a run started
    (Ray's daemons and workers inherit the environment of the command that started them)."""
    pids = set()
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("FEDPEFT_TEST_RUN") == marker:
                pids.add(p.info["pid"])
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return pids


def lingering(marker: str, grace: float = 15.0) -> set[int]:
    """Marked processes still alive after ``grace`` seconds (exiting ones get time to go)."""
    deadline = time.monotonic() + grace
    while (pids := pids_marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return pids


def kill_pids(pids: set[int]) -> None:
    """Kill these processes (ones a test started), skipping any already gone."""
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


def _command(args: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "fedpeft.tools.cli", *args]


def _env(marker: str) -> dict[str, str]:
    """The environment of a run: the test's marker travels to every process it starts."""
    return {**os.environ, "PYTHONWARNINGS": "ignore", "FEDPEFT_TEST_RUN": marker}


def _as_in_a_terminal() -> None:
    """In the child, before exec: SIGINT at its default, as for a command run in a terminal.

    A shell without job control starts background jobs with SIGINT ignored, and exec keeps
    it ignored; Python then installs no KeyboardInterrupt handler. A test suite started
    that way (``pytest &`` in a script, some CI runners) would pass that on to the run,
    which would then rightly ignore the test's Ctrl-C and finish all its rounds.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(args: tuple[str, ...], cwd: Path, marker: str) -> subprocess.Popen:
    """Start the console script, its output (stdout and stderr) in one text pipe."""
    return subprocess.Popen(
        _command(args),
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(marker),
        preexec_fn=_as_in_a_terminal,
    )


def run_fedpeft(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the console script in a fresh process; stop only the processes it left behind."""
    marker = uuid.uuid4().hex
    try:
        proc = subprocess.run(
            _command(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
            env=_env(marker),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        # the command was killed before it could stop its own children (a deployment's
        # SuperLink has no parent to watch): stop every process it started, by PID
        kill_pids(pids_marked(marker))
        raise
    _assert_nothing_left(marker)
    return proc


@dataclass
class Interrupted:
    """How an interrupted run ended: its exit code, how long it took to exit after the last
    signal, and its output (stdout and stderr)."""

    code: int
    seconds: float
    output: str


def interrupt_fedpeft(
    *args: str,
    cwd: Path,
    sig: int,
    after: str | None = None,
    after_process: str | None = None,
    times: int = 1,
    gap: float = 0.3,
    within: float = 60.0,
) -> Interrupted:
    """Run the console script; send ``sig`` ``times`` times, ``gap`` seconds apart, once a
    line of its output starts with ``after`` (or, with ``after_process``, once one of its
    processes has that text in its command line, e.g. ``raylet`` while Ray starts).

    Its output is read to the end, as a terminal would: a pipe nobody reads would block
    the run's next write. Fails if it has not exited ``within`` seconds after the last
    signal, or if it left processes behind (stopping them).
    """
    marker = uuid.uuid4().hex
    proc = _spawn(args, cwd, marker)
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if after is not None and line.startswith(after):
                seen.set()
        seen.set()  # the run ended first: the signals find it gone, and the test says so

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        while not seen.wait(0.05):
            if after_process is not None and _running(marker, after_process):
                break
        for i in range(times):
            if i:
                time.sleep(gap)
            proc.send_signal(sig)
        sent = time.monotonic()
        try:
            code = proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {within:.0f}s after the signal:\n{''.join(lines)[-3000:]}")
        seconds = time.monotonic() - sent
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    _assert_nothing_left(marker)
    return Interrupted(code, seconds, "".join(lines))


def _running(marker: str, text: str) -> bool:
    """Whether a process of the run ``marker`` has ``text`` in its command line."""
    for pid in pids_marked(marker):
        try:
            if text in " ".join(psutil.Process(pid).cmdline()):
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return False


def sigkill_fedpeft(*args: str, cwd: Path, after: str, file: Path) -> list[str]:
    """Run the console script; SIGKILL it once a line of its output starts with ``after``
    and ``file`` exists (waiting for it at most 60 s).

    A killed process cleans nothing up, so the processes its run started (Ray's) may
    outlive it; they carry this run's marker and are stopped here. Returns its output lines.
    """
    marker = uuid.uuid4().hex
    proc = _spawn(args, cwd, marker)
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(after):
                break
        deadline = time.monotonic() + 60
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_pids(pids_marked(marker))
    return lines


def _assert_nothing_left(marker: str) -> None:
    leftovers = lingering(marker)
    kill_pids(leftovers)  # started by this run, so ours to stop; the test still fails
    assert not leftovers, f"processes left behind by the run: {sorted(leftovers)}"
