"""LoRA aggregation maths on exact numbers, each rule against a dense formula written out here."""

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
    fedit_cross_term,
    product_sum,
    randn,
    rel_err,
)
from peft import LoraConfig, inject_adapter_in_model
from transformers.pytorch_utils import Conv1D

from fedpeft.lora import delta_weight, fold_into_weight, lora_alpha_for, lora_scaling
from fedpeft.strategies.lora_math import (
    accumulate_factors,
    factored_svd,
    fedex_residual,
    flexlora_aggregate,
    hetlora_aggregate,
    normalise_weights,
    stack_factors,
    weighted_mean,
)

# --- peft's scaling ------------------------------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize(("alpha", "r"), [(16.0, 1), (16.0, 4), (8.0, 6), (3.0, 8)])
def test_lora_scaling_is_the_scaling_peft_applies(alpha, r, use_rslora):
    # Prepare: peft's own LoRA layer
    model = torch.nn.Sequential(torch.nn.Linear(K, D))
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], use_rslora=use_rslora)
    layer = inject_adapter_in_model(config, model)[0]
    # Execute
    got = lora_scaling(alpha, r, use_rslora)
    # Assert: peft's, and the definition written out
    assert got == layer.scaling["default"]
    assert got == (alpha / math.sqrt(r) if use_rslora else alpha / r)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("r", [1, 4, 6, 8])
def test_lora_alpha_for_inverts_lora_scaling(r, use_rslora):
    assert lora_alpha_for(1.0, r, use_rslora) == (math.sqrt(r) if use_rslora else r)
    assert lora_scaling(lora_alpha_for(2.5, r, use_rslora), r, use_rslora) == pytest.approx(2.5)
    assert lora_scaling(lora_alpha_for(1.0, r, use_rslora), r, use_rslora) == 1.0


def test_lora_scaling_refuses_rank_zero():
    with pytest.raises(ValueError, match="rank"):
        lora_scaling(16.0, 0)


# --- weights and FedIT ---------------------------------------------------------------------------


def test_normalise_weights_divides_by_the_total():
    # Prepare / Execute
    p = normalise_weights([1, 3])
    # Assert
    assert p == [0.25, 0.75]


@pytest.mark.parametrize("bad", [[], [0.0, 0.0], [-1.0, 2.0], [float("nan"), 1.0]])
def test_normalise_weights_refuses_degenerate_weights(bad):
    with pytest.raises(ValueError):
        normalise_weights(bad)


def test_weighted_mean_on_exact_numbers():
    # Prepare
    t1, t2 = torch.tensor([[1.0, 2.0]], dtype=F64), torch.tensor([[5.0, 10.0]], dtype=F64)
    # Execute
    out = weighted_mean([t1, t2], [1, 3])
    # Assert: (1 * t1 + 3 * t2) / 4
    assert out.tolist() == [[4.0, 8.0]]


def test_fedit_cross_term_on_hand_numbers():
    # Prepare: scalars B = 1, 3 and A = 2, 4 with equal weights
    bs = [torch.tensor([[1.0]], dtype=F64), torch.tensor([[3.0]], dtype=F64)]
    as_ = [torch.tensor([[2.0]], dtype=F64), torch.tensor([[4.0]], dtype=F64)]
    # Execute
    out = fedit_cross_term(bs, as_, [1, 1])
    # Assert: mean of products (2 + 12) / 2 = 7, product of means 2 * 3 = 6
    assert out.item() == pytest.approx(1.0, abs=1e-15)


def test_fedit_cross_term_is_the_weighted_covariance_and_nonzero():
    # Prepare
    bs, as_ = clients(0, [3, 3, 3])
    p = [c / sum(COUNTS) for c in COUNTS]
    mean_b = sum(p_i * b for p_i, b in zip(p, bs, strict=True))
    mean_a = sum(p_i * a for p_i, a in zip(p, as_, strict=True))
    covariance = sum(
        p_i * (b - mean_b) @ (a - mean_a) for p_i, b, a in zip(p, bs, as_, strict=True)
    )
    mean_of_products = dense_sum(bs, as_, p, [1.0] * 3)
    # Execute
    cross = fedit_cross_term(bs, as_, COUNTS)
    # Assert: both identities, and FedIT is inexact here
    assert rel_err(cross, mean_of_products - mean_b @ mean_a) < 1e-12
    assert rel_err(cross, covariance) < 1e-12
    assert float(torch.linalg.matrix_norm(cross)) > 0.1


