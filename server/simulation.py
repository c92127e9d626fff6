"""Drive a scenario through Flower's Simulation Engine (Ray) from Python.

``fedpeft run`` calls :func:`simulate`. Flower's public ``run_simulation`` is deprecated
and cannot pass a run-config, so this uses the function it wraps, ``_run_simulation``,
which takes the app objects and the ServerApp's Context. Ray is started here and stopped
here: no process started by the run outlives it.
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
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "PYTHONWARNINGS": "ignore::FutureWarning",  # library deprecation notes, not user problems
}


def set_process_env() -> None:
    """Apply :data:`QUIET_ENV` where the user has not set the variable."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def simulate(
    scenario: Scenario, out_dir: Path, verbose: bool = False, resume: bool = False
) -> None:
    """Run ``scenario`` on ``data.num_clients`` virtual SuperNodes and write to ``out_dir``.

    With ``resume``, carry on from ``out_dir``'s checkpoint instead of starting afresh.
    """
    set_process_env()
    os.environ["FEDPEFT_THREADS_PER_CLIENT"] = str(scenario.simulation.cpus_per_client)
    import ray
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from clients.app import app as client_app
    from server.app import app as server_app

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    run_config: dict[str, bool | float | int | str] = {
        records.RUN_SCENARIO: scenario.name,
        records.RUN_SCENARIO_JSON: scenario.to_json(),
        records.RUN_OUT_DIR: str(out_dir),
        records.RUN_RESUME: resume,
    }
    context = Context(
        run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    backend_config = {
        "client_resources": {
            "num_cpus": scenario.simulation.cpus_per_client,
            "num_gpus": scenario.simulation.gpus_per_client,
        },
        "init_args": {"logging_level": "ERROR" if not verbose else "INFO"},
    }
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
        if ray.is_initialized():  # Flower stops Ray on success; make sure on failure too
            ray.shutdown()
