"""The ``fedpeft`` command.

``run`` a scenario in Flower's Simulation Engine; ``compare`` strategies (or any key) on the
same scenario and seeds; ``list`` PEFT methods, strategies, scenarios, data sets and models;
``deploy`` a real federation (``certs``, ``node-key``, ``superlink``, ``supernode``, ``run``,
``local``); ``bench`` the benchmarks in benchmarks/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import textwrap
import traceback
import warnings
from pathlib import Path
from typing import NoReturn

from fedpeft.config import ScenarioError, load_scenario
from fedpeft.deploy import DeployError
from fedpeft.interrupt import watch_interrupts


def _cmd_run(args: argparse.Namespace) -> int:
    from fedpeft.report import command_seconds, narrator, step

    if not args.resume:
        _announce(args.scenario or "quickstart", len(args.set))
    step("importing torch, transformers and Flower")
    # before those imports: libraries read these settings once, when imported
    from fedpeft.server.simulation import quiet_libraries, set_process_env

    set_process_env()
    if not args.verbose:
        quiet_libraries()
    from fedpeft.server.run import default_out_dir

    if args.resume:
        if args.scenario or args.set or args.out:
            raise ScenarioError(
                "--resume DIR carries on with the scenario and folder of DIR's checkpoint; "
                "drop the scenario, --set and --out"
            )
        out_dir = Path(args.resume)
        scenario = _resumable(out_dir)
        if scenario is None:
            return 0
        if args.ray_address:  # where it runs is not part of the checkpointed maths
            where = dataclasses.replace(scenario.simulation, ray_address=args.ray_address)
            scenario = dataclasses.replace(scenario, simulation=where)
    else:
        joins = [f"simulation.ray_address={json.dumps(args.ray_address)}"] * bool(args.ray_address)
        scenario = load_scenario(args.scenario or "quickstart", [*args.set, *joins])
        out_dir = Path(args.out) if args.out else default_out_dir(scenario)
    # Ctrl-C raises KeyboardInterrupt below, which stops Ray; a second one, or a first one
    # still unanswered after 10 s (the main thread waits in Ray's C++), ends the run at once
    watch_interrupts(
        f"fedpeft: interrupted; rounds finished so far are in {out_dir}",
        on_interrupt=None if args.verbose else _quiet_flower,
    )
    if scenario.simulation.ray_address:  # fail now, not after Ray's minutes of retries
        from fedpeft.server.simulation import reachable

        reachable(scenario.simulation.ray_address)
    _preflight(scenario)
    from fedpeft.server.simulation import simulate

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
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "error.log").write_text(traceback.format_exc(), encoding="utf-8")
        cause = err.__cause__ or err
        where = out_dir / "error.log"
        print(
            f"fedpeft: run failed: {type(cause).__name__}: {cause} (traceback in {where})",
            file=sys.stderr,
        )
        from fedpeft.server.checkpoint import checkpoint_dir

        if checkpoint_dir(out_dir) is not None and "--resume" not in str(cause):
            print(
                f"fedpeft: its finished rounds are checkpointed; carry on with: "
                f"fedpeft run --resume {out_dir}",
                file=sys.stderr,
            )
        return 1
    # here, not in the ServerApp: Ray has stopped, so this is the whole command's time
    narrator.print(f"[bold]done[/] in {command_seconds():.0f}s, start to finish")
    if args.own_process:
        _exit_now(0)
    return 0


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


def _resumable(out_dir: Path):
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


def _model_step(scenario) -> str:
    """What loading the scenario's model is, for the start-up step that announces it."""
    from fedpeft.models import ALIASES

    name = scenario.model.name
    random = name in ALIASES and ALIASES[name][0] is not None
    note = " (random weights, a test model: accuracy stays near chance)" if random else ""
    return f"loading model {name} with {scenario.peft.label}{note}"


def _data_step(cfg) -> str:
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


def _preflight(scenario) -> None:
    """Fail on a bad scenario before any Ray process starts (and warm this process's caches)."""
    from fedpeft.data import check_partitions, load_task_data
    from fedpeft.methods import check_methods
    from fedpeft.models import cached_peft_model, resolve_device
    from fedpeft.report import step
    from fedpeft.strategies import build_strategy
    from fedpeft.tasks import check_scenario
    from fedpeft.train import autocast_dtype

    check_methods(scenario.peft, scenario.model.task)
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


