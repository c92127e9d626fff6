"""``fedpeft run``: check a scenario in this process, then run it in Flower's Simulation Engine.

Imports sit inside the functions, as in the rest of the command: see :mod:`fedpeft.tools.cli`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from fedpeft.config import DataSection, Scenario, ScenarioError, load_scenario
from fedpeft.tools.interrupt import watch_interrupts


def cmd_run(args: argparse.Namespace) -> int:
    """``fedpeft run``: the scenario (or the checkpoint it resumes), checked, then simulated."""
    from fedpeft.report import command_seconds, narrator, step

    if not args.resume:
        _announce(args.scenario or "quickstart", len(args.set))
    step("importing torch, transformers and Flower")
    # before those imports: libraries read these settings once, when imported
    from fedpeft.tools.simulation import quiet_libraries, set_process_env

    set_process_env()
    if not args.verbose:
        quiet_libraries()
    planned = _scenario_and_folder(args)
    if planned is None:
        return 0
    scenario, out_dir = planned
    # Ctrl-C raises KeyboardInterrupt below, which stops Ray; a second one, or a first one
    # still unanswered after 10 s (the main thread waits in Ray's C++), ends the run at once
    watch_interrupts(
        f"fedpeft: interrupted; rounds finished so far are in {out_dir}",
        on_interrupt=None if args.verbose else _quiet_flower,
    )
    _preflight(scenario)
    if not _simulate(args, scenario, out_dir):
        return 1
    # here, not in the ServerApp: Ray has stopped, so this is the whole command's time
    narrator.print(f"[bold]done[/] in {command_seconds():.0f}s, start to finish")
    if args.own_process:
        _exit_now(0)
    return 0


def _scenario_and_folder(args: argparse.Namespace) -> tuple[Scenario, Path] | None:
    """The scenario to run and its output folder; None when a resumed run has no round left."""
    if not args.resume:
        joins = [f"simulation.ray_address={json.dumps(args.ray_address)}"] * bool(args.ray_address)
        scenario = load_scenario(args.scenario or "quickstart", [*args.set, *joins])
        _cluster_answers(scenario)  # before the server's slow imports
        from fedpeft.server.run import default_out_dir

        return scenario, Path(args.out) if args.out else default_out_dir(scenario)
    if args.scenario or args.set or args.out:
        raise ScenarioError(
            "--resume DIR carries on with the scenario and folder of DIR's checkpoint; "
            "drop the scenario, --set and --out"
        )
    out_dir = Path(args.resume)
    resumed = _resumable(out_dir)
    if resumed is None:
        return None
    if args.ray_address:  # where it runs is not part of the checkpointed maths
        where = dataclasses.replace(resumed.simulation, ray_address=args.ray_address)
        resumed = dataclasses.replace(resumed, simulation=where)
    _cluster_answers(resumed)
    return resumed, out_dir


def _cluster_answers(scenario: Scenario) -> None:
    """Fail now, in one line, where no Ray cluster listens (not after Ray's minutes of retries)."""
    if scenario.simulation.ray_address:
        from fedpeft.tools.simulation import reachable

        reachable(scenario.simulation.ray_address)


def _simulate(args: argparse.Namespace, scenario: Scenario, out_dir: Path) -> bool:
    """Run the rounds; False (said why, traceback in the run folder) when the run failed."""
    from fedpeft.tools.simulation import simulate

    try:
        simulate(
            scenario,
            out_dir,
            verbose=args.verbose,
            resume=bool(args.resume),
            command=args.command_line,
        )
    except KeyboardInterrupt:
        # The ServerApp runs in a worker thread that would finish its rounds first; Ray is
        # already stopped (simulate's finally), and metrics.jsonl holds every finished round.
        print(f"fedpeft: interrupted; rounds finished so far are in {out_dir}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)
    except ScenarioError:
        raise
    except Exception as err:  # noqa: BLE001 - report, keep the traceback in the run folder
        _report_failure(err, out_dir)
        return False
    return True


def _report_failure(err: Exception, out_dir: Path) -> None:
    """Say in one line why the run failed, keep its traceback, and say how to resume it."""
    from fedpeft.server.checkpoint import checkpoint_dir

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "error.log").write_text(traceback.format_exc(), encoding="utf-8")
    cause = err.__cause__ or err
    where = out_dir / "error.log"
    print(
        f"fedpeft: run failed: {type(cause).__name__}: {cause} (traceback in {where})",
        file=sys.stderr,
    )
    if checkpoint_dir(out_dir) is not None and "--resume" not in str(cause):
        print(
            f"fedpeft: its finished rounds are checkpointed; carry on with: "
            f"fedpeft run --resume {out_dir}",
            file=sys.stderr,
        )


def _exit_now(code: int) -> NoReturn:
    """End the process without Python's teardown of the objects torch and transformers made.

    That teardown took 4 to 7 s after ``done in`` on a busy 2-core machine, so the line
    would not be the command's own time. By now the run's files are closed and Ray is
    stopped; exit handlers still run.
    """
    import atexit

    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def _quiet_flower() -> None:
    """After a Ctrl-C, Flower's threads log each message that Ray's shutdown cut off: not news."""
    logging.getLogger("flwr").setLevel(logging.CRITICAL)


def _resumable(out_dir: Path) -> Scenario | None:
    """The checkpointed scenario of ``out_dir``, or None (said why) if no round is left."""
    from fedpeft.server.checkpoint import checkpointed

    scenario, done = checkpointed(out_dir)
    if done >= scenario.federation.rounds:
        print(f"fedpeft: {out_dir} finished all {done} rounds; nothing to resume")
        return None
    print(
        f"fedpeft: resuming {scenario.name} in {out_dir} after round {done} "
        f"of {scenario.federation.rounds}"
    )
    return scenario


def _announce(name: str, overrides: int) -> None:
    """The run's first line, before any slow import: the scenario and what it is for."""
    from fedpeft import scenarios
    from fedpeft.config import resolve_scenario_path
    from fedpeft.report import narrator

    about = scenarios.describe(resolve_scenario_path(name))
    changed = f" with {overrides} --set override{'s' * (overrides > 1)}" if overrides else ""
    narrator.print(f"[bold]fedpeft run[/] {name}{changed}" + (f": {about}" if about else ""))


def _model_step(scenario: Scenario) -> str:
    """What loading the scenario's model is, for the start-up step that announces it."""
    from fedpeft.models import ALIASES

    name = scenario.model.name
    random = name in ALIASES and ALIASES[name][0] is not None
    note = " (random weights, a test model: accuracy stays near chance)" if random else ""
    return f"loading model {name} with {scenario.peft.label}{note}"


def _data_step(cfg: DataSection) -> str:
    """What loading ``cfg``'s data set will do, for the start-up step that announces it."""
    from fedpeft.data import BUNDLED, LOCAL_SUFFIXES, bundled_path

    if cfg.name in BUNDLED:
        target = bundled_path(cfg.name)
        if (target / "dataset_dict.json").is_file():
            return f"loading data set {cfg.name}"
        return (
            f"building data set {cfg.name} into {target} (the first run only; later runs reuse it)"
        )
    if Path(cfg.name).suffix in LOCAL_SUFFIXES:
        return f"reading data file {cfg.name}"
    return f"loading data set {cfg.name} (Hugging Face hub, or its local cache)"


def _preflight(scenario: Scenario) -> None:
    """Fail on a bad scenario before any Ray process starts (and warm this process's caches)."""
    from fedpeft.data import check_partitions, load_task_data
    from fedpeft.methods import check_methods
    from fedpeft.models import cached_peft_model, resolve_device
    from fedpeft.report import step
    from fedpeft.strategies import build_strategy
    from fedpeft.tasks import check_scenario
    from fedpeft.tracking import check_tracking
    from fedpeft.train import autocast_dtype

    check_methods(scenario.peft, scenario.model.task)
    check_tracking(scenario.report)
    build_strategy(scenario)
    step(_data_step(scenario.data))
    data = load_task_data(scenario.data)
    check_partitions(scenario.data, scenario.seed)  # every client gets examples
    step(_model_step(scenario))
    check_scenario(scenario)  # the task's processor loads and its data columns exist
    autocast_dtype(scenario.train.precision, resolve_device(scenario.model.device))
    # the server's own model (largest rank), so the ServerApp thread reuses this one
    server_peft = scenario.peft_for_rank(scenario.max_rank)
    cached_peft_model(scenario.model, server_peft, data.num_labels, scenario.seed)
