"""Submitting a run: ``flwr run APP CONNECTION --stream`` with a FAB that carries no code.

The app's components are imported from the fedpeft installed next to the SuperLink and
every SuperNode, so a run uses exactly the fedpeft those machines have.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedpeft.tools.deploy.errors import DeployError
from fedpeft.tools.deploy.flower import deploy_env, flower_bin

#: run-config keys of the fedpeft Flower app, with their defaults. The repository's
#: pyproject.toml declares the same keys (a test checks); Flower refuses any key a run
#: passes that the app does not declare.
APP_CONFIG: dict[str, str | bool] = {
    "scenario": "quickstart",  # a bundled scenario name or a scenario TOML path
    "out-dir": "",  # output folder on the SuperLink's machine; empty: runs/<name>-<time>/
    "scenario-json": "",  # the resolved scenario (what `fedpeft run` and `deploy run` pass)
    "engine": "",  # "deployment", "simulation"; empty: the ServerApp tells from its Grid
    "secure": False,  # the caller's word that TLS and SuperNode authentication are on
}
CONNECTION = "fedpeft"  # the connection name fedpeft writes into its own FLWR_HOME


def _toml_value(value: str | bool) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_app(folder: Path) -> Path:
    """Write the Flower app that ``flwr run`` packs (a FAB holding only this pyproject.toml).

    Its components, ``fedpeft.server.app:app`` and ``fedpeft.clients.forwarder:app``, are
    imported from the fedpeft installed next to the SuperLink and every SuperNode, so the
    FAB carries no code and the run uses exactly the fedpeft those machines have.
    """
    from fedpeft import __version__

    folder.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f"{k} = {_toml_value(v)}" for k, v in APP_CONFIG.items())
    (folder / "pyproject.toml").write_text(
        "# Written by `fedpeft deploy`: the app code is the installed fedpeft package.\n"
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "fedpeft-app"\nversion = "{__version__}"\n'
        'description = "fedpeft ServerApp and ClientApp"\nlicense = "Apache-2.0"\n'
        "dependencies = []\n\n"
        '[tool.flwr.app]\npublisher = "fedpeft"\n\n'
        '[tool.flwr.app.components]\nserverapp = "fedpeft.server.app:app"\n'
        'clientapp = "fedpeft.clients.forwarder:app"\n\n'
        f"[tool.flwr.app.config]\n{config}\n",
        encoding="utf-8",
    )
    return folder


def write_connection(home: Path, superlink: str, ca: Path | None) -> str:
    """Write ``FLWR_HOME/config.toml`` with one connection to ``superlink``; return its name.

    ``ca`` is the federation's CA certificate (TLS), or None for a plain-text SuperLink.
    """
    home.mkdir(parents=True, exist_ok=True)
    if ca is not None and not ca.is_file():
        raise DeployError(f"no CA certificate at {ca}")
    trust = (
        f"root-certificates = {_toml_value(str(ca.resolve()))}\n"  # Flower needs it absolute
        if ca is not None
        else "insecure = true\n"
    )
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f"address = {_toml_value(superlink)}\n{trust}",
        encoding="utf-8",
    )
    return CONNECTION


def write_run_config(path: Path, scenario_json: str, out_dir: str, secure: bool) -> Path:
    """The ``--run-config`` file of a deployed run: the resolved scenario and where to write."""
    values: dict[str, str | bool] = {
        "scenario-json": scenario_json,
        "out-dir": out_dir,
        "engine": "deployment",
        "secure": secure,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()))
    return path


def flwr_run_command(app: Path, connection: str, run_config: Path) -> list[str]:
    """``flwr run APP CONNECTION --stream --run-config FILE``."""
    return [
        flower_bin("flwr"),
        "run",
        str(app),
        connection,
        "--stream",
        "--run-config",
        str(run_config),
    ]


def submit_run(
    scenario_json: str,
    superlink: str,
    ca: Path | None,
    out_dir: str,
    secure: bool,
    work: Path,
    env: dict[str, str] | None = None,
) -> int:
    """Submit a scenario with ``flwr run --stream``; echo its progress; return its exit code.

    ``work`` receives the FLWR_HOME with one connection, the app and the run-config file,
    and ``flwr-run.log``, a copy of what was streamed. ``out_dir`` is where the ServerApp
    writes the outputs, on the SuperLink's machine (empty: its runs/ folder).
    """
    import subprocess

    home = work / "flwr-home"
    connection = write_connection(home, superlink, ca)
    app = write_app(work / "app")
    config = write_run_config(work / "run-config.toml", scenario_json, out_dir, secure)
    run_env = {**(env or deploy_env()), "FLWR_HOME": str(home)}
    with (work / "flwr-run.log").open("w") as log:
        proc = subprocess.Popen(
            flwr_run_command(app, connection, config),
            env=run_env,
            cwd=work,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            return proc.wait()
        finally:
            if proc.poll() is None:  # interrupted: the CLI goes; the run stays on the SuperLink
                proc.terminate()
                proc.wait()
