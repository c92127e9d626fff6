"""Differential privacy: clipping, the central noise shares, the accountant, in a federation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedpeft.clients.app import app as client_app
from fedpeft.config import PrivacySection, ScenarioError, load_scenario
from fedpeft.privacy import add_noise, clip_update, epsilon
from fedpeft.server.inprocess import InProcessGrid
from fedpeft.server.privacy import central_noise_std
from fedpeft.server.run import run_federation
from fedpeft.strategies import build_strategy


def test_clipping_scales_the_change_not_the_tensor() -> None:
    sent = {"a": torch.full((2,), 10.0), "b": torch.zeros(2)}
    update = {"a": torch.tensor([13.0, 10.0]), "b": torch.tensor([0.0, 4.0])}  # change norm 5
    clipped, norm = clip_update(update, sent, 1.0)
    assert norm == pytest.approx(5.0)
    assert torch.allclose(clipped["a"], torch.tensor([10.6, 10.0]))
    assert torch.allclose(clipped["b"], torch.tensor([0.0, 0.8]))
    same, _ = clip_update(update, sent, 5.5)  # within the bound: untouched
    assert all(torch.equal(same[k], update[k]) for k in update)
    only_b, norm_b = clip_update({"b": update["b"]}, sent, 1.0)  # e.g. FFA-LoRA sends B only
    assert norm_b == pytest.approx(4.0) and torch.allclose(only_b["b"], torch.tensor([0.0, 1.0]))


def test_noise_shares_give_the_weighted_mean_exactly_the_target_std() -> None:
    assert central_noise_std([3.0] * 5, 2.0, 0.5) == pytest.approx(2.0 * 0.5 / 5 * math.sqrt(5))
    weights = [1.0, 2.0, 5.0]
    std = central_noise_std(weights, 1.5, 2.0)
    shares = [w / sum(weights) for w in weights]
    mean_std = std * math.sqrt(sum(p * p for p in shares))  # std of sum_i p_i n_i
    assert mean_std == pytest.approx(1.5 * 2.0 * max(shares))
    draws = add_noise({"x": torch.zeros(200_000)}, 0.3, torch.Generator().manual_seed(0))["x"]
    assert float(draws.std()) == pytest.approx(0.3, rel=0.01) and abs(float(draws.mean())) < 3e-3


def test_epsilon_is_the_rdp_conversion_of_composed_gaussians() -> None:
    privacy = PrivacySection(noise_multiplier=1.3, delta=1e-5)
    for releases in (1, 6, 40):
        # RDP of k Gaussian releases: k a / (2 s^2); converted to (eps, delta) with
        # eps = rdp + log((a - 1) / a) - (log delta + log a) / (a - 1), best integer order
        expected = min(
            releases * a / (2 * 1.3**2)
            + math.log((a - 1) / a)
            - (math.log(1e-5) + math.log(a)) / (a - 1)
            for a in range(2, 257)
        )
        assert epsilon(privacy, releases, 10) == pytest.approx(expected, rel=1e-9)
    assert epsilon(privacy, 0, 10) == 0.0


@pytest.mark.parametrize("strategy", ["flexlora", "fedadam", "hetlora"])
def test_dp_refuses_strategies_whose_rule_is_not_a_weighted_sum(strategy) -> None:
    scenario = load_scenario("smoke", ['privacy.dp="central"', f'strategy.name="{strategy}"'])
    with pytest.raises(ScenarioError, match="weighted sum"):
        build_strategy(scenario)


@pytest.mark.parametrize("dp", ["central", "local"])
def test_a_private_round_moves_the_global_by_at_most_the_clipping_norm(
    dp, tmp_path, moved_from_initial
) -> None:
    """With negligible noise, the average of clipped changes is within the bound."""
    sets = [
        f'privacy.dp="{dp}"',
        "privacy.noise_multiplier=1e-9",
        "privacy.clipping_norm=0.05",
        "federation.rounds=1",
        "train.lr=0.05",
    ]
    scenario = load_scenario("smoke", sets)
    out = tmp_path / dp
    summary = run_federation(InProcessGrid(client_app, 2), scenario, out, "in-process")
    plain = load_scenario("smoke", ["federation.rounds=1", "train.lr=0.05"])
    run_federation(InProcessGrid(client_app, 2), plain, tmp_path / "plain", "in-process")
    assert moved_from_initial(plain, tmp_path / "plain") > 0.05
    assert moved_from_initial(scenario, out) <= 0.05 * (1 + 1e-4)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["epsilon"] > 0 and summary["privacy"]["dp"] == dp
    assert summary["privacy"]["epsilon"] == rows[-1]["epsilon"]
