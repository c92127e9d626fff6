"""PEFT-aware strategies on exact numbers, against dense formulas written out here."""

import math

import pytest
import torch

from fedpeft.config import ScenarioError, load_scenario
from fedpeft.strategies import build_strategy
from fedpeft.strategies.testing import aggregate_with

D, K = 6, 5
A_KEY, B_KEY, HEAD = "m.lora_A.weight", "m.lora_B.weight", "classifier.weight"


def _client(seed, r=2):
    g = torch.Generator().manual_seed(seed)
    return {
        A_KEY: torch.randn(r, K, generator=g, dtype=torch.float64),
        B_KEY: torch.randn(D, r, generator=g, dtype=torch.float64),
        HEAD: torch.randn(3, D, generator=g, dtype=torch.float64),
    }


def _scenario(name, *extra):
    return load_scenario("smoke", [f"strategy.name='{name}'", "peft.alpha=4", "peft.r=2", *extra])


def test_fedit_shows_the_cross_term():
    c1, c2 = _client(1), _client(2)
    out = aggregate_with("fedit", [c1, c2], [1, 3], scenario=_scenario("fedit"))
    p1, p2 = 0.25, 0.75
    exact = p1 * c1[B_KEY] @ c1[A_KEY] + p2 * c2[B_KEY] @ c2[A_KEY]
    b_bar, a_bar = p1 * c1[B_KEY] + p2 * c2[B_KEY], p1 * c1[A_KEY] + p2 * c2[A_KEY]
    torch.testing.assert_close(out[B_KEY] @ out[A_KEY], b_bar @ a_bar)
    cross = p1 * (c1[B_KEY] - b_bar) @ (c1[A_KEY] - a_bar) + p2 * (c2[B_KEY] - b_bar) @ (
        c2[A_KEY] - a_bar
    )
    torch.testing.assert_close(exact - b_bar @ a_bar, cross)
    assert cross.abs().max() > 1e-3


def test_ffa_lora_never_sends_a_and_averages_b_exactly():
    current = _client(0)
    strategy = build_strategy(_scenario("ffa_lora"))
    assert A_KEY not in strategy.down_state(1, 1) if strategy.global_state else True
    c1 = {k: v for k, v in _client(1).items() if k != A_KEY}
    c2 = {k: v for k, v in _client(2).items() if k != A_KEY}
    out = aggregate_with("ffa_lora", [c1, c2], [1, 3], current=current, strategy=strategy)
    assert A_KEY not in strategy.down_state(2, 1)
    torch.testing.assert_close(out[A_KEY], current[A_KEY])  # the shared A stays
    exact = 0.25 * c1[B_KEY] @ current[A_KEY] + 0.75 * c2[B_KEY] @ current[A_KEY]
    torch.testing.assert_close(out[B_KEY] @ out[A_KEY], exact)
    assert strategy.instructions(2, 1)["train-factors"] == "head,lora_B"


def test_fedsa_lora_averages_a_and_keeps_b_local():
    current = _client(0)
    strategy = build_strategy(_scenario("fedsa_lora"))
    c1 = {k: v for k, v in _client(1).items() if k != B_KEY}
    c2 = {k: v for k, v in _client(2).items() if k != B_KEY}
    out = aggregate_with("fedsa_lora", [c1, c2], [1, 3], current=current, strategy=strategy)
    torch.testing.assert_close(out[A_KEY], 0.25 * c1[A_KEY] + 0.75 * c2[A_KEY])
    assert B_KEY not in strategy.down_state(2, 1)
    assert "lora_B" in strategy.instructions(2, 1)["personal-factors"]
    assert strategy.fraction_evaluate > 0  # personalised evaluation runs


def test_rolora_alternates_the_trained_factor():
    strategy = build_strategy(_scenario("rolora"))
    assert strategy.instructions(1, 1)["train-factors"] == "head,lora_B"
    assert strategy.instructions(2, 1)["train-factors"] == "head,lora_A"
    current = _client(0)
    c1 = {k: v for k, v in _client(1).items() if k != A_KEY}
    c2 = {k: v for k, v in _client(2).items() if k != A_KEY}
    out = aggregate_with("rolora", [c1, c2], [1, 3], current=current, strategy=strategy)
    torch.testing.assert_close(out[A_KEY], current[A_KEY])
    # with A frozen and shared, averaging B is exact for the round
    exact = 0.25 * c1[B_KEY] @ current[A_KEY] + 0.75 * c2[B_KEY] @ current[A_KEY]
    torch.testing.assert_close(out[B_KEY] @ out[A_KEY], exact)


