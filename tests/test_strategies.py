"""Server aggregation on exact numbers, against formulas written out independently."""

import math

import numpy as np
import pytest
import torch

from fedpeft.config import load_scenario
from strategies import STRATEGIES, build_strategy, get_strategy
from strategies.testing import aggregate_with

# Two clients, values chosen so every weighted mean is exact in float32.
A1 = {"lora_A": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "head": torch.tensor([0.5, -1.0])}
A2 = {"lora_A": torch.tensor([[5.0, 6.0], [7.0, 8.0]]), "head": torch.tensor([1.5, 3.0])}


def test_fedavg_is_the_example_weighted_mean():
    out = aggregate_with("fedavg", [A1, A2], [1, 3])
    # (1*x1 + 3*x2) / 4 written out by hand
    assert out["lora_A"].tolist() == [[4.0, 5.0], [6.0, 7.0]]
    assert out["head"].tolist() == [1.25, 2.0]


def test_fedprox_aggregates_like_fedavg_and_sends_mu():
    scenario = load_scenario("smoke", ["strategy.name='fedprox'", "strategy.proximal_mu=0.25"])
    out = aggregate_with("fedprox", [A1, A2], [1, 3], scenario=scenario)
    assert out["lora_A"].tolist() == [[4.0, 5.0], [6.0, 7.0]]
    strategy = build_strategy(scenario)
    assert strategy.proximal_mu == 0.25


def test_fedavgm_first_round_is_lr_times_the_average_step():
    scenario = load_scenario(
        "smoke",
        ["strategy.name='fedavgm'", "strategy.momentum_lr=0.5", "strategy.server_momentum=0.9"],
    )
    current = {"lora_A": torch.zeros(2, 2), "head": torch.zeros(2)}
    out = aggregate_with("fedavgm", [A1, A2], [1, 3], current=current, scenario=scenario)
    # first round: momentum buffer = pseudo-gradient = current - avg; x = current - lr * buffer
    assert out["lora_A"].tolist() == [[2.0, 2.5], [3.0, 3.5]]


def test_fedadam_first_step_matches_the_formula():
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    scenario = load_scenario(
        "smoke",
        ["strategy.name='fedadam'", f"strategy.server_lr={eta}", f"strategy.beta_1={b1}",
         f"strategy.beta_2={b2}", f"strategy.tau={tau}"],
    )  # fmt: skip
    current = {"lora_A": torch.ones(2, 2), "head": torch.zeros(2)}
    out = aggregate_with("fedadam", [A1, A2], [1, 3], current=current, scenario=scenario)
    for key in current:
        x = current[key].double().numpy()
        delta = np.array(aggregate_with("fedavg", [A1, A2], [1, 3])[key]) - x
        m = (1 - b1) * delta
        v = (1 - b2) * delta**2
        # Reddi et al. (2021) Alg. 2, with Flower's bias-corrected step size
        # eta_t = eta * sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) at server round t = 1
        eta_t = eta * math.sqrt(1 - b2**2) / (1 - b1**2)
        expected = x + eta_t * m / (np.sqrt(v) + tau)
        np.testing.assert_allclose(out[key].numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_identical_updates_at_the_current_point_stay_put(name):
    scenario = load_scenario("smoke", [f"strategy.name='{name}'"])
    out = aggregate_with(name, [A1, A1, A1], [2, 5, 1], current=A1, scenario=scenario)
    for key in A1:
        assert torch.allclose(out[key], A1[key].double(), atol=1e-7)


def test_sampling_follows_clients_per_round():
    scenario = load_scenario(
        "quickstart", ["data.num_clients=100", "federation.clients_per_round=29"]
    )
    strategy = build_strategy(scenario)
    n = math.floor(100 * strategy.fraction_train)
    assert max(n, strategy.min_train_nodes) == 29


def test_unknown_strategy_is_a_one_line_error():
    with pytest.raises(Exception, match="unknown strategy.name 'nope'; accepted: fedadagrad"):
        get_strategy("nope")
