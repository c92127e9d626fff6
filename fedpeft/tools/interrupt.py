"""Ctrl-C for long commands: the first stops in order, a second (or a stuck first) at once.

Python turns SIGINT into KeyboardInterrupt only in the main thread, and only between
bytecodes. While the main thread waits in C code (Ray's start-up asks its GCS in blocking
C++ calls; stopping Ray takes seconds on a loaded machine) a Ctrl-C waits with it, and a
library that defers or swallows it (Ray defers SIGINT while it submits work from the
main thread) can lose it. The interpreter's C-level handler still writes each signal's
number to the wakeup fd as it arrives, whatever the main thread is doing, so a watcher
thread reading that fd sees every Ctrl-C at once: it ends the process at the second, or
when the first has not ended it within ``grace`` seconds.

A process that inherited SIGINT ignored (a background job of a non-interactive shell)
keeps ignoring it, as Python itself does: nothing is watched there.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import NoReturn

from fedpeft.tools.deploy.processes import descendants

#: exit status of a process ended by Ctrl-C, as shells report it (128 + SIGINT)
INTERRUPTED = 128 + signal.SIGINT

#: the sockets whose fds the interpreter writes signals to: it keeps only the number, so
#: they must live here, not only in a closure the caller may drop (a freed fd is reused)
_wakeup: list[socket.socket] = []


def watch_interrupts(
    message: str, grace: float = 10.0, on_interrupt: Callable[[], None] | None = None
) -> Callable[[], None]:
    """Make a second Ctrl-C, or a first one unanswered for ``grace`` s, exit at once (130).

    Such an exit prints ``message`` first. Returns the function that stops the watch.
    The first Ctrl-C still raises KeyboardInterrupt in the main thread, so the caller stops
    in order when it can; ``on_interrupt`` runs (in the watcher thread) as soon as it comes.
    An exit here runs no cleanup (it kills the processes this one started): what must
    survive it has to be on disk already.
    """
    if threading.current_thread() is not threading.main_thread() or not callable(
        signal.getsignal(signal.SIGINT)  # SIG_IGN or SIG_DFL: no Python handler, no wakeup
    ):
        return lambda: None
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    if previous != -1:  # someone else (an asyncio loop) relies on it: leave it to them
        signal.set_wakeup_fd(previous)
        reader.close()
        writer.close()
        return lambda: None
    watcher = threading.Thread(
        target=_watch,
        args=(reader, message, grace, on_interrupt),
        name="fedpeft-interrupt",
        daemon=True,
    )
    watcher.start()
    _wakeup.append(writer)

    def stop() -> None:
        signal.set_wakeup_fd(-1)
        _wakeup.remove(writer)
        writer.close()  # the watcher reads end-of-file and returns
        watcher.join(timeout=1.0)

    return stop


def _watch(
    reader: socket.socket, message: str, grace: float, on_interrupt: Callable[[], None] | None
) -> None:
    """Count the SIGINTs written to ``reader``; end the process at the second or at the deadline."""
    seen = 0
    with reader:
        while True:
            try:
                data = reader.recv(64)
            except TimeoutError:  # the first Ctrl-C was not obeyed in time
                _exit_now(f"{message} (forced: still running {grace:g}s after Ctrl-C)")
            if not data:  # the block ended
                return
            for _ in range(data.count(signal.SIGINT)):
                seen += 1
                if seen == 1:
                    reader.settimeout(grace)
                    if on_interrupt is not None:
                        on_interrupt()
                else:
                    _exit_now(f"{message} (stopped at once: Ctrl-C again)")


def _exit_now(message: str) -> NoReturn:
    """Say ``message`` on stderr and end the process and every process it started.

    Ray's own processes would die with their parents, but an orphaned helper of the raylet
    (its runtime-env agent) lingers for many seconds: every descendant is killed first.
    The write goes through a thread of its own, given a second: stderr may be a pipe that
    nobody reads any more, and a blocked write must not keep the process alive.
    """
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # gone already
            pass
    line = f"\n{message}\n".encode(errors="replace")
    writer = threading.Thread(target=os.write, args=(2, line), daemon=True)
    writer.start()
    writer.join(timeout=1.0)
    os._exit(INTERRUPTED)
