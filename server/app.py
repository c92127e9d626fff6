"""Flower ServerApp: build the scenario's strategy and run its rounds (``flwr run .``)."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedpeft import records
from fedpeft.config import Scenario, load_scenario
from fedpeft.server.run import default_out_dir, run_federation

app = ServerApp()


def scenario_from_run_config(run_config: dict) -> Scenario:
    """The resolved scenario JSON when given (``fedpeft run``), else the named scenario."""
    if text := str(run_config.get(records.RUN_SCENARIO_JSON, "") or ""):
        return Scenario.from_json(text)
    return load_scenario(str(run_config.get(records.RUN_SCENARIO, "quickstart")))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run-config's scenario."""
    scenario = scenario_from_run_config(dict(context.run_config))
    out = str(context.run_config.get(records.RUN_OUT_DIR, "") or "")
    # `fedpeft deploy` says "deployment"; else Flower's in-memory Grid means simulation
    engine = str(context.run_config.get(records.RUN_ENGINE, "") or "") or (
        "simulation" if isinstance(grid, InMemoryGrid) else "deployment"
    )
    if engine == "deployment":  # fedpeft's own progress lines say what Flower's INFO logs do
        logging.getLogger("flwr").setLevel(logging.WARNING)
    secure = bool(context.run_config.get(records.RUN_SECURE, False))
    out_dir = Path(out) if out else default_out_dir(scenario)
    resume = bool(context.run_config.get(records.RUN_RESUME, False))
    command = str(context.run_config.get(records.RUN_COMMAND, "") or "")
    run_federation(grid, scenario, out_dir, engine, secure=secure, resume=resume, command=command)
