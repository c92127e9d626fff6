"""Rank-changing LoRA rules on exact numbers: truncation, FlexLoRA, HetLoRA vs dense formulas."""

import math

import pytest
import torch
from lora_helpers import (
    ALPHA,
    COUNTS,
    F64,
    RANKS,
    D,
    K,
    clients,
    dense_best_rank,
    dense_sum,
    randn,
    rel_err,
)

from fedpeft.strategies.lora_math import (
    factored_svd,
    flexlora_aggregate,
    hetlora_aggregate,
    hetlora_prune_rank,
    hetlora_self_pruning_penalty,
    hetlora_truncate,
    truncate_to_rank,
)

# --- truncation and FlexLoRA ---------------------------------------------------------------------


def test_truncate_to_rank_splits_balanced_factors():
    # Prepare
    g = torch.Generator().manual_seed(7)
    u, s, v = factored_svd(randn(g, D, 4), randn(g, 4, K))
    scaling = ALPHA / 2
    # Execute
    b, a = truncate_to_rank(u, s, v, 2, scaling, split="sqrt")
    # Assert: scaling * B A is the rank-2 part; each factor carries sqrt(S / scaling)
    assert b.shape == (D, 2) and a.shape == (2, K)
    assert rel_err(scaling * b @ a, u[:, :2] @ torch.diag(s[:2]) @ v[:, :2].T) < 1e-12
    expected = torch.sqrt(s[:2] / scaling)
    assert torch.allclose(torch.linalg.vector_norm(b, dim=0), expected, atol=1e-12)
    assert torch.allclose(torch.linalg.vector_norm(a, dim=1), expected, atol=1e-12)


def test_truncate_to_rank_left_split_is_u_s_over_scaling_and_v():
    # Prepare
    g = torch.Generator().manual_seed(7)
    u, s, v = factored_svd(randn(g, D, 4), randn(g, 4, K))
    scaling = ALPHA / math.sqrt(3)
    # Execute: the FlexLoRA authors' split, B = U_r S_r / s, A = V_r^T
    b, a = truncate_to_rank(u, s, v, 3, scaling, split="left")
    # Assert: entry by entry from the definition
    for row in range(D):
        for j in range(3):
            assert abs(float(b[row, j] - u[row, j] * s[j] / scaling)) < 1e-14
    assert torch.equal(a, v[:, :3].T.contiguous())
    assert rel_err(scaling * b @ a, u[:, :3] @ torch.diag(s[:3]) @ v[:, :3].T) < 1e-12


def test_truncate_to_rank_refuses_an_unknown_split():
    [b0], [a0] = clients(7, [2])
    u, s, v = factored_svd(b0, a0)
    with pytest.raises(ValueError, match="split"):
        truncate_to_rank(u, s, v, 2, 1.0, split="half")  # type: ignore[arg-type]


def test_truncate_to_rank_zero_pads_beyond_the_available_components():
    # Prepare: only 3 singular values exist
    g = torch.Generator().manual_seed(8)
    b0, a0 = randn(g, D, 3), randn(g, 3, K)
    u, s, v = factored_svd(b0, a0)
    # Execute
    (b, a), (b_sqrt, _) = (
        truncate_to_rank(u, s, v, 6, 2.0),
        truncate_to_rank(u, s, v, 6, 2.0, "sqrt"),
    )
    # Assert
    assert b.shape == (D, 6) and a.shape == (6, K) and torch.all(b_sqrt[:, 3:] == 0)
    assert torch.all(b[:, 3:] == 0) and torch.all(a[3:, :] == 0)
    assert rel_err(2.0 * b @ a, b0 @ a0) < 1e-12


def test_flexlora_full_rank_reconstruction_is_the_dense_weighted_sum():
    # Prepare
    bs, as_ = clients(9, RANKS)
    scalings = [ALPHA / r for r in RANKS]
    p = [c / sum(COUNTS) for c in COUNTS]
    # Execute: rank 9 = sum r_i >= min(d, k), nothing is lost
    [(b, a)] = flexlora_aggregate(bs, as_, COUNTS, scalings, [9], [ALPHA / 9])
    # Assert
    assert b.shape == (D, 9) and a.shape == (9, K)
    assert rel_err(ALPHA / 9 * b @ a, dense_sum(bs, as_, p, scalings)) < 1e-10