def test_flexlora_gives_the_best_low_rank_approximation_of_the_exact_sum():
    alpha, ranks = 4.0, [2, 3, 4]
    scenario = _scenario("flexlora", "peft.client_ranks=[2,3,4]", "data.num_clients=3")
    clients = [_client(i + 1, r) for i, r in enumerate(ranks)]
    weights = [1, 2, 3]
    out = aggregate_with("flexlora", clients, weights, scenario=scenario, current=_client(0, 4))
    dense = sum(
        (w / 6) * (alpha / r) * c[B_KEY] @ c[A_KEY]
        for c, w, r in zip(clients, weights, ranks, strict=True)
    )
    u, s, vh = torch.linalg.svd(dense)
    best4 = u[:, :4] @ torch.diag(s[:4]) @ vh[:4, :]
    server_scaling = alpha / 4  # the server model has the largest rank
    torch.testing.assert_close(
        server_scaling * out[B_KEY] @ out[A_KEY], best4, rtol=1e-5, atol=1e-8
    )
    torch.testing.assert_close(
        out[HEAD], sum(w / 6 * c[HEAD] for c, w in zip(clients, weights, strict=True))
    )


def test_hetlora_pads_and_truncates():
    scenario = _scenario("hetlora", "peft.client_ranks=[2,4]")
    same = _client(5, 2)
    padded = {
        A_KEY: torch.cat([same[A_KEY], torch.zeros(2, K, dtype=torch.float64)]),
        B_KEY: torch.cat([same[B_KEY], torch.zeros(D, 2, dtype=torch.float64)], dim=1),
        HEAD: same[HEAD],
    }
    strategy = build_strategy(scenario)
    out = aggregate_with("hetlora", [same, same], [1, 1], current=padded, strategy=strategy)
    torch.testing.assert_close(out[A_KEY], padded[A_KEY])
    torch.testing.assert_close(out[B_KEY], padded[B_KEY])
    strategy.node_ranks[7] = 2
    assert strategy.down_state(2, 7)[A_KEY].shape == (2, K)
    assert strategy.instructions(2, 7)["alpha-mode"] == "shared-scaling"


@pytest.mark.parametrize("name", ["fedit", "ffa_lora", "rolora", "fedavg", "fedprox"])
def test_homogeneous_strategies_refuse_heterogeneous_ranks(name):
    with pytest.raises(ScenarioError, match=f"strategy.name='{name}'.*peft.client_ranks"):
        build_strategy(_scenario(name, "peft.client_ranks=[2,4]"))


@pytest.mark.parametrize(
    "name", ["fedit", "ffa_lora", "fedsa_lora", "rolora", "flexlora", "hetlora"]
)
def test_identical_updates_return_that_update(name):
    c = _client(3)
    out = aggregate_with(name, [c, c, c], [1, 2, 5], current=c, scenario=_scenario(name))
    torch.testing.assert_close(out[B_KEY] @ out[A_KEY], c[B_KEY] @ c[A_KEY])
    torch.testing.assert_close(out[HEAD], c[HEAD])


def _dense_update(clients, weights, alpha):
    total = sum(weights)
    return sum(
        (w / total) * (alpha / c[A_KEY].shape[0]) * c[B_KEY] @ c[A_KEY]
        for c, w in zip(clients, weights, strict=True)
    )


def test_flora_merges_the_exact_sum_of_products_round_after_round():
    scenario = _scenario("flora", "peft.client_ranks=[2,3]")
    strategy = build_strategy(scenario)
    rounds = [[_client(1, 2), _client(2, 3)], [_client(3, 2), _client(4, 3)]]
    expected = torch.zeros(D, K, dtype=torch.float64)
    for t, clients in enumerate(rounds, start=1):
        aggregate_with(
            "flora", clients, [1, 3], current=_client(0, 3), strategy=strategy, server_round=t
        )
        expected = expected + _dense_update(clients, [1, 3], 4.0)
        p, q = strategy.base_delta["m"]
        torch.testing.assert_close(p @ q, expected, rtol=1e-5, atol=1e-10)
    assert B_KEY not in strategy.down_state(3, 1)  # adapters restart; only the head travels
    state, rank, alpha = strategy.export()
    assert rank == alpha == state[B_KEY].shape[1]
    torch.testing.assert_close(
        state[B_KEY].double() @ state[A_KEY].double(), expected, rtol=1e-5, atol=1e-6
    )


def test_fedex_lora_adapter_plus_folded_residual_is_exact():
    strategy = build_strategy(_scenario("fedex_lora"))
    clients = [_client(1), _client(2), _client(3)]
    out = aggregate_with("fedex_lora", clients, [1, 2, 5], current=_client(0), strategy=strategy)
    scaling = 4.0 / 2
    p, q = strategy.base_delta["m"]
    torch.testing.assert_close(
        scaling * out[B_KEY] @ out[A_KEY] + p @ q,
        _dense_update(clients, [1, 2, 5], 4.0),
        rtol=1e-5,
        atol=1e-10,
    )
    state, _, _ = strategy.export()
    exported = state[B_KEY].double() @ state[A_KEY].double()
    torch.testing.assert_close(
        exported, _dense_update(clients, [1, 2, 5], 4.0), rtol=1e-5, atol=1e-6
    )