def test_fedit_cross_term_vanishes_with_a_frozen_shared_a():
    # Prepare: FFA-LoRA keeps A frozen and identical on every client
    bs, as_ = clients(1, [3, 3, 3])
    shared = [as_[0]] * 3
    # Execute
    cross = fedit_cross_term(bs, shared, COUNTS)
    # Assert
    assert float(torch.linalg.matrix_norm(cross)) < 1e-12


def test_product_sum_matches_the_definition_with_heterogeneous_ranks():
    # Prepare
    bs, as_ = clients(2, RANKS)
    scalings = [ALPHA / r for r in RANKS]
    p = [c / sum(COUNTS) for c in COUNTS]
    # Execute
    out = product_sum(bs, as_, COUNTS, scalings)
    # Assert
    assert rel_err(out, dense_sum(bs, as_, p, scalings)) < 1e-12


# --- FLoRA stacking and the factored SVD ---------------------------------------------------------


def test_stack_factors_product_is_the_exact_weighted_sum():
    # Prepare
    bs, as_ = clients(3, RANKS)
    scalings = [ALPHA / r for r in RANKS]
    p = [c / sum(COUNTS) for c in COUNTS]
    # Execute
    stacked_b, stacked_a = stack_factors(bs, as_, COUNTS, scalings)
    # Assert
    assert stacked_b.shape == (D, sum(RANKS)) and stacked_a.shape == (sum(RANKS), K)
    assert rel_err(stacked_b @ stacked_a, dense_sum(bs, as_, p, scalings)) < 1e-10


@pytest.mark.parametrize("m", [3, 9])  # m < min(d, k) and m > min(d, k)
def test_factored_svd_matches_the_dense_svd(m):
    # Prepare
    g = torch.Generator().manual_seed(4)
    b, a = randn(g, D, m), randn(g, m, K)
    dense_s = torch.linalg.svdvals(b @ a)
    # Execute
    u, s, v = factored_svd(b, a)
    # Assert
    n = min(m, D, K)
    assert u.shape == (D, n) and s.shape == (n,) and v.shape == (K, n)
    assert torch.all(s[:-1] >= s[1:])
    assert torch.allclose(s, dense_s[:n], rtol=0, atol=1e-8 * float(dense_s[0]))
    assert rel_err(u @ torch.diag(s) @ v.T, b @ a) < 1e-10
    assert torch.allclose(u.T @ u, torch.eye(n, dtype=F64), atol=1e-10)
    assert torch.allclose(v.T @ v, torch.eye(n, dtype=F64), atol=1e-10)


def test_factored_svd_cuts_to_the_requested_rank():
    # Prepare
    g = torch.Generator().manual_seed(5)
    b, a = randn(g, D, 4), randn(g, 4, K)
    # Execute
    u, s, v = factored_svd(b, a, rank=2)
    # Assert
    assert u.shape == (D, 2) and s.shape == (2,) and v.shape == (K, 2)
    assert rel_err(u @ torch.diag(s) @ v.T, dense_best_rank(b @ a, 2)) < 1e-10