def test_flexlora_truncations_are_the_dense_best_rank_approximations():
    # Prepare
    bs, as_ = clients(10, RANKS)
    scalings = [ALPHA / r for r in RANKS]
    p = [c / sum(COUNTS) for c in COUNTS]
    dense = dense_sum(bs, as_, p, scalings)
    # Execute
    out = flexlora_aggregate(bs, as_, COUNTS, scalings, RANKS, scalings)
    # Assert
    assert len(out) == len(RANKS)
    for (b, a), r, s in zip(out, RANKS, scalings, strict=True):
        assert b.shape == (D, r) and a.shape == (r, K)
        assert rel_err(s * b @ a, dense_best_rank(dense, r)) < 1e-8


def test_flexlora_no_rank_r_matrix_tried_is_closer():
    # Prepare
    bs, as_ = clients(11, RANKS)
    scalings = [ALPHA / r for r in RANKS]
    p = [c / sum(COUNTS) for c in COUNTS]
    dense = dense_sum(bs, as_, p, scalings)
    r = 2
    [(b, a)] = flexlora_aggregate(bs, as_, COUNTS, scalings, [r], [ALPHA / r])
    best = float(torch.linalg.matrix_norm(dense - ALPHA / r * b @ a))
    g = torch.Generator().manual_seed(12)
    # Execute: random rank-r matrices, and rank-r perturbations of the optimum
    trials = [randn(g, D, r) @ randn(g, r, K) for _ in range(20)]
    trials += [
        (b + 1e-3 * randn(g, D, r)) @ (a + 1e-3 * randn(g, r, K)) * ALPHA / r for _ in range(20)
    ]
    # Assert
    for x in trials:
        assert float(torch.linalg.matrix_norm(dense - x)) >= best


# --- HetLoRA -------------------------------------------------------------------------------------


def test_hetlora_pads_a_lower_rank_client_with_zeros():
    # Prepare
    bs, as_ = clients(13, [2])
    # Execute
    b, a = hetlora_aggregate(bs, as_, [5], r_max=4)
    # Assert
    assert b.shape == (D, 4) and a.shape == (4, K)
    assert torch.equal(b[:, :2], bs[0]) and torch.equal(a[:2], as_[0])
    assert torch.all(b[:, 2:] == 0) and torch.all(a[2:] == 0)


def test_hetlora_weights_clients_by_examples_times_product_norm():
    # Prepare
    bs, as_ = clients(14, RANKS)
    r_max = 4
    raw = [
        n * float(torch.linalg.matrix_norm(b @ a)) for n, b, a in zip(COUNTS, bs, as_, strict=True)
    ]
    q = [w / sum(raw) for w in raw]
    padded_b = [torch.cat([b, torch.zeros(D, r_max - b.shape[1], dtype=F64)], 1) for b in bs]
    padded_a = [torch.cat([a, torch.zeros(r_max - a.shape[0], K, dtype=F64)], 0) for a in as_]
    expected_b = sum(q_i * b for q_i, b in zip(q, padded_b, strict=True))
    expected_a = sum(q_i * a for q_i, a in zip(q, padded_a, strict=True))
    # Execute
    b, a = hetlora_aggregate(bs, as_, COUNTS, r_max, weighting="examples_norm")
    # Assert
    assert b.shape == (D, r_max) and a.shape == (r_max, K)
    assert rel_err(b, expected_b) < 1e-12
    assert rel_err(a, expected_a) < 1e-12


def test_hetlora_paper_weighting_is_the_product_norm_alone():
    # Prepare: weights ||B_i A_i||_F / sum_j ||B_j A_j||_F, whatever the example counts
    bs, as_ = clients(14, RANKS)
    r_max = 4
    norms = [
        float(torch.linalg.matrix_norm(dense_sum([b], [a], [1.0], [1.0])))
        for b, a in zip(bs, as_, strict=True)
    ]
    q = [n / sum(norms) for n in norms]
    padded_b = [torch.cat([b, torch.zeros(D, r_max - b.shape[1], dtype=F64)], 1) for b in bs]
    padded_a = [torch.cat([a, torch.zeros(r_max - a.shape[0], K, dtype=F64)], 0) for a in as_]
    # Execute
    b, a = hetlora_aggregate(bs, as_, COUNTS, r_max, weighting="norm")
    b_default, _ = hetlora_aggregate(bs, as_, [1.0, 1.0, 1.0], r_max)
    # Assert
    assert rel_err(b, sum(q_i * b for q_i, b in zip(q, padded_b, strict=True))) < 1e-12
    assert rel_err(a, sum(q_i * a for q_i, a in zip(q, padded_a, strict=True))) < 1e-12
    assert torch.equal(b_default, b)  # the paper's weighting is the default, counts unused


