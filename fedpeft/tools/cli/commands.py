"""The other commands: ``compare``, ``bench``, ``deploy ...`` and ``list``.

Each one imports what it drives when it runs: see :mod:`fedpeft.tools.cli`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from fedpeft.config import Scenario, load_scenario
from fedpeft.tools.deploy import DeployError


def cmd_bench(args: argparse.Namespace) -> int:
    """``fedpeft bench``: run the benchmarks and regenerate RESULTS.md."""
    from fedpeft.tools.bench import run_bench

    return run_bench(args.quick, args.only.split(",") if args.only else None)


def cmd_compare(args: argparse.Namespace) -> int:
    """``fedpeft compare``: run and tabulate a sweep of the scenario."""
    from fedpeft.tools.compare import run_compare

    return run_compare(args.scenario, args.strategies, args.seeds, args.vary, args.set, args.out)


def cmd_eval(args: argparse.Namespace) -> int:
    """``fedpeft eval RUN_DIR``: benchmark scores and generations of a run's adapter."""
    from fedpeft.evaluation.generation import Sampling
    from fedpeft.tools.evaluate import evaluate_run
    from fedpeft.tools.simulation import quiet_libraries, set_process_env

    set_process_env()
    quiet_libraries()
    evaluate_run(
        Path(args.run_dir),
        args.benchmark,
        questions=args.questions,
        few_shot=args.few_shot,
        chat_template=args.chat_template,
        batch_size=args.batch_size,
        prompts=Path(args.generate) if args.generate else None,
        answers=Path(args.answers) if args.answers else None,
        sampling=Sampling(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            chat_template=args.chat_template,
        ),
        device=args.device,
    )
    return 0


def cmd_data_preview(args: argparse.Namespace) -> int:
    """``fedpeft data preview``: the first training examples as the model sees them."""
    from fedpeft.config import load_scenario
    from fedpeft.tools.preview import preview
    from fedpeft.tools.simulation import quiet_libraries, set_process_env

    set_process_env()
    quiet_libraries()
    scenario = load_scenario(args.scenario, args.set)
    print("\n".join(preview(scenario, args.n)))
    return 0


def cmd_deploy_certs(args: argparse.Namespace) -> int:
    """``fedpeft deploy certs``: a CA and a SuperLink certificate."""
    from fedpeft.tools.deploy import make_certs

    paths = make_certs(args.dir, args.host, days=args.days)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    print(
        f"the SuperLink uses {args.dir}; SuperNodes and `flwr` need only {paths['ca.crt']}; "
        f"keep {paths['ca.key']} offline"
    )
    return 0


def cmd_deploy_node_key(args: argparse.Namespace) -> int:
    """``fedpeft deploy node-key``: a SuperNode key pair."""
    from fedpeft.tools.deploy import make_node_key

    private, public = make_node_key(args.prefix)
    print(
        f"wrote {private} (stays on the node) and {public} (register it: "
        f"`flwr supernode register {public} CONNECTION`)"
    )
    return 0


def cmd_deploy_superlink(args: argparse.Namespace) -> int:
    """``fedpeft deploy superlink``: this process becomes the SuperLink."""
    from fedpeft.tools.deploy import SuperLinkOptions, deploy_env, superlink_command

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


def cmd_deploy_supernode(args: argparse.Namespace) -> int:
    """``fedpeft deploy supernode``: this process becomes a SuperNode."""
    from fedpeft.tools.deploy import (
        SuperNodeOptions,
        deploy_env,
        run_supernode_with_trainer,
        supernode_command,
    )

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
        poll_interval=args.poll_interval,
    )
    if args.no_trainer:
        cmd = supernode_command(opts)
        print(f"fedpeft: {shlex.join(cmd)}", file=sys.stderr, flush=True)
        os.execve(cmd[0], cmd, deploy_env())  # the SuperNode takes this process (and its PID)
    return run_supernode_with_trainer(opts, deploy_env(), forwarder=args.forwarder)


def _deploy_scenario(args: argparse.Namespace, extra: list[str] | None = None) -> Scenario:
    """The scenario to deploy, checked here before any process starts."""
    from fedpeft.methods import check_methods
    from fedpeft.strategies import build_strategy

    scenario = load_scenario(args.scenario, [*args.set, *(extra or [])])
    check_methods(scenario.peft, scenario.model.task)
    build_strategy(scenario)
    return scenario


def cmd_deploy_local(args: argparse.Namespace) -> int:
    """``fedpeft deploy local``: a whole federation on 127.0.0.1, run and stopped."""
    from fedpeft.server.run import default_out_dir
    from fedpeft.tools.deploy import deploy_local

    if args.nodes < 1:
        raise DeployError(f"--nodes must be at least 1, got {args.nodes}")
    sizes = [f"data.num_clients={args.nodes}"]
    scenario = _deploy_scenario(args, sizes)
    if scenario.federation.clients_per_round > args.nodes:  # every node trains each round
        sizes.append(f"federation.clients_per_round={args.nodes}")
        scenario = _deploy_scenario(args, sizes)
    out_dir = Path(args.out) if args.out else default_out_dir(scenario)
    summary = deploy_local(
        scenario,
        args.nodes,
        out_dir,
        strangers=args.unregistered,
        trainer=not args.no_trainer,
        poll_interval=args.poll_interval,
        forwarder=args.forwarder,
    )
    final = summary["final"].get("eval_accuracy", float("nan"))
    print(
        f"fedpeft deploy: done: {summary['rounds_completed']} rounds on {args.nodes} "
        f"SuperNodes, eval_accuracy {final:.4f}; outputs in {out_dir}; every process "
        "it started is stopped"
    )
    return 0


def cmd_deploy_run(args: argparse.Namespace) -> int:
    """``fedpeft deploy run``: submit the scenario to a SuperLink, stream its progress."""
    import tempfile

    from fedpeft.tools.deploy import CA_CERT, check_superlink_address, submit_run

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


def cmd_list(args: argparse.Namespace) -> int:
    """``fedpeft list``: what fedpeft knows, or (``--keys``) every scenario key."""
    if args.keys:
        from fedpeft.config import help_lines

        print("\n".join(help_lines()))
        return 0
    from fedpeft import scenarios
    from fedpeft.data import BUNDLED
    from fedpeft.evaluation.multiple_choice import BUNDLED_BENCHMARKS
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
    print("benchmarks (fedpeft eval --benchmark, [eval] benchmarks; also files and hub ids):")
    for name, text in BUNDLED_BENCHMARKS.items():
        print(f"  {name:<16} {text}")
    return 0