def test_fedex_lora_identical_updates_leave_no_residual():
    strategy = build_strategy(_scenario("fedex_lora"))
    c = _client(3)
    aggregate_with("fedex_lora", [c, c], [1, 4], current=c, strategy=strategy)
    p, q = strategy.base_delta["m"]
    assert (p @ q).abs().max() < 1e-10


# --- rsLoRA: peft's scaling alpha / sqrt(r) under every rule ----------------------------------


def _rs(alpha, r):
    """rsLoRA's scaling, written out (peft's update_layer with use_rslora=True)."""
    return alpha / math.sqrt(r)


def _dense_rs(clients, weights, alpha):
    """sum p_i (alpha / sqrt(r_i)) B_i A_i: the exact aggregate under rsLoRA."""
    total = sum(weights)
    return sum(
        (w / total) * _rs(alpha, c[A_KEY].shape[0]) * c[B_KEY] @ c[A_KEY]
        for c, w in zip(clients, weights, strict=True)
    )


def test_flora_with_rslora_merges_and_exports_the_exact_sum():
    # Prepare: ranks 2 and 3, where alpha / sqrt(r) and alpha / r differ
    strategy = build_strategy(_scenario("flora", "peft.client_ranks=[2,3]", "peft.use_rslora=true"))
    rounds = [[_client(1, 2), _client(2, 3)], [_client(3, 2), _client(4, 3)]]
    expected = torch.zeros(D, K, dtype=torch.float64)
    for t, clients in enumerate(rounds, start=1):
        # Execute
        aggregate_with(
            "flora", clients, [1, 3], current=_client(0, 3), strategy=strategy, server_round=t
        )
        expected = expected + _dense_rs(clients, [1, 3], 4.0)
        # Assert: the merged base delta is the exact sum, round after round
        p, q = strategy.base_delta["m"]
        torch.testing.assert_close(p @ q, expected, rtol=1e-10, atol=1e-12)
    # Assert: peft applies alpha / sqrt(rank) to the exported adapter (rsLoRA stays on)
    state, rank, alpha = strategy.export()
    exported = _rs(alpha, rank) * state[B_KEY].double() @ state[A_KEY].double()
    torch.testing.assert_close(exported, expected, rtol=1e-5, atol=1e-6)


def test_fedex_lora_with_rslora_adapter_plus_residual_is_exact():
    # Prepare: rank 3, scaling 4 / sqrt(3)
    strategy = build_strategy(_scenario("fedex_lora", "peft.r=3", "peft.use_rslora=true"))
    clients = [_client(1, 3), _client(2, 3), _client(3, 3)]
    # Execute
    out = aggregate_with("fedex_lora", clients, [1, 2, 5], current=_client(0, 3), strategy=strategy)
    # Assert: base + adapter (as peft applies it) is the exact weighted sum
    p, q = strategy.base_delta["m"]
    exact = _dense_rs(clients, [1, 2, 5], 4.0)
    torch.testing.assert_close(
        _rs(4.0, 3) * out[B_KEY] @ out[A_KEY] + p @ q, exact, rtol=1e-10, atol=1e-12
    )
    state, rank, alpha = strategy.export()
    exported = _rs(alpha, rank) * state[B_KEY].double() @ state[A_KEY].double()
    torch.testing.assert_close(exported, exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("split", ["left", "sqrt"])
def test_flexlora_with_rslora_gives_each_rank_its_best_approximation(split):
    # Prepare
    alpha, ranks, weights = 4.0, [2, 3, 4], [1, 2, 3]
    scenario = _scenario(
        "flexlora",
        "peft.client_ranks=[2,3,4]",
        "data.num_clients=3",
        "peft.use_rslora=true",
        f"strategy.svd_split='{split}'",
    )
    strategy = build_strategy(scenario)
    clients = [_client(i + 1, r) for i, r in enumerate(ranks)]
    dense = _dense_rs(clients, weights, alpha)
    u, s, vh = torch.linalg.svd(dense)
    # Execute
    out = aggregate_with(
        "flexlora", clients, weights, scenario=scenario, current=_client(0, 4), strategy=strategy
    )
    strategy.node_ranks[9] = 2  # a rank-2 node that has replied before
    down = strategy.down_state(2, 9)
    # Assert: the server model (rank 4) and the rank-2 client, each under its own scaling
    for r, state in [(4, out), (2, down)]:
        b, a = state[B_KEY].double(), state[A_KEY].double()
        best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r, :]
        torch.testing.assert_close(_rs(alpha, r) * b @ a, best, rtol=1e-5, atol=1e-8)
        # the split: B = U S / s_r and A = V^T (left), or sqrt(S / s_r) in both (sqrt)
        values = s[:r] / _rs(alpha, r)
        b_norms, a_norms = (values, torch.ones(r)) if split == "left" else (values.sqrt(),) * 2
        torch.testing.assert_close(torch.linalg.vector_norm(b, dim=0), b_norms.double())
        torch.testing.assert_close(torch.linalg.vector_norm(a, dim=1), a_norms.double())