def test_hetlora_falls_back_to_example_weights_when_every_product_is_zero():
    # Prepare: B = 0 as in peft's initialisation
    _, as_ = clients(15, [3, 3])
    bs = [torch.zeros(D, 3, dtype=F64)] * 2
    # Execute
    _, a = hetlora_aggregate(bs, as_, [1, 3], r_max=3)
    # Assert
    assert rel_err(a, 0.25 * as_[0] + 0.75 * as_[1]) < 1e-12


def test_hetlora_refuses_an_unknown_weighting():
    bs, as_ = clients(16, [2])
    with pytest.raises(ValueError, match="weighting"):
        hetlora_aggregate(bs, as_, [1], r_max=3, weighting="examples")  # type: ignore[arg-type]


def test_hetlora_refuses_a_rank_above_r_max():
    bs, as_ = clients(16, [4])
    with pytest.raises(ValueError):
        hetlora_aggregate(bs, as_, [1], r_max=3)


def test_hetlora_truncate_keeps_the_leading_components():
    # Prepare
    bs, as_ = clients(17, [4])
    # Execute
    b, a = hetlora_truncate(bs[0], as_[0], 2)
    # Assert
    assert torch.equal(b, bs[0][:, :2]) and torch.equal(a, as_[0][:2, :])


@pytest.mark.parametrize("r, r_keep", [(4, 2), (3, 2)])
def test_hetlora_penalty_is_gamma_times_the_tail_norm_product(r, r_keep):
    # Prepare: tail rows/columns hold a 3-4-5 triangle and a 6-8-10 one
    b = torch.ones(D, r, dtype=F64)
    a = torch.ones(r, K, dtype=F64)
    b[:, r_keep:] = 0
    b[0, r_keep], b[1, r_keep] = 3.0, 4.0
    a[r_keep:, :] = 0
    a[r_keep, 0], a[r_keep, 1] = 6.0, 8.0
    b.requires_grad_(True)
    # Execute
    penalty = hetlora_self_pruning_penalty(b, a, r, gamma=0.5)
    penalty.backward()
    # Assert: 0.5 * ||tail A|| * ||tail B|| = 0.5 * 10 * 5, and it is differentiable
    assert penalty.item() == pytest.approx(25.0, rel=1e-14)
    assert b.grad is not None and torch.all(b.grad[:, :r_keep] == 0)
    assert b.grad[0, r_keep].item() == pytest.approx(0.5 * 10 * 3 / 5, rel=1e-14)


def test_hetlora_penalty_gradient_is_finite_at_peft_initialisation():
    b = torch.zeros(D, 4, dtype=F64, requires_grad=True)
    a = torch.zeros(4, K, dtype=F64, requires_grad=True)
    hetlora_self_pruning_penalty(b, a, 4, gamma=1.0).backward()
    assert b.grad is not None and a.grad is not None
    assert torch.isfinite(b.grad).all() and torch.isfinite(a.grad).all()


def test_hetlora_prune_rank_drops_a_negligible_tail_only():
    # Prepare: head norm product is ||ones(7x2)|| * ||ones(2x5)|| = sqrt(14) * sqrt(10)
    b = torch.ones(D, 4, dtype=F64)
    a = torch.ones(4, K, dtype=F64)
    b[:, 2:] = 1e-3
    a[2:, :] = 1e-3
    tail = (1e-3 * math.sqrt(14)) * (1e-3 * math.sqrt(10))
    head = math.sqrt(14) * math.sqrt(10)
    # Execute / Assert: threshold just above and just below the tail/head ratio
    assert hetlora_prune_rank(b, a, 4, 0.5, threshold=1.01 * tail / head) == 2
    assert hetlora_prune_rank(b, a, 4, 0.5, threshold=0.99 * tail / head) == 4
    assert hetlora_prune_rank(b, a, 4, 0.0, threshold=1.0) == 4
    assert hetlora_prune_rank(b[:, :1], a[:1], 1, 0.5, threshold=1.0) == 1
