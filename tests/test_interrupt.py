"""Ctrl-C handling of long commands (fedpeft.tools.interrupt), in a small process without Ray.

The process below swallows every KeyboardInterrupt, as a main thread stuck in C code or
a library that catches the interrupt would: only the watch can end it.
"""

import signal
import subprocess
import sys
import time

import pytest

SWALLOWS_CTRL_C = """
import sys, time
from fedpeft.tools.interrupt import watch_interrupts
stop = watch_interrupts("fedpeft: interrupted; test", grace=float(sys.argv[1]))
if sys.argv[3] == "stopped":
    stop()
deadline, ready = time.monotonic() + float(sys.argv[2]), False
while time.monotonic() < deadline:
    try:
        if not ready:
            print("ready", flush=True)
            ready = True
        time.sleep(0.05)
    except KeyboardInterrupt:
        print("swallowed", flush=True)
print("finished", flush=True)
"""


def _start(grace: float, sigint, stopped: bool = False, lasts: float = 20) -> subprocess.Popen:
    """The process, started with SIGINT as ``sigint`` (SIG_DFL: as from a terminal); unless
    ended, it finishes after ``lasts`` seconds."""
    args = [str(grace), str(lasts), "stopped" if stopped else "-"]
    proc = subprocess.Popen(
        [sys.executable, "-c", SWALLOWS_CTRL_C, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def _ctrl_c(proc: subprocess.Popen, times: int) -> tuple[int, float, str]:
    """Send ``times`` SIGINTs 0.2 s apart: (exit code, seconds after the last, output)."""
    for i in range(times):
        if i:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, time.monotonic() - sent, out


def test_a_second_ctrl_c_ends_the_process_at_once():
    code, seconds, out = _ctrl_c(_start(grace=30, sigint=signal.SIG_DFL), times=2)
    assert code == 130 and seconds < 5, (code, seconds, out)
    assert "swallowed" in out and "fedpeft: interrupted; test (stopped at once" in out


def test_a_first_ctrl_c_that_is_not_obeyed_ends_the_process_after_the_grace():
    code, seconds, out = _ctrl_c(_start(grace=1, sigint=signal.SIG_DFL), times=1)
    assert code == 130 and 0.9 < seconds < 10, (code, seconds, out)
    assert "fedpeft: interrupted; test (forced: still running 1s after Ctrl-C)" in out


@pytest.mark.parametrize("case", ["ignored", "stopped"])
def test_nothing_is_watched_where_ctrl_c_is_ignored_or_after_the_watch(case):
    """A background job of a shell without job control inherits SIGINT ignored: it keeps
    ignoring it, as Python does. After ``stop()`` the process is on its own again."""
    ignored = case == "ignored"
    proc = _start(
        grace=0.5,
        sigint=signal.SIG_IGN if ignored else signal.SIG_DFL,
        stopped=not ignored,
        lasts=3,
    )
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.endswith("finished\n"), out
    assert ("swallowed" in out) is not ignored
