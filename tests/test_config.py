import re
import subprocess
import sys

import pytest

from fedpeft import scenarios
from fedpeft.config import Scenario, ScenarioError, apply_overrides, load_scenario, parse_override
from fedpeft.tools.cli import main


@pytest.mark.parametrize("name", sorted(scenarios.bundled()))
def test_every_bundled_scenario_loads_and_opens_with_its_command(name):
    path = scenarios.bundled()[name]
    first_line = path.read_text().splitlines()[0]
    scenario = load_scenario(name)
    assert first_line.startswith(("# fedpeft run ", "# fedpeft compare "))
    assert scenario.name == name
    assert Scenario.from_json(scenario.to_json()) == scenario


def test_set_values_are_parsed_as_toml_with_string_fallback():
    assert parse_override('peft.target_modules=["query","value"]') == (
        ["peft", "target_modules"],
        ["query", "value"],
    )
    assert parse_override("train.lr=1e-3") == (["train", "lr"], 1e-3)
    assert parse_override("model.name=tiny-bert") == (["model", "name"], "tiny-bert")
    assert parse_override("federation.rounds=3") == (["federation", "rounds"], 3)


def test_overrides_apply_to_a_scenario():
    s = load_scenario("smoke", ["train.lr=0.5", "federation.rounds=7", "strategy.name=fedadam"])
    assert (s.train.lr, s.federation.rounds, s.strategy.name) == (0.5, 7, "fedadam")
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("peft.r=-1", "'peft.r'"),
        ("peft.rank=8", "unknown key 'peft.rank'"),
        ("bogus=1", "unknown key 'bogus'"),
        ("train.lr=fast", "'train.lr'"),
        ("federation.rounds=2.5", "'federation.rounds'"),
        ("data.partitioner=random", "'data.partitioner'"),
        ("federation.clients_per_round=3", "at most data.num_clients"),
        ("peft.target_modules=query", "'peft.target_modules'"),
    ],
)
def test_invalid_scenarios_name_the_key(override, fragment):
    with pytest.raises(ScenarioError) as err:
        load_scenario("smoke", [override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_unknown_name():
    with pytest.raises(ScenarioError, match="scenario file not found: nope.toml"):
        load_scenario("nope.toml")
    with pytest.raises(ScenarioError, match="bundled: .*quickstart"):
        load_scenario("no-such-scenario")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["run", "smoke", "--set", "peft.r=-1"], "peft.r"),
        (["run", "smoke", "--set", "peft.colour=red"], "unknown key 'peft.colour'"),
        (["run", "missing.toml"], "missing.toml"),
        (["run", "smoke", "--set", "strategy.name=fedmagic"], "unknown strategy.name 'fedmagic'"),
        (["run", "smoke", "--set", "peft.method=magic"], "unknown peft.method 'magic'"),
        (
            ["run", "smoke", "--set", "peft.client_ranks=[2,4]", "--set", "strategy.name=fedit"],
            "strategy.name='fedit' cannot aggregate heterogeneous ranks",
        ),
    ],
)
def test_cli_exits_2_with_one_line(args, fragment, tmp_path, capsys, quiet_env):
    """In process (``main([...])`` is the console script's own function): fast, same code."""
    code = main([*args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert fragment in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_console_script_exits_2_with_one_line(tmp_path):
    """The same through a real process: exit status, stderr and no traceback."""
    args = ["run", "smoke", "--set", "peft.client_ranks=[2,4]", "--set", "strategy.name=fedit"]
    proc = subprocess.run(
        [sys.executable, "-m", "fedpeft.tools.cli", *args, "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "cannot aggregate heterogeneous ranks" in lines[0]
    assert "Traceback" not in proc.stderr


def test_bad_toml_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(str(bad))


def test_docs_list_every_scenario_key():
    from pathlib import Path

    from fedpeft.config import help_lines

    doc = (Path(__file__).resolve().parents[1] / "docs" / "scenarios.md").read_text()
    for line in help_lines():
        assert line in doc, f"docs/scenarios.md is out of date: {line}"


def test_run_help_lists_the_bundled_scenarios(capsys):
    from fedpeft.tools.cli import main

    with pytest.raises(SystemExit) as done:
        main(["run", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert set(scenarios.bundled()) <= set(re.split(r"[\s,()]+", text))  # no name broken
    text = " ".join(text.split())
    assert "`fedpeft list` says what each one is" in text


def test_rays_dashboard_is_off_unless_asked_for_and_then_checked():
    from fedpeft.tools.simulation import check_dashboard

    assert load_scenario("smoke").simulation.dashboard is False
    with pytest.raises(ScenarioError, match="a joined cluster has its own dashboard"):
        load_scenario("smoke", ["simulation.dashboard=true", "simulation.ray_address='h:6379'"])
    try:
        check_dashboard()  # passes where ray[default] is installed
    except ScenarioError as err:
        assert "pip install 'ray[default]'" in str(err)


def test_the_in_process_engine_refuses_what_needs_ray_or_a_round_timeout():
    engine = 'simulation.engine="in-process"'
    assert load_scenario("smoke", [engine]).simulation.engine == "in-process"
    with pytest.raises(ScenarioError, match="simulation.ray_address"):
        load_scenario("smoke", [engine, "simulation.ray_address='h:6379'"])
    with pytest.raises(ScenarioError, match="simulation.dashboard"):
        load_scenario("smoke", [engine, "simulation.dashboard=true"])
    with pytest.raises(ScenarioError, match="no round timeout"):
        load_scenario("smoke-faults", [engine])
    with pytest.raises(ScenarioError, match="simulation.engine"):
        load_scenario("smoke", ['simulation.engine="threads"'])
