"""Server aggregation on exact numbers, against formulas written out independently."""

import math
import re

import numpy as np
import pytest
import torch

from fedpeft.config import load_scenario
from fedpeft.strategies import STRATEGIES, AggregationError, build_strategy, get_strategy
from fedpeft.strategies.testing import aggregate_with

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
        [
            "strategy.name='fedadam'",
            f"strategy.server_lr={eta}",
            f"strategy.beta_1={b1}",
            f"strategy.beta_2={b2}",
            f"strategy.tau={tau}",
        ],
    )
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


# --- replies no rule can use: one error type, every strategy ------------------------------------

LORA_A, LORA_B, HEAD = "m.lora_A.weight", "m.lora_B.weight", "classifier.weight"


def _lora_client(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        LORA_A: torch.randn(2, 5, generator=g, dtype=torch.float64),
        LORA_B: torch.randn(6, 2, generator=g, dtype=torch.float64),
        HEAD: torch.randn(3, 6, generator=g, dtype=torch.float64),
    }


def _poisoned(value):
    state = _lora_client(2)
    state[LORA_B] = state[LORA_B].clone()
    state[LORA_B][1, 1] = value
    return state


# what is wrong -> (the two clients' example counts, the error message it must raise)
UNUSABLE = {
    "nan-count": ([1, math.nan], "node 2: 'num-examples' is nan"),
    "negative-count": ([1, -3], "node 2: 'num-examples' is -3"),
    "inf-count": ([1, math.inf], "node 2: 'num-examples' is inf"),
    "fractional-count": ([1, 2.5], "node 2: 'num-examples' is 2.5"),
    "zero-total": ([0, 0], "'num-examples' sums to 0"),
    "nan-tensor": ([1, 3], f"node 2: tensor '{LORA_B}' holds NaN or inf"),
    "inf-tensor": ([1, 3], f"node 2: tensor '{LORA_B}' holds NaN or inf"),
}


@pytest.mark.parametrize("case", sorted(UNUSABLE))
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_refuses_unusable_replies_with_one_error(name, case):
    # Prepare
    counts, message = UNUSABLE[case]
    bad = {"nan-tensor": math.nan, "inf-tensor": -math.inf}.get(case)
    states = [_lora_client(1), _poisoned(bad) if bad is not None else _lora_client(2)]
    scenario = load_scenario("smoke", [f"strategy.name='{name}'", "peft.r=2"])
    # Execute / Assert: the same error type and a one-line message naming node and key
    with pytest.raises(AggregationError, match=re.escape(message)) as err:
        aggregate_with(name, states, counts, current=_lora_client(0), scenario=scenario)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_accepts_a_zero_count_beside_positive_ones(name):
    scenario = load_scenario("smoke", [f"strategy.name='{name}'", "peft.r=2"])
    states = [_lora_client(1), _lora_client(2)]
    out = aggregate_with(name, states, [3, 0], current=_lora_client(0), scenario=scenario)
    assert all(torch.isfinite(t).all() for t in out.values())
