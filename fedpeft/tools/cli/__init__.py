"""The ``fedpeft`` command.

``run`` a scenario in Flower's Simulation Engine; ``compare`` strategies (or any key) on the
same scenario and seeds; ``list`` PEFT methods, strategies, scenarios, data sets and models;
``deploy`` a real federation (``certs``, ``node-key``, ``superlink``, ``supernode``, ``run``,
``local``); ``bench`` the benchmarks in benchmarks/.

Each command imports what it drives (torch, transformers, Flower, Ray) inside its own
function, not here: ``fedpeft --help`` and a mistyped flag answer at once, without seconds
of imports no command has asked for yet.
"""

from __future__ import annotations

import shlex
import sys
import warnings

from fedpeft.config import ScenarioError
from fedpeft.tools.cli.parser import build_parser
from fedpeft.tools.deploy import DeployError

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedpeft`` console script."""
    # libraries' deprecation notes are for their callers' authors, not fedpeft's users
    # (the run's other processes get the same filter from tools.simulation.QUIET_ENV)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from fedpeft.report import start_command_clock

    start_command_clock()
    args = build_parser().parse_args(argv)
    # the command as typed, recorded with the run (the adapter's model card)
    args.command_line = shlex.join(["fedpeft", *(sys.argv[1:] if argv is None else argv)])
    args.own_process = argv is None  # the process is this command (not a caller's main([...]))
    try:
        return int(args.func(args))
    except (ScenarioError, DeployError) as err:
        print(f"fedpeft: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedpeft: interrupted", file=sys.stderr)
        return 130