def test_hetlora_clients_share_the_largest_ranks_scaling_under_rslora():
    from peft import LoraConfig, inject_adapter_in_model

    from fedpeft.clients.app import client_peft

    # Prepare: ranks 1, 4 and 8; every client must apply alpha / sqrt(8)
    scenario = _scenario(
        "hetlora", "peft.client_ranks=[1,4,8]", "peft.use_rslora=true", "data.num_clients=3"
    )
    for r in (1, 4, 8):
        # Execute
        cfg = client_peft(scenario, r, shared_scaling=True)
        model = torch.nn.Sequential(torch.nn.Linear(K, D))
        layer = inject_adapter_in_model(
            LoraConfig(r=r, lora_alpha=cfg.alpha, target_modules=["0"], use_rslora=True), model
        )[0]
        # Assert: peft's own scaling of that client
        assert layer.scaling["default"] == pytest.approx(_rs(4.0, 8), rel=1e-12)
    assert client_peft(scenario, 4).alpha == 4.0  # per-rank scaling keeps the scenario's alpha


@pytest.mark.parametrize("weighting", ["norm", "examples_norm"])
def test_hetlora_weights_the_padded_clients_as_asked(weighting):
    # Prepare: ranks 2 and 4, 1 and 3 examples
    scenario = _scenario(
        "hetlora", "peft.client_ranks=[2,4]", f"strategy.hetlora_weighting='{weighting}'"
    )
    c1, c2 = _client(1, 2), _client(2, 4)
    norms = [float(torch.linalg.matrix_norm(c[B_KEY] @ c[A_KEY])) for c in (c1, c2)]
    raw = norms if weighting == "norm" else [0.25 * norms[0], 0.75 * norms[1]]
    q = [w / sum(raw) for w in raw]
    pad_b = torch.cat([c1[B_KEY], torch.zeros(D, 2, dtype=torch.float64)], dim=1)
    pad_a = torch.cat([c1[A_KEY], torch.zeros(2, K, dtype=torch.float64)])
    # Execute
    out = aggregate_with("hetlora", [c1, c2], [1, 3], current=_client(0, 4), scenario=scenario)
    # Assert
    torch.testing.assert_close(out[B_KEY], q[0] * pad_b + q[1] * c2[B_KEY])
    torch.testing.assert_close(out[A_KEY], q[0] * pad_a + q[1] * c2[A_KEY])
    torch.testing.assert_close(out[HEAD], 0.25 * c1[HEAD] + 0.75 * c2[HEAD])


# --- FedSA-LoRA's head ------------------------------------------------------------------------


def test_fedsa_lora_keeps_the_head_on_each_client_by_default():
    # Prepare
    strategy = build_strategy(_scenario("fedsa_lora"))
    current = _client(0)
    c1 = {k: v for k, v in _client(1).items() if k == A_KEY}
    c2 = {k: v for k, v in _client(2).items() if k == A_KEY}
    # Execute
    out = aggregate_with("fedsa_lora", [c1, c2], [1, 3], current=current, strategy=strategy)
    # Assert: only A travels and is averaged; B and the head stay on each client
    torch.testing.assert_close(out[A_KEY], 0.25 * c1[A_KEY] + 0.75 * c2[A_KEY])
    torch.testing.assert_close(out[HEAD], current[HEAD])
    assert set(strategy.down_state(2, 1)) == {A_KEY}
    instructions = strategy.instructions(2, 1)
    assert instructions["send-factors"] == "lora_A"
    assert instructions["personal-factors"] == "head,lora_B"


def test_fedsa_lora_averages_the_head_when_it_is_not_personal():
    # Prepare
    strategy = build_strategy(_scenario("fedsa_lora", "strategy.personal_head=false"))
    c1 = {k: v for k, v in _client(1).items() if k != B_KEY}
    c2 = {k: v for k, v in _client(2).items() if k != B_KEY}
    # Execute
    out = aggregate_with("fedsa_lora", [c1, c2], [1, 3], current=_client(0), strategy=strategy)
    # Assert
    torch.testing.assert_close(out[HEAD], 0.25 * c1[HEAD] + 0.75 * c2[HEAD])
    assert set(strategy.down_state(2, 1)) == {A_KEY, HEAD}
    assert strategy.instructions(2, 1)["personal-factors"] == "lora_B"