def _cmd_bench(args: argparse.Namespace) -> int:
    from fedpeft.bench import run_bench

    return run_bench(args.quick, args.only.split(",") if args.only else None)


def _cmd_compare(args: argparse.Namespace) -> int:
    from fedpeft.compare import run_compare

    return run_compare(args.scenario, args.strategies, args.seeds, args.vary, args.set, args.out)


def _cmd_deploy_certs(args: argparse.Namespace) -> int:
    from fedpeft.deploy import make_certs

    paths = make_certs(args.dir, args.host, days=args.days)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    print(
        f"the SuperLink uses {args.dir}; SuperNodes and `flwr` need only {paths['ca.crt']}; "
        f"keep {paths['ca.key']} offline"
    )
    return 0


def _cmd_deploy_node_key(args: argparse.Namespace) -> int:
    from fedpeft.deploy import make_node_key

    private, public = make_node_key(args.prefix)
    print(
        f"wrote {private} (stays on the node) and {public} (register it: "
        f"`flwr supernode register {public} CONNECTION`)"
    )
    return 0


def _cmd_deploy_superlink(args: argparse.Namespace) -> int:
    from fedpeft.deploy import SuperLinkOptions, deploy_env, superlink_command

    opts = SuperLinkOptions(
        certs=Path(args.certs) if args.certs else None,
        insecure=args.insecure,
        host=args.host,
        port=args.port,
        auth=not args.no_auth,
        database=Path(args.database) if args.database else None,
    )
    cmd = superlink_command(opts)
    print(f"fedpeft: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, deploy_env())  # the SuperLink takes this process (and its PID)


def _cmd_deploy_supernode(args: argparse.Namespace) -> int:
    from fedpeft.deploy import SuperNodeOptions, deploy_env, supernode_command

    opts = SuperNodeOptions(
        superlink=args.superlink,
        partition_id=args.partition_id,
        num_partitions=args.num_partitions,
        certs=Path(args.certs) if args.certs else None,
        key=Path(args.key) if args.key else None,
        insecure=args.insecure,
        port=args.port,
        device=args.device,
        rank=args.rank,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        data=Path(args.data) if args.data else None,
    )
    cmd = supernode_command(opts)
    print(f"fedpeft: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, deploy_env())  # the SuperNode takes this process (and its PID)


def _deploy_scenario(args: argparse.Namespace, extra: list[str] | None = None):
    """The scenario to deploy, checked here before any process starts."""
    from fedpeft.methods import check_methods
    from fedpeft.strategies import build_strategy

    scenario = load_scenario(args.scenario, [*args.set, *(extra or [])])
    check_methods(scenario.peft, scenario.model.task)
    build_strategy(scenario)
    return scenario


def _cmd_deploy_local(args: argparse.Namespace) -> int:
    from fedpeft.local_federation import deploy_local
    from fedpeft.server.run import default_out_dir

    if args.nodes < 1:
        raise DeployError(f"--nodes must be at least 1, got {args.nodes}")
    sizes = [f"data.num_clients={args.nodes}"]
    scenario = _deploy_scenario(args, sizes)
    if scenario.federation.clients_per_round > args.nodes:  # every node trains each round
        sizes.append(f"federation.clients_per_round={args.nodes}")
        scenario = _deploy_scenario(args, sizes)
    out_dir = Path(args.out) if args.out else default_out_dir(scenario)
    summary = deploy_local(scenario, args.nodes, out_dir, strangers=args.unregistered)
    final = summary["final"].get("eval_accuracy", float("nan"))
    print(
        f"fedpeft deploy: done: {summary['rounds_completed']} rounds on {args.nodes} "
        f"SuperNodes, eval_accuracy {final:.4f}; outputs in {out_dir}; every process "
        "it started is stopped"
    )
    return 0


def _cmd_deploy_run(args: argparse.Namespace) -> int:
    import tempfile

    from fedpeft.deploy import CA_CERT, check_superlink_address, submit_run

    address = check_superlink_address(args.superlink)
    if bool(args.certs) == bool(args.insecure):
        raise DeployError("pass --certs DIR (the federation's ca.crt) or --insecure, not both")
    scenario = _deploy_scenario(args)
    ca = None
    if args.certs:
        certs = Path(args.certs)
        ca = certs / CA_CERT if certs.is_dir() else certs
    secure = ca is not None and not args.no_node_auth
    with tempfile.TemporaryDirectory(prefix="fedpeft-deploy-") as tmp:
        return submit_run(scenario.to_json(), address, ca, args.out or "", secure, Path(tmp))


STAGE_HELP = {
    "topk": "keep the largest |x| share (topk_fraction) of the update; positions varint-coded",
    "fp16 / bf16": "cast values to 16 bits",
    "int8 / int4": "symmetric quantisation, a scale per tensor or row; stochastic_rounding",
}


def _cmd_list(args: argparse.Namespace) -> int:
    if args.keys:
        from fedpeft.config import help_lines

        print("\n".join(help_lines()))
        return 0
    from fedpeft import scenarios
    from fedpeft.data import BUNDLED
    from fedpeft.methods import METHODS
    from fedpeft.models import ALIASES
    from fedpeft.strategies import STRATEGIES

    print("PEFT methods:")
    for m in sorted(METHODS.values(), key=lambda m: (m.family, m.name)):
        print(f"  {m.name:<16} [{m.family}] {m.description}")
    print('  (hybrid: a list combines methods on one model, e.g. ["lora", "bitfit"])')
    print("strategies:")
    for s in sorted(STRATEGIES.values(), key=lambda s: s.name):
        print(f"  {s.name:<16} {s.description}")
    print("compression stages ([compression] uplink / downlink, in this order):")
    for name, text in STAGE_HELP.items():
        print(f"  {name:<16} {text}")
    print("scenarios:")
    for name, path in scenarios.bundled().items():
        print(f"  {name:<16} {scenarios.describe(path)}")
    print("data sets:")
    for name, text in BUNDLED.items():
        print(f"  {name:<20} {text}")
    print("model aliases:")
    for name, (_, _, text) in ALIASES.items():
        print(f"  {name:<16} {text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``fedpeft`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="fedpeft", description="Federated parameter-efficient fine-tuning on Flower."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from fedpeft import scenarios

    bundled = ", ".join(sorted(scenarios.bundled()))
    epilog = (
        f"bundled scenarios: {bundled} (`fedpeft list` says what each one is; "
        "`fedpeft list --keys` lists every key --set takes)"
    )
    run = sub.add_parser(
        "run",
        help="run a scenario in Flower's Simulation Engine",
        # wrapped here: argparse would break scenario names at their hyphens
        epilog=textwrap.fill(epilog, 78, break_on_hyphens=False),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "scenario", nargs="?", help="scenario TOML path or bundled name (default: quickstart)"
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a scenario key; VALUE is a TOML value",
    )
    run.add_argument("--out", help="output folder (default: runs/<scenario>-<timestamp>/)")
    run.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="join this running Ray cluster (simulation.ray_address)",
    )
    run.add_argument(
        "--resume", metavar="DIR", help="carry on an interrupted run from DIR's last checkpoint"
    )
    run.add_argument(
        "--verbose",
        action="store_true",
        help="show Flower's and Ray's logs, the client processes' too",
    )
    run.set_defaults(func=_cmd_run)
    cmp = sub.add_parser("compare", help="run a scenario per strategy x --vary value x seed")
    cmp.add_argument("scenario", help="scenario TOML path or bundled name")
    cmp.add_argument(
        "--strategies", metavar="A,B,C", help="strategies to compare (default: the scenario's own)"
    )
    cmp.add_argument("--seeds", metavar="0,1,2", help="seeds (default: the scenario's seed)")
    cmp.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="sweep a key over TOML values (split on top-level commas)",
    )
    cmp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a scenario key in every cell (TOML value)",
    )
    cmp.add_argument("--out", help="output folder (default: runs/compare-<scenario>-<timestamp>/)")
    cmp.set_defaults(func=_cmd_compare)
    bench = sub.add_parser("bench", help="run benchmarks/ and regenerate benchmarks/RESULTS.md")
    bench.add_argument(
        "--quick", action="store_true", help="smaller sizes, under 15 minutes on a 2-core CPU"
    )
    bench.add_argument("--only", metavar="A,B", help="run only these benchmarks")
    bench.set_defaults(func=_cmd_bench)
    dep = sub.add_parser("deploy", help="certificates, keys and Flower processes for a deployment")
    dsub = dep.add_subparsers(dest="deploy_command", required=True)
    certs = dsub.add_parser("certs", help="a CA and a SuperLink certificate for the given hosts")
    certs.add_argument("dir", help="output folder")
    certs.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME_OR_IP",
        help="a name or IP SuperNodes use to reach the SuperLink (repeatable); "
        "localhost and 127.0.0.1 are always added",
    )
    certs.add_argument("--days", type=int, default=365, help="validity (default 365 days)")
    certs.set_defaults(func=_cmd_deploy_certs)
    nkey = dsub.add_parser("node-key", help="a SuperNode key pair: PREFIX and PREFIX.pub")
    nkey.add_argument("prefix", help="path of the private key, e.g. keys/node0")
    nkey.set_defaults(func=_cmd_deploy_node_key)
    link = dsub.add_parser("superlink", help="start a SuperLink: TLS and node authentication")
    link.add_argument("--certs", metavar="DIR", help="folder from `fedpeft deploy certs`")
    link.add_argument(
        "--insecure",
        action="store_true",
        help="plain text, no node authentication (trusted networks)",
    )
    link.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    link.add_argument("--port", type=int, default=8000, help="the one port of all its APIs")
    link.add_argument(
        "--no-auth",
        action="store_true",
        help="TLS, but let any SuperNode join (no key registration)",
    )
    link.add_argument("--database", help="SQLite file for the SuperLink's state (default: memory)")
    link.set_defaults(func=_cmd_deploy_superlink)
    node = dsub.add_parser("supernode", help="start a SuperNode serving one partition")
    node.add_argument("--superlink", required=True, metavar="HOST:PORT")
    node.add_argument("--partition-id", type=int, required=True, metavar="I")
    node.add_argument("--num-partitions", type=int, required=True, metavar="N")
    node.add_argument("--certs", metavar="DIR", help="folder with the federation's ca.crt")
    node.add_argument("--key", metavar="FILE", help="this node's key (`fedpeft deploy node-key`)")
    node.add_argument("--insecure", action="store_true", help="plain-text SuperLink")
    node.add_argument(
        "--port",
        type=int,
        default=9094,
        help="this node's own API port (distinct per node on one host)",
    )
    node.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the scenario's)")
    node.add_argument("--rank", type=int, help="this node's LoRA rank (heterogeneous ranks)")
    node.add_argument("--state-dir", help="where this node keeps per-client state across rounds")
    node.add_argument(
        "--data", metavar="PATH", help="the node's own csv/jsonl/parquet data, not partition I"
    )
    node.set_defaults(func=_cmd_deploy_supernode)
    drun = dsub.add_parser("run", help="submit a scenario to a SuperLink and stream its progress")
    drun.add_argument("scenario", help="scenario TOML path or bundled name")
    drun.add_argument("--superlink", required=True, metavar="HOST:PORT")
    drun.add_argument("--certs", metavar="DIR", help="folder with the federation's ca.crt (TLS)")
    drun.add_argument("--insecure", action="store_true", help="plain-text SuperLink")
    drun.add_argument(
        "--no-node-auth",
        action="store_true",
        help="the SuperLink lets any node join (secure=false)",
    )
    drun.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a scenario key; VALUE is a TOML value",
    )
    drun.add_argument(
        "--out",
        help="output folder ON THE SUPERLINK'S MACHINE (absolute; "
        "default: runs/<scenario>-<timestamp>/ in its folder)",
    )
    drun.set_defaults(func=_cmd_deploy_run)
    dloc = dsub.add_parser("local", help="a whole TLS + node-auth federation on 127.0.0.1")
    dloc.add_argument(
        "scenario",
        nargs="?",
        default="smoke",
        help="scenario TOML path or bundled name (default: smoke)",
    )
    dloc.add_argument("--nodes", type=int, default=2, help="SuperNodes (= data.num_clients)")
    dloc.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a scenario key; VALUE is a TOML value",
    )
    dloc.add_argument("--out", help="output folder (default: runs/<scenario>-<timestamp>/)")
    dloc.add_argument(
        "--unregistered",
        type=int,
        default=0,
        metavar="K",
        help="also start K nodes with unregistered keys (refused)",
    )
    dloc.set_defaults(func=_cmd_deploy_local)
    lst = sub.add_parser("list", help="list PEFT methods, strategies, scenarios and data sets")
    lst.add_argument("--keys", action="store_true", help="list every scenario key instead")
    lst.set_defaults(func=_cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedpeft`` console script."""
    # libraries' deprecation notes are for their callers' authors, not fedpeft's users
    # (the run's other processes get the same filter from server.simulation.QUIET_ENV)
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


if __name__ == "__main__":
    sys.exit(main())