def test_factored_svd_at_256_by_256_matches_the_dense_svd():
    # Prepare: three clients of rank 8, stacked to m = 24
    bs, as_ = clients(6, [8, 8, 8], d=256, k=256)
    b, a = stack_factors(bs, as_, COUNTS, [ALPHA / 8] * 3)
    dense = b @ a
    dense_s = torch.linalg.svdvals(dense)
    # Execute
    u, s, v = factored_svd(b, a)
    # Assert
    assert s.shape == (24,)
    assert torch.allclose(s, dense_s[:24], rtol=0, atol=1e-8 * float(dense_s[0]))
    assert float(dense_s[24]) < 1e-10 * float(dense_s[0])  # the product has rank 24
    assert rel_err(u @ torch.diag(s) @ v.T, dense) < 1e-10
    for r in (4, 16):
        assert rel_err(u[:, :r] @ torch.diag(s[:r]) @ v[:, :r].T, dense_best_rank(dense, r)) < 1e-8


# --- FedEx-LoRA and folding ----------------------------------------------------------------------


def test_fedex_residual_makes_fedit_exact():
    # Prepare
    bs, as_ = clients(18, [3, 3, 3])
    scaling = ALPHA / 3
    p = [c / sum(COUNTS) for c in COUNTS]
    mean_b = sum(p_i * b for p_i, b in zip(p, bs, strict=True))
    mean_a = sum(p_i * a for p_i, a in zip(p, as_, strict=True))
    exact = dense_sum(bs, as_, p, [scaling] * 3)
    # Execute
    r_b, r_a = fedex_residual(bs, as_, COUNTS, scaling)
    # Assert
    assert r_b.shape == (D, 12) and r_a.shape == (12, K)
    assert rel_err(scaling * mean_b @ mean_a + r_b @ r_a, exact) < 1e-10
    assert rel_err(r_b @ r_a, scaling * (exact / scaling - mean_b @ mean_a)) < 1e-10


def test_every_rule_returns_identical_inputs_unchanged():
    # Prepare
    g = torch.Generator().manual_seed(19)
    b0, a0 = randn(g, D, 3), randn(g, 3, K)
    bs, as_ = [b0] * 3, [a0] * 3
    scaling = ALPHA / 3
    # Execute
    mean_b, mean_a = weighted_mean(bs, COUNTS), weighted_mean(as_, COUNTS)
    cross = fedit_cross_term(bs, as_, COUNTS)
    [(flex_b, flex_a)] = flexlora_aggregate(bs, as_, COUNTS, [scaling] * 3, [3], [scaling])
    het_b, het_a = hetlora_aggregate(bs, as_, COUNTS, r_max=3)
    r_b, r_a = fedex_residual(bs, as_, COUNTS, scaling)
    stacked_b, stacked_a = stack_factors(bs, as_, COUNTS)
    # Assert
    assert rel_err(mean_b, b0) < 1e-14 and rel_err(mean_a, a0) < 1e-14
    assert float(torch.linalg.matrix_norm(cross)) < 1e-12
    assert rel_err(scaling * flex_b @ flex_a, scaling * b0 @ a0) < 1e-10
    assert rel_err(het_b, b0) < 1e-14 and rel_err(het_a, a0) < 1e-14
    assert float(torch.linalg.matrix_norm(r_b @ r_a)) < 1e-12
    assert rel_err(stacked_b @ stacked_a, b0 @ a0) < 1e-12


def test_delta_weight_transposes_for_fan_in_fan_out():
    # Prepare
    bs, as_ = clients(20, [2])
    b, a = bs[0], as_[0]
    # Execute
    plain = delta_weight(b, a, 2.0)
    conv = delta_weight(b, a, 2.0, fan_in_fan_out=True)
    # Assert
    assert torch.equal(plain, 2.0 * b @ a)
    assert torch.equal(conv, (2.0 * b @ a).T)


def test_fold_into_weight_keeps_the_weight_dtype_and_checks_shapes():
    # Prepare
    bs, as_ = clients(21, [2])
    weight = torch.zeros(D, K, dtype=torch.float32)
    # Execute
    folded = fold_into_weight(weight, bs[0], as_[0], 0.5)
    # Assert
    assert folded.dtype == torch.float32
    assert torch.allclose(folded.double(), 0.5 * bs[0] @ as_[0], atol=1e-6)
    with pytest.raises(ValueError):
        fold_into_weight(weight.T, bs[0], as_[0], 0.5)


