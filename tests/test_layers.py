"""The import contract: fedpeft's layers import one way, checked on every module's source.

    tools (fedpeft.tools: cli, simulation, compare, deploy, bench, interrupt)
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
#: layer -> the layers it may import (and itself)
ALLOWED = {
    "core": {"core"},
    "strategies": {"core", "strategies"},
    "clients": {"core", "strategies", "clients"},
    "server": {"core", "strategies", "server"},
    "tools": {"core", "strategies", "clients", "server", "tools"},
}
#: (importer, imported) pairs allowed for now, each with why; kept empty
EXCEPTIONS: set[tuple[str, str]] = set()


def layer(module: str) -> str | None:
    """The layer of a fedpeft module, or None for a module outside fedpeft."""
    parts = module.split(".")
    if parts[0] != "fedpeft":
        return None
    if len(parts) == 1:
        return "core"
    if parts[1] in ("server", "clients", "strategies", "tools"):
        return parts[1]
    return "core"


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
        ("fedpeft.models", "import fedpeft.tools.cli"),
        ("fedpeft.report", "from fedpeft.tools.compare import plot_rows"),
        ("fedpeft.server.run", "from fedpeft.tools.simulation import simulate"),
        ("fedpeft.clients.app", "from ..tools import interrupt"),
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
    assert not violations("from fedpeft.tools.simulation import simulate", "fedpeft.tools.cli.run")
    assert not violations("from fedpeft.clients.app import app", "fedpeft.tools.simulation")
    assert not violations("from fedpeft.server.run import default_out_dir", "fedpeft.tools.cli")
    assert not violations("import torch\nfrom . import records", "fedpeft.faults")


def module_level_imports(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The fedpeft modules importing ``module`` runs: its imports outside functions.

    ``from a import b`` counts as ``a.b`` when that is a module, else as ``a``; importing
    ``a.b`` also imports the packages above it, except those above ``module`` itself
    (already imported, or being imported, when ``module`` runs). Imports under ``if
    TYPE_CHECKING:`` never run.
    """
    targets: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = module.split(".")
                    base = parts[: len(parts) - node.level + is_package]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    name = f"{target}.{alias.name}"
                    targets.add(name if name in known else target)
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit([n for n in getattr(node, field, []) if isinstance(n, ast.stmt)])
            for handler in getattr(node, "handlers", []):
                visit(handler.body)

    visit(ast.parse(source).body)
    mine = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    out = set()
    for target in targets:
        parts = target.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {t for t in out if t in known and t not in mine and t != module}


def import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as a path that ends where it starts, or [] when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return []


def test_core_modules_import_each_other_without_a_cycle():
    """Core imports top-down: no module needs an import hidden in a function to load.

    Every core module can then be imported first, in a fresh interpreter, whatever the
    order (a registry sits below its members, shared constants below both readers).
    """
    found = {name: path for name, path in modules().items() if layer(name) == "core"}
    known = set(found)
    graph = {
        name: module_level_imports(
            path.read_text(encoding="utf-8"), name, path.name == "__init__.py", known
        )
        for name, path in found.items()
    }
    assert {"fedpeft.models", "fedpeft.tasks", "fedpeft.methods"} <= known
    cycle = import_cycle(graph)
    assert not cycle, "import cycle among core modules: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    ("sources", "cycle"),
    [
        ({"fedpeft.a": "from fedpeft import b", "fedpeft.b": "import fedpeft.a"}, True),
        (
            {"fedpeft.a": "from fedpeft import b", "fedpeft.b": "def f():\n    import fedpeft.a"},
            False,
        ),
        (
            {"fedpeft.p": "from fedpeft.p import m", "fedpeft.p.m": "from fedpeft.p.r import x"},
            False,
        ),
        (
            {
                "fedpeft.p": "from fedpeft.p import m",
                "fedpeft.q": "from fedpeft.p.m import x",
                "fedpeft.p.m": "import fedpeft.q",
            },
            True,
        ),
    ],
)
def test_the_cycle_check_finds_a_cycle_and_only_a_cycle(sources, cycle):
    known = set(sources) | {"fedpeft.p.r"}
    graph = {
        name: module_level_imports(src, name, name in ("fedpeft.p",), known)
        for name, src in sources.items()
    }
    assert bool(import_cycle(graph)) == cycle


#: a long file says why at the top, in its module docstring, with these words
LONG_ON_PURPOSE = "Longer than 500 lines on purpose"


def _source_files() -> list[Path]:
    """Every Python source of the package, each once (fedpeft/ links the top folders)."""
    found = {
        p.resolve()
        for folder in PACKAGES
        if folder != "scenarios"
        for p in (ROOT / folder).rglob("*.py")
    }
    return sorted(found)


def test_no_source_file_over_500_lines_nor_function_over_80_unless_it_says_why() -> None:
    too_long = []
    for path in _source_files():
        source = path.read_text()
        tree = ast.parse(source)
        docstring = ast.get_docstring(tree) or ""
        if source.count("\n") > 500 and LONG_ON_PURPOSE not in docstring:
            too_long.append(f"{path.relative_to(ROOT)}: {source.count(chr(10))} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 80:
                    too_long.append(f"{path.relative_to(ROOT)}: {node.name}() {length} lines")
    assert not too_long, "\n".join(too_long)
