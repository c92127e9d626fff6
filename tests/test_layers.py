"""The import contract: fedpeft's layers import one way, checked on every module's source.

    tools (cli, compare, deploy, local_federation, bench, interrupt)
      -> server, clients   (never each other)
        -> strategies
          -> core (everything else in fedpeft: config, methods, adapters, models, tasks,
                   data, codecs, train, privacy, faults, records, report, lora, ...)

Every ``import`` counts, those inside functions too. Read with ``ast``, not by importing,
so a violation is found even in a module no test imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: folder -> the package it installs as (the folders stay at the top of the repository)
PACKAGES = {
    "fedpeft": "fedpeft",
    "server": "fedpeft.server",
    "clients": "fedpeft.clients",
    "strategies": "fedpeft.strategies",
    "scenarios": "fedpeft.scenarios",
}
TOOLS = {"cli", "compare", "deploy", "local_federation", "bench", "interrupt"}
#: layer -> the layers it may import (and itself)
ALLOWED = {
    "core": {"core"},
    "strategies": {"core", "strategies"},
    "clients": {"core", "strategies", "clients"},
    "server": {"core", "strategies", "server"},
    "tools": {"core", "strategies", "clients", "server", "tools"},
}
#: (importer, imported) pairs allowed for now, each with why; an empty set is the goal
EXCEPTIONS = {
    # the simulation launcher hands Flower both apps; it belongs with the tools
    ("fedpeft.server.simulation", "fedpeft.clients.app"),
}


def layer(module: str) -> str | None:
    """The layer of a fedpeft module, or None for a module outside fedpeft."""
    parts = module.split(".")
    if parts[0] != "fedpeft":
        return None
    if len(parts) == 1:
        return "core"
    if parts[1] in ("server", "clients", "strategies"):
        return parts[1]
    return "tools" if parts[1] in TOOLS else "core"


def modules() -> dict[str, Path]:
    """Every module of the installed package, by its name, from the repository's folders."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if folder == "fedpeft" and path.relative_to(ROOT / folder).parts[0] in PACKAGES:
                continue  # fedpeft/server etc. are links to the top-level folders
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join([package, *parts])
            found[name.removesuffix(".__init__")] = path
    return found


def imported(source: str, module: str, is_package: bool) -> set[str]:
    """The fedpeft modules ``source`` (module ``module``) imports, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in out if layer(name) is not None}


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """Each import of ``source`` that crosses the layers the wrong way, as one line."""
    mine = layer(module)
    assert mine is not None
    bad = []
    for target in sorted(imported(source, module, is_package)):
        theirs = layer(target)
        excepted = any(
            module == importer and (target == allowed or target.startswith(f"{allowed}."))
            for importer, allowed in EXCEPTIONS
        )
        if theirs not in ALLOWED[mine] and not excepted:
            bad.append(f"{module} ({mine}) imports {target} ({theirs})")
    return bad


def test_every_module_imports_only_its_own_layer_and_those_below():
    found = modules()
    assert {"fedpeft.config", "fedpeft.server.run", "fedpeft.clients.app"} <= set(found)
    bad = []
    for name, path in found.items():
        bad += violations(path.read_text(encoding="utf-8"), name, path.name == "__init__.py")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("fedpeft.config", "from fedpeft.server.run import run_federation"),
        ("fedpeft.adapters", "def f():\n    from fedpeft.strategies import lora_math"),
        ("fedpeft.models", "import fedpeft.cli"),
        ("fedpeft.strategies.flora", "from fedpeft.clients.app import app"),
        ("fedpeft.clients.app", "from fedpeft.server import grid"),
        ("fedpeft.server.run", "from fedpeft.clients import app"),
        ("fedpeft.server.run", "from ..clients import app"),
    ],
)
def test_the_contract_catches_an_import_the_wrong_way(module, source):
    assert violations(source, module)


def test_the_contract_lets_an_import_the_right_way_through():
    assert not violations("from fedpeft.config import Scenario", "fedpeft.strategies.flora")
    assert not violations("from fedpeft.strategies import get_strategy", "fedpeft.clients.app")
    assert not violations("from fedpeft.server.simulation import simulate", "fedpeft.cli")
    assert not violations("import torch\nfrom . import records", "fedpeft.faults")
