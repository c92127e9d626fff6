"""Drive a scenario through Flower's Simulation Engine (Ray) from Python.

``fedpeft run`` calls :func:`simulate`. Flower's public ``run_simulation`` is deprecated
and cannot pass a run-config, so this uses the function it wraps, ``_run_simulation``,
which takes the app objects and the ServerApp's Context. Ray is started here and stopped
here: no process started by the run outlives it. With ``simulation.ray_address`` the run
joins a Ray cluster the user runs instead, and leaves it running (docs/scale-out.md).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import Context, RecordDict

from fedpeft import records
from fedpeft.config import Scenario

# Settings for every process a run starts (Ray workers inherit the driver's environment).
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",  # no usage telemetry unless the user opts in
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also transformers' "Loading weights" bars
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "PYTHONWARNINGS": "ignore::FutureWarning",  # library deprecation notes, not user problems
}


def set_process_env() -> None:
    """Apply :data:`QUIET_ENV` where the user has not set the variable."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def quiet_libraries() -> None:
    """Apply the quiet settings in effect to libraries this process has already imported.

    ``datasets`` and ``transformers`` read their variables once, on import: progress bars
    (``Generating train split``, ``Saving the dataset``) and transformers' LOAD REPORT
    (a fresh classifier head is MISSING from a pretrained checkpoint, as intended) would
    otherwise still reach the console. A user's own setting of a variable is kept.
    """
    import datasets
    import transformers

    if os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS") == "1":
        datasets.disable_progress_bars()
    if os.environ.get("TRANSFORMERS_VERBOSITY") == "error":
        transformers.logging.set_verbosity_error()
        datasets.logging.set_verbosity_error()
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":
        transformers.logging.disable_progress_bar()


def simulate(
    scenario: Scenario,
    out_dir: Path,
    verbose: bool = False,
    resume: bool = False,
    command: str = "",
) -> None:
    """Run ``scenario`` on ``data.num_clients`` virtual SuperNodes and write to ``out_dir``.

    With ``resume``, carry on from ``out_dir``'s checkpoint instead of starting afresh.
    ``command`` is the command line that started the run, recorded in the adapter's card.
    """
    set_process_env()
    os.environ["FEDPEFT_THREADS_PER_CLIENT"] = str(scenario.simulation.cpus_per_client)
    run_config: dict[str, bool | float | int | str] = {
        records.RUN_SCENARIO: scenario.name,
        records.RUN_SCENARIO_JSON: scenario.to_json(),
        records.RUN_OUT_DIR: str(out_dir),
        records.RUN_RESUME: resume,
        records.RUN_COMMAND: command,
    }
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    if scenario.simulation.engine == "in-process":
        run_config[records.RUN_ENGINE] = "in-process"
        simulate_in_process(scenario, server_context(run_config))
        return
    import ray
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from fedpeft.clients.app import app as client_app
    from fedpeft.server.app import app as server_app

    if address := scenario.simulation.ray_address:
        join_cluster(address, verbose)
    context = server_context(run_config)
    backend_config = {
        "client_resources": {
            "num_cpus": scenario.simulation.cpus_per_client,
            "num_gpus": scenario.simulation.gpus_per_client,
        },
        # "local": a Ray of the run's own, even where `ray start` left a cluster running on
        # this machine (ray.init would join that one); joining is simulation.ray_address
        # log_to_driver: the actors' own log lines (Flower's "Manually terminating
        # ClientAppActor" at shutdown, library warnings) only with --verbose; a client's
        # error reaches the run as a failed reply all the same
        "init_args": {
            "logging_level": "ERROR" if not verbose else "INFO",
            "address": "local",
            "log_to_driver": verbose,
            "include_dashboard": scenario.simulation.dashboard,
        },
    }
    if not scenario.simulation.ray_address:
        from fedpeft.report import step

        if scenario.simulation.dashboard:
            check_dashboard()
        step(
            f"starting Ray and {scenario.data.num_clients} virtual clients "
            f"({scenario.simulation.cpus_per_client} CPU each)"
            + (": dashboard at http://127.0.0.1:8265" if scenario.simulation.dashboard else "")
        )
    try:
        _run_simulation(
            num_supernodes=scenario.data.num_clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_config=backend_config,  # type: ignore[arg-type]
            server_app_context=context,
            verbose_logging=verbose,
        )
    finally:
        # Flower disconnects on success; make sure on failure too. On a local Ray this
        # stops it; on a joined cluster it only disconnects this driver.
        if ray.is_initialized():
            ray.shutdown()


def server_context(run_config: dict[str, bool | float | int | str]) -> Context:
    """The ServerApp's Context: the run's config, nothing else (no node, no state yet)."""
    return Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def simulate_in_process(scenario: Scenario, context: Context) -> None:
    """The same ServerApp and ClientApp, with every virtual client served in this process.

    :class:`fedpeft.server.inprocess.InProcessGrid` hands each message to the ClientApp
    (its mods included), one client after another: what a run computes is a Ray run's,
    without Ray's start-up or its processes.
    """
    from fedpeft.clients.app import app as client_app
    from fedpeft.report import step
    from fedpeft.server.app import main as server_main
    from fedpeft.server.inprocess import InProcessGrid

    step(f"serving {scenario.data.num_clients} virtual clients in this process, one by one")
    server_main(InProcessGrid(client_app, scenario.data.num_clients), context)


def check_dashboard() -> None:
    """Refuse ``simulation.dashboard`` where Ray lacks its dashboard's packages (minimal ray)."""
    from ray._private.utils import get_dashboard_dependency_error

    from fedpeft.config import ScenarioError

    if (missing := get_dashboard_dependency_error()) is not None:
        raise ScenarioError(
            f"simulation.dashboard=true, but Ray's dashboard cannot start here ({missing}): "
            "pip install 'ray[default]', or leave simulation.dashboard=false"
        )


def reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once, in one line, when nothing listens at HOST:PORT (Ray retries for minutes)."""
    import socket

    from fedpeft.config import ScenarioError

    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ScenarioError(
            f"simulation.ray_address={address!r} is not HOST:PORT (or auto): use the address "
            "`ray start --head` printed, e.g. 10.0.0.5:6379"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ScenarioError(
            f"no Ray cluster answers at simulation.ray_address={address!r} "
            f"({err.strerror or err}); start one with `ray start --head` or check the address"
        ) from err


def join_cluster(address: str, verbose: bool) -> None:
    """Connect this driver to the running Ray cluster at ``address``; Flower then uses it.

    Workers on a joined cluster do not inherit this process's environment, so the
    settings every client process needs travel in the job's runtime environment. The
    cluster's machines need fedpeft installed at the same path (docs/scale-out.md).
    """
    import sys

    import ray

    reachable(address)
    pythonpath = os.pathsep.join(p for p in sys.path if p)
    env = {
        key: os.environ[key]
        for key in (*QUIET_ENV, "FEDPEFT_THREADS_PER_CLIENT")
        if key in os.environ
    }
    try:
        ray.init(
            address=address,
            runtime_env={"env_vars": {**env, "PYTHONPATH": pythonpath}},
            logging_level=logging.INFO if verbose else logging.ERROR,
            log_to_driver=verbose,
        )
    except (ConnectionError, RuntimeError, ValueError) as err:
        from fedpeft.config import ScenarioError

        raise ScenarioError(
            f"cannot join the Ray cluster at simulation.ray_address={address!r}: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
    print(f"joined the Ray cluster at {address}: {len(nodes)} node(s), {cpus:g} CPUs")
