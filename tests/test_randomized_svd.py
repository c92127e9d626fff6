"""FlexLoRA's randomised SVD: as good as the optimal truncation, and only where it pays.

The reference is the dense matrix ``sum p_i s_i B_i A_i`` and its full SVD (Eckart-Young:
the best rank-r residual is the norm of the singular values beyond r).
"""

import pytest
import torch
from lora_helpers import F64, product_sum, randn

from fedpeft.config import load_scenario
from fedpeft.strategies import build_strategy
from fedpeft.strategies.lora_math import (
    factored_svd,
    randomized_svd,
    stack_factors,
    svd_costs,
    top_svd,
)
from fedpeft.strategies.testing import aggregate_with

D, K, R, CLIENTS = 192, 160, 8, 48  # stacked rank 384: above d and k, as with many clients
A_KEY, B_KEY = "m.lora_A.weight", "m.lora_B.weight"


def _updates(spectrum: str, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """CLIENTS rank-R updates: independent, sharing a direction, or in one small subspace."""
    g = torch.Generator().manual_seed(seed)
    bs = [randn(g, D, R) for _ in range(CLIENTS)]
    as_ = [randn(g, R, K) for _ in range(CLIENTS)]
    if spectrum == "shared":  # clients agree on a rank-4 change, each with its own noise
        b0, a0 = randn(g, D, R), randn(g, R, K)
        b0[:, 4:], a0[4:] = 0, 0
        bs = [b0 + 0.1 * b for b in bs]
        as_ = [a0 + 0.1 * a for a in as_]
    elif spectrum == "subspace":  # every B in one 6-dimensional column space: rank <= 6
        basis = randn(g, D, 6)
        bs = [basis @ randn(g, 6, R) for _ in range(CLIENTS)]
    return bs, as_


def _residual(m: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(m - u @ torch.diag(s) @ v.mT))


@pytest.mark.parametrize("spectrum", ["independent", "shared"])
def test_the_randomised_truncation_is_within_1e_4_of_the_optimal_residual(spectrum):
    bs, as_ = _updates(spectrum)
    weights = [float(i % 5 + 1) for i in range(CLIENTS)]
    scalings = [2.0] * CLIENTS
    stacked_b, stacked_a = stack_factors(bs, as_, weights, scalings)
    dense = product_sum(bs, as_, weights, scalings)
    sigma = torch.linalg.svdvals(dense)
    for rank in (4, 16):
        optimal = float(sigma[rank:].square().sum().sqrt())
        u, s, v = randomized_svd(stacked_b, stacked_a, rank)
        assert u.shape == (D, rank) and s.shape == (rank,) and v.shape == (K, rank)
        assert (_residual(dense, u, s, v) - optimal) / optimal <= 1e-4, spectrum
        torch.testing.assert_close(u.mT @ u, torch.eye(rank, dtype=F64), rtol=0, atol=1e-12)
        torch.testing.assert_close(v.mT @ v, torch.eye(rank, dtype=F64), rtol=0, atol=1e-12)


def test_a_product_of_lower_rank_than_kept_is_recovered_exactly():
    bs, as_ = _updates("subspace")
    weights = [1.0] * CLIENTS
    stacked_b, stacked_a = stack_factors(bs, as_, weights)
    dense = product_sum(bs, as_, weights)
    u, s, v = randomized_svd(stacked_b, stacked_a, 16)
    assert _residual(dense, u, s, v) <= 1e-10 * float(torch.linalg.matrix_norm(dense))
    torch.testing.assert_close(s[:6], torch.linalg.svdvals(dense)[:6], rtol=1e-10, atol=0)


def test_the_sketch_is_seeded_so_a_rerun_gives_the_same_factors():
    stacked_b, stacked_a = stack_factors(*_updates("independent"), [1.0] * CLIENTS)
    first, again = randomized_svd(stacked_b, stacked_a, 8), randomized_svd(stacked_b, stacked_a, 8)
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    other = randomized_svd(stacked_b, stacked_a, 8, seed=1)
    assert not torch.equal(first[0], other[0])


def test_auto_keeps_the_exact_path_for_few_clients_and_randomises_for_many():
    # 10 clients of rank 16 on 4096 x 4096: the factored SVD is cheap enough
    assert svd_costs(4096, 4096, 160, 16)["exact"] < svd_costs(4096, 4096, 160, 16)["randomized"]
    # 100 clients (stacked rank 1,600): the randomised range finder is far cheaper
    costs = svd_costs(4096, 4096, 1600, 16)
    assert 5 * costs["randomized"] < costs["exact"]
    few_b, few_a = stack_factors(*_updates("independent"), [1.0] * CLIENTS)
    small_b, small_a = few_b[:, :12], few_a[:12]  # three clients of rank 4
    (u, s, v), method = top_svd(small_b, small_a, 4)
    assert method == "exact"
    exact = factored_svd(small_b, small_a, 4)
    assert all(torch.equal(x, y) for x, y in zip((u, s, v), exact, strict=True))
    assert top_svd(few_b, few_a, 4)[1] == "randomized"
    with pytest.raises(ValueError, match="method must be"):
        top_svd(small_b, small_a, 4, "dense")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["auto", "exact"])
def test_flexlora_with_many_clients_hands_out_the_best_truncation(method):
    bs, as_ = _updates("shared", seed=3)
    states = [{A_KEY: a, B_KEY: b} for b, a in zip(bs, as_, strict=True)]
    weights = [i % 3 + 1 for i in range(CLIENTS)]
    scenario = load_scenario(
        "smoke",
        [
            "strategy.name='flexlora'",
            f"strategy.flexlora_svd='{method}'",
            f"peft.r={R}",
            "peft.alpha=16",
            f"data.num_clients={CLIENTS}",
        ],
    )
    strategy = build_strategy(scenario)
    out = aggregate_with("flexlora", states, weights, scenario=scenario, strategy=strategy)
    scaling = 16 / R
    dense = product_sum(bs, as_, [float(w) for w in weights], [scaling] * CLIENTS)
    sigma = torch.linalg.svdvals(dense)
    optimal = float(sigma[R:].square().sum().sqrt())
    residual = float(torch.linalg.matrix_norm(dense - scaling * out[B_KEY] @ out[A_KEY]))
    used = "randomized" if method == "auto" else "exact"
    assert f"{used} for 1 matrices" in str(strategy.settings()["SVD"])  # type: ignore[attr-defined]
    if used == "exact":
        assert abs(residual - optimal) <= 1e-10 * optimal
    else:
        assert (residual - optimal) / optimal <= 1e-4
