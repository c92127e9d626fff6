"""Scenario dataclasses, TOML loading, ``--set`` overrides and validation.

A scenario is a flat recipe (see ``scenarios/*.toml``). Every key has a default and a
one-line help text; an unknown key, a value of the wrong type or out of range raises
:class:`ScenarioError` with one sentence that names the key and what is accepted.

* :mod:`~fedpeft.config.fields`: how a key is declared (default, help, bounds) and checked;
* :mod:`~fedpeft.config.schema`: one dataclass per TOML table (``PeftSection``, ...);
* :mod:`~fedpeft.config.scenario`: the :class:`Scenario` of all sections;
* :mod:`~fedpeft.config.coercion`: raw TOML values to typed fields;
* :mod:`~fedpeft.config.loading`: files, bundled names and ``--set`` overrides.
"""

from fedpeft.config.fields import ScenarioError, Section
from fedpeft.config.loading import (
    apply_overrides,
    help_lines,
    load_scenario,
    parse_override,
    read_toml,
    resolve_scenario_path,
)
from fedpeft.config.scenario import Scenario
from fedpeft.config.schema import (
    GENERATIVE_TASKS,
    CompressionSection,
    DataSection,
    EvalSection,
    FaultsSection,
    FederationSection,
    ModelSection,
    PeftSection,
    PrivacySection,
    ReportSection,
    SimulationSection,
    StrategySection,
    TrainSection,
)

__all__ = [
    "GENERATIVE_TASKS",
    "CompressionSection",
    "DataSection",
    "EvalSection",
    "FaultsSection",
    "FederationSection",
    "ModelSection",
    "PeftSection",
    "PrivacySection",
    "ReportSection",
    "Scenario",
    "ScenarioError",
    "Section",
    "SimulationSection",
    "StrategySection",
    "TrainSection",
    "apply_overrides",
    "help_lines",
    "load_scenario",
    "parse_override",
    "read_toml",
    "resolve_scenario_path",
]
