"""The ``fedpeft`` argument parser: a function per sub-command, each its flags and help."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from fedpeft.tools.cli import commands
from fedpeft.tools.cli.run import cmd_run

#: what ``add_subparsers`` returns (argparse keeps the type private)
SubParsers = Any


def build_parser() -> argparse.ArgumentParser:
    """The ``fedpeft`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="fedpeft", description="Federated parameter-efficient fine-tuning on Flower."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_compare(sub)
    _add_bench(sub)
    _add_eval(sub)
    dep = sub.add_parser("deploy", help="certificates, keys and Flower processes for a deployment")
    dsub = dep.add_subparsers(dest="deploy_command", required=True)
    _add_deploy_certs(dsub)
    _add_deploy_node_key(dsub)
    _add_deploy_superlink(dsub)
    _add_deploy_supernode(dsub)
    _add_deploy_run(dsub)
    _add_deploy_local(dsub)
    _add_list(sub)
    data = sub.add_parser("data", help="inspect a scenario's data")
    _add_data_preview(data.add_subparsers(dest="data_command", required=True))
    return parser


def _add_set(parser: argparse.ArgumentParser, text: str) -> None:
    """The repeatable ``--set KEY=VALUE`` override, as every scenario command takes it."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=text)


def _add_run(sub: SubParsers) -> None:
    """``fedpeft run``; its epilog lists the bundled scenarios."""
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
    _add_set(run, "override a scenario key; VALUE is a TOML value")
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
    run.set_defaults(func=cmd_run)


def _add_compare(sub: SubParsers) -> None:
    """``fedpeft compare``: strategies x ``--vary`` values x seeds."""
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
    _add_set(cmp, "override a scenario key in every cell (TOML value)")
    cmp.add_argument("--out", help="output folder (default: runs/compare-<scenario>-<timestamp>/)")
    cmp.set_defaults(func=commands.cmd_compare)


def _add_eval(sub: SubParsers) -> None:
    """``fedpeft eval RUN_DIR``: benchmarks and generations of a finished run's adapter."""
    ev = sub.add_parser(
        "eval", help="score a finished run's adapter on benchmarks, or answer prompts with it"
    )
    ev.add_argument("run_dir", metavar="RUN_DIR", help="the folder of a finished fedpeft run")
    ev.add_argument(
        "--benchmark",
        action="append",
        default=[],
        metavar="NAME_OR_PATH",
        help="multiple-choice benchmark: wordnet-mc, a csv/jsonl/parquet file or a hub id "
        "(cais/mmlu:all); repeatable; scores go to RUN_DIR/eval.json",
    )
    ev.add_argument("--questions", type=int, default=0, help="first N questions only (0 = all)")
    ev.add_argument("--few-shot", type=int, default=0, help="solved examples before each question")
    ev.add_argument(
        "--chat-template", action="store_true", help="write prompts with the chat template"
    )
    ev.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    ev.add_argument(
        "--generate",
        metavar="PROMPTS.jsonl",
        help="answer each prompt (prompt/instruction, MT-Bench turns or messages)",
    )
    ev.add_argument(
        "--answers", metavar="FILE", help="answers JSONL (default RUN_DIR/answers.jsonl)"
    )
    ev.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer at most")
    ev.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; above 0 samples")
    ev.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's p")
    ev.add_argument("--seed", type=int, default=0, help="seed of sampled answers")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    ev.set_defaults(func=commands.cmd_eval)


def _add_bench(sub: SubParsers) -> None:
    """``fedpeft bench``."""
    bench = sub.add_parser("bench", help="run benchmarks/ and regenerate benchmarks/RESULTS.md")
    bench.add_argument(
        "--quick", action="store_true", help="smaller sizes, under 15 minutes on a 2-core CPU"
    )
    bench.add_argument("--only", metavar="A,B", help="run only these benchmarks")
    bench.set_defaults(func=commands.cmd_bench)


def _add_deploy_certs(dsub: SubParsers) -> None:
    """``fedpeft deploy certs``."""
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
    certs.set_defaults(func=commands.cmd_deploy_certs)


def _add_deploy_node_key(dsub: SubParsers) -> None:
    """``fedpeft deploy node-key``."""
    nkey = dsub.add_parser("node-key", help="a SuperNode key pair: PREFIX and PREFIX.pub")
    nkey.add_argument("prefix", help="path of the private key, e.g. keys/node0")
    nkey.set_defaults(func=commands.cmd_deploy_node_key)


def _add_deploy_superlink(dsub: SubParsers) -> None:
    """``fedpeft deploy superlink``."""
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
    link.set_defaults(func=commands.cmd_deploy_superlink)


def _add_deploy_supernode(dsub: SubParsers) -> None:
    """``fedpeft deploy supernode``."""
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
    _add_node_options(node)
    node.set_defaults(func=commands.cmd_deploy_supernode)


def _add_deploy_run(dsub: SubParsers) -> None:
    """``fedpeft deploy run``."""
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
    _add_set(drun, "override a scenario key; VALUE is a TOML value")
    drun.add_argument(
        "--out",
        help="output folder ON THE SUPERLINK'S MACHINE (absolute; "
        "default: runs/<scenario>-<timestamp>/ in its folder)",
    )
    drun.set_defaults(func=commands.cmd_deploy_run)


def _add_deploy_local(dsub: SubParsers) -> None:
    """``fedpeft deploy local``."""
    dloc = dsub.add_parser("local", help="a whole TLS + node-auth federation on 127.0.0.1")
    dloc.add_argument(
        "scenario",
        nargs="?",
        default="smoke",
        help="scenario TOML path or bundled name (default: smoke)",
    )
    dloc.add_argument("--nodes", type=int, default=2, help="SuperNodes (= data.num_clients)")
    _add_set(dloc, "override a scenario key; VALUE is a TOML value")
    dloc.add_argument("--out", help="output folder (default: runs/<scenario>-<timestamp>/)")
    dloc.add_argument(
        "--unregistered",
        type=int,
        default=0,
        metavar="K",
        help="also start K nodes with unregistered keys (refused)",
    )
    _add_node_options(dloc)
    dloc.set_defaults(func=commands.cmd_deploy_local)


def _add_node_options(parser: argparse.ArgumentParser) -> None:
    """How a SuperNode serves its messages: with or without its trainer, how often it polls."""
    parser.add_argument(
        "--no-trainer",
        action="store_true",
        help="no long-lived trainer: Flower's ClientApp process loads the model per message",
    )
    parser.add_argument(
        "--forwarder",
        action="store_true",
        help="Flower starts a ClientApp process per message, which forwards it to the "
        "trainer (default: the trainer runs the node's tasks itself)",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        metavar="S",
        help="seconds a node waits after an empty pull (default: Flower's fixed 3 s)",
    )


def _add_data_preview(dsub: SubParsers) -> None:
    """``fedpeft data preview``."""
    prev = dsub.add_parser(
        "preview", help="the first training examples as tokenised, the loss's tokens in [[...]]"
    )
    prev.add_argument("scenario", help="scenario TOML path or bundled name")
    _add_set(prev, "override a scenario key (TOML value); repeatable")
    prev.add_argument("--n", type=int, default=3, help="how many examples (default: 3)")
    prev.set_defaults(func=commands.cmd_data_preview)


def _add_list(sub: SubParsers) -> None:
    """``fedpeft list``."""
    lst = sub.add_parser("list", help="list PEFT methods, strategies, scenarios and data sets")
    lst.add_argument("--keys", action="store_true", help="list every scenario key instead")
    lst.set_defaults(func=commands.cmd_list)
