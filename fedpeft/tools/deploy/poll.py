"""``flower-supernode`` with a shorter wait between empty pulls (``--poll-interval``).

Flower 1.42's SuperNode loop (``flwr.supernode.start_client_internal``) sleeps a fixed
3 s whenever the SuperLink had no message for it. A node pulls as soon as it has pushed a
reply, usually before the server's next message exists, so that message waits out the
rest of the 3 s before any work starts. ``fedpeft deploy supernode --poll-interval S`` runs the node
through this module, which replaces that one wait (and no other) with ``S`` seconds and
says so at the top of the node's log. Everything else is Flower's own ``flower-supernode``.

Run as ``python -m fedpeft.tools.deploy.poll SECONDS FLOWER_SUPERNODE_ARGS...``.
"""

from __future__ import annotations

import sys
import time
import types

FLOWER_EMPTY_PULL_WAIT = 3  # seconds, hard-coded in start_client_internal's loop


def shortened_time(interval: float) -> types.SimpleNamespace:
    """A ``time`` module whose ``sleep(3)`` sleeps ``interval`` seconds instead."""

    def sleep(seconds: float) -> None:
        time.sleep(interval if seconds == FLOWER_EMPTY_PULL_WAIT else seconds)

    names = {name: getattr(time, name) for name in dir(time) if not name.startswith("__")}
    return types.SimpleNamespace(**{**names, "sleep": sleep})


def main(argv: list[str]) -> None:
    """Start Flower's SuperNode with the empty-pull wait set to ``argv[0]`` seconds."""
    interval = float(argv[0])
    from flwr.supernode import start_client_internal as node_loop
    from flwr.supernode.cli import flower_supernode

    node_loop.time = shortened_time(interval)  # type: ignore[assignment]
    print(
        f"fedpeft: SuperNode waits {interval:g} s between empty pulls "
        f"(Flower's default: {FLOWER_EMPTY_PULL_WAIT} s; fedpeft deploy supernode --poll-interval)",
        flush=True,
    )
    sys.argv = ["flower-supernode", *argv[1:]]
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