def test_fold_into_a_conv1d_weight_matches_the_lora_forward():
    # Prepare: Conv1D stores its weight as (in, out); LoRA has A (r x in) and B (out x r)
    d_in, d_out, r, alpha = 5, 7, 3, 6.0
    scaling = alpha / r
    torch.manual_seed(22)
    conv = Conv1D(nf=d_out, nx=d_in).double()
    torch.nn.init.normal_(conv.bias)
    g = torch.Generator().manual_seed(22)
    b, a, x = randn(g, d_out, r), randn(g, r, d_in), randn(g, 4, d_in)
    with torch.no_grad():
        expected = x @ conv.weight + conv.bias + scaling * x @ (b @ a).T
        # Execute: fold, then run the real module
        conv.weight.copy_(fold_into_weight(conv.weight, b, a, scaling, fan_in_fan_out=True))
        folded_out = conv(x)
    # Assert
    assert conv.weight.shape == (d_in, d_out)
    assert rel_err(folded_out, expected) < 1e-12


def test_fold_into_a_conv1d_weight_matches_peft_lora_on_conv1d():
    # Prepare: peft's own LoRA layer on a Conv1D (fan_in_fan_out=True), factors set by hand
    d_in, d_out, r, alpha = 5, 7, 3, 6.0
    torch.manual_seed(23)
    model = torch.nn.Sequential()
    model.add_module("c_attn", Conv1D(nf=d_out, nx=d_in))
    model = model.double()
    base_weight = model.c_attn.weight.detach().clone()
    config = LoraConfig(target_modules=["c_attn"], r=r, lora_alpha=alpha, fan_in_fan_out=True)
    model = inject_adapter_in_model(config, model)
    layer = model.c_attn
    g = torch.Generator().manual_seed(23)
    b, a, x = randn(g, d_out, r), randn(g, r, d_in), randn(g, 4, d_in)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
        lora_out = model(x)
        # Execute
        folded = Conv1D(nf=d_out, nx=d_in).double()
        folded.weight.copy_(fold_into_weight(base_weight, b, a, alpha / r, fan_in_fan_out=True))
        folded.bias.copy_(layer.base_layer.bias)
        folded_out = folded(x)
    # Assert
    assert layer.scaling["default"] == alpha / r
    assert rel_err(folded_out, lora_out) < 1e-12


def _factors(seed: int, d: int, m: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(d, m, generator=g, dtype=torch.float64),
        torch.randn(m, k, generator=g, dtype=torch.float64),
    )


def test_accumulate_factors_refactors_a_cheap_sum_to_its_numerical_rank():
    p, q = _factors(0, 30, 4, 20)
    b, a = accumulate_factors(accumulate_factors(None, p, q), 2 * p, q)  # 3 P Q, rank 4
    assert b.shape == (30, 4) and a.shape == (4, 20)
    torch.testing.assert_close(b @ a, 3 * p @ q, rtol=1e-10, atol=1e-12)


def test_accumulate_factors_keeps_a_costly_stack_until_it_outgrows_min_d_k(monkeypatch):
    monkeypatch.setattr("fedpeft.strategies.lora_math.REFACTOR_FLOPS", 0.0)
    exact = torch.zeros(30, 20, dtype=torch.float64)
    running = None
    for step in range(6):  # stacked ranks 4, 8, ..., 24: beyond min(d, k) = 20 at the 5th
        p, q = _factors(step, 30, 4, 20)
        exact += p @ q
        before = 0 if running is None else running[0].shape[1]
        running = accumulate_factors(running, p, q)
        stacked = before + 4
        if stacked <= 20:  # kept as stacked: no QR at all
            assert running[0].shape[1] == stacked
            torch.testing.assert_close(running[0][:, before:], p, rtol=0, atol=0)
        else:  # re-factored: at most min(d, k) columns again
            assert running[0].shape[1] <= 20
        torch.testing.assert_close(running[0] @ running[1], exact, rtol=1e-10, atol=1e-10)
