"""LoRA-aware aggregation maths: pure functions on torch tensors.

Per adapted matrix ``W`` (d x k) a client holds LoRA factors ``B`` (d x r) and ``A`` (r x k);
peft's update is ``s * B @ A`` with ``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA
(:func:`fedpeft.lora.lora_scaling`, the one place that scaling is computed). Client weights
``p_i = n_i / sum n`` are built from raw example counts by :func:`normalise_weights`. The rules:

- FedIT (Zhang et al., 2024): average ``B`` and ``A`` separately (:func:`weighted_mean`); the
  product of the means misses the cross term ``sum p_i (B_i - B̄)(A_i - Ā)`` (the tests
  compute it, in tests/lora_helpers.py).
- FFA-LoRA (Sun et al., 2024): ``A`` frozen and shared, only ``B`` averaged, so the mean of
  products is the product of means and the cross term vanishes.
- FLoRA (Wang et al., 2024): stack the factors (:func:`stack_factors`) so that the product
  is exactly ``sum p_i s_i B_i A_i``, for any mix of ranks.
- FlexLoRA (Bai et al., 2024): SVD of the exact weighted sum (:func:`factored_svd`, never
  the dense d x k matrix), each client gets its best rank-``r_j`` approximation
  (:func:`truncate_to_rank`, :func:`flexlora_aggregate`).
- HetLoRA (Cho et al., 2024): zero-pad to ``r_max``, norm-weighted average, truncate, and a
  rank self-pruning regulariser (:func:`hetlora_aggregate` and friends).
- FedEx-LoRA (Singhal et al., 2025): FedIT plus the exact residual, kept in factored form
  (:func:`fedex_residual`) and folded into the frozen weight
  (:func:`fedpeft.lora.fold_into_weight`).

Nothing here imports Flower or touches model objects; float64 inputs give float64 results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

#: how FlexLoRA splits ``U S V^T`` into LoRA factors (see :func:`truncate_to_rank`)
SvdSplit = Literal["left", "sqrt"]
#: how HetLoRA weights the padded clients (see :func:`hetlora_aggregate`)
HetLoRAWeighting = Literal["norm", "examples_norm"]


def normalise_weights(weights: Sequence[float]) -> list[float]:
    """Turn raw example counts into client weights ``p_i = n_i / sum n``.

    Raises ``ValueError`` on an empty list, a negative or non-finite count, or a total that is
    not positive.
    """
    values = [float(w) for w in weights]
    if not values:
        raise ValueError("no client weights given")
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"client weights must be finite and non-negative, got {values}")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"client weights must have a positive total, got {values}")
    return [w / total for w in values]


def _check_pairs(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float]) -> None:
    if not (len(Bs) == len(As) == len(weights)):
        raise ValueError(
            f"need one B, one A and one weight per client, got {len(Bs)}, {len(As)}, {len(weights)}"
        )
    for i, (b, a) in enumerate(zip(Bs, As, strict=True)):
        if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(
                f"client {i}: B {tuple(b.shape)} and A {tuple(a.shape)} are not LoRA factors"
            )


def _scalings(scalings: Sequence[float] | None, count: int) -> list[float]:
    if scalings is None:
        return [1.0] * count
    if len(scalings) != count:
        raise ValueError(f"need one scaling per client, got {len(scalings)} for {count}")
    return [float(s) for s in scalings]


def weighted_mean(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Weighted mean ``sum p_i T_i`` of same-shaped tensors (FedIT on one factor)."""
    if len(tensors) != len(weights):
        raise ValueError(f"need one weight per tensor, got {len(weights)} for {len(tensors)}")
    p = normalise_weights(weights)
    out = p[0] * tensors[0]
    for p_i, t in zip(p[1:], tensors[1:], strict=True):
        if t.shape != tensors[0].shape:
            raise ValueError(f"shapes differ: {tuple(t.shape)} vs {tuple(tensors[0].shape)}")
        out = out + p_i * t
    return out


def stack_factors(
    Bs: Sequence[Tensor],
    As: Sequence[Tensor],
    weights: Sequence[float],
    scalings: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """FLoRA stacking: ``B = [B_1 ... B_K]``, ``A = [p_1 s_1 A_1; ...; p_K s_K A_K]``.

    ``B @ A == sum p_i s_i B_i A_i`` exactly, for any mix of ranks; the stacked rank is
    ``sum r_i``. ``scalings`` defaults to 1 for every client.
    """
    _check_pairs(Bs, As, weights)
    p = normalise_weights(weights)
    s = _scalings(scalings, len(Bs))
    stacked_b = torch.cat(list(Bs), dim=1)
    stacked_a = torch.cat([(p_i * s_i) * a for p_i, s_i, a in zip(p, s, As, strict=True)], dim=0)
    return stacked_b, stacked_a


def _check_factors(B: Tensor, A: Tensor) -> None:
    """Refuse a (B, A) that is not d x r and r x k."""
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"B {tuple(B.shape)} and A {tuple(A.shape)} are not LoRA factors")


def factored_svd(B: Tensor, A: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``U diag(S) V^T`` of ``B @ A`` without forming the d x k product.

    QR of ``B`` (d x m) and of ``A^T`` (k x m), SVD of the small core ``R_b R_a^T``; cost
    ``O((d + k) m^2)``. Returns ``(U, S, V)`` with ``S`` descending and at most
    ``min(m, d, k)`` components (the product has no more), cut to ``rank`` when given.
    """
    _check_factors(B, A)
    if rank is not None and rank < 0:
        raise ValueError(f"rank must be non-negative, got {rank}")
    # reduced QR gives Q (d x min(d, m)) and R (min(d, m) x m), so m > d or m > k is fine
    q_b, r_b = torch.linalg.qr(B, mode="reduced")
    q_a, r_a = torch.linalg.qr(A.mT, mode="reduced")
    u, s, vh = torch.linalg.svd(r_b @ r_a.mT, full_matrices=False)
    keep = s.shape[0] if rank is None else min(rank, s.shape[0])
    return q_b @ u[:, :keep], s[:keep], q_a @ vh.mH[:, :keep]


#: how FlexLoRA finds the top singular triplets (see :func:`top_svd`)
SvdMethod = Literal["auto", "exact", "randomized", "streaming"]
#: sketch columns beyond the rank kept (``rank + EXTRA_COLUMNS`` more, so ``2 rank + 16`` in
#: all), and range-finder power iterations: measured in tests/test_randomized_svd.py to stay
#: within 1e-4 (at most 1.3e-6) of the optimal residual even on flat spectra, where 10 extra
#: columns and 2 iterations missed it by 1%
EXTRA_COLUMNS, POWER_ITERATIONS = 16, 6


def randomized_svd(
    B: Tensor,
    A: Tensor,
    rank: int,
    oversample: int | None = None,
    power_iterations: int = POWER_ITERATIONS,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``rank`` singular triplets of ``B @ A``, by a randomised range finder.

    Halko, Martinsson and Tropp (2011), Algorithms 4.4 and 5.1, on the factored product:
    a Gaussian sketch ``Y = B (A Omega)`` of ``rank + oversample`` columns (``oversample``
    defaults to ``rank + EXTRA_COLUMNS``), ``power_iterations``
    rounds of ``Y <- M (M^T Q)`` with re-orthonormalisation (they sharpen a flat spectrum),
    then the exact SVD of the small ``(Q^T B) A``. Each product with ``M`` costs
    ``O((d + k) m l)`` for ``m`` stacked columns and ``l`` sketch columns, against the
    exact path's ``O((d + k) m^2 + m^3)``. The sketch is seeded: the same inputs give the
    same factors (a resumed run stays bit-identical). Returns ``(U, S, V)`` as
    :func:`factored_svd`, cut to ``rank``.
    """
    _check_factors(B, A)
    oversample = rank + EXTRA_COLUMNS if oversample is None else oversample
    if rank < 0 or oversample < 0 or power_iterations < 0:
        raise ValueError(
            f"rank, oversample and power_iterations must be non-negative, got "
            f"{rank}, {oversample}, {power_iterations}"
        )
    width = min(rank + oversample, B.shape[0], A.shape[1])
    generator = torch.Generator(device=A.device).manual_seed(seed)
    omega = torch.randn(A.shape[1], width, generator=generator, device=A.device, dtype=A.dtype)
    q = torch.linalg.qr(B @ (A @ omega), mode="reduced")[0]
    for _ in range(power_iterations):
        z = torch.linalg.qr(A.mT @ (B.mT @ q), mode="reduced")[0]  # M^T Q, k x l
        q = torch.linalg.qr(B @ (A @ z), mode="reduced")[0]  # M Z, d x l
    u, s, vh = torch.linalg.svd((q.mT @ B) @ A, full_matrices=False)
    keep = min(rank, s.shape[0])
    return q @ u[:, :keep], s[:keep], vh[:keep].mH


def svd_costs(d: int, k: int, m: int, rank: int) -> dict[str, float]:
    """Approximate flops of :func:`factored_svd` and :func:`randomized_svd`.

    For a product of d x m and m x k factors, keeping ``rank`` components.
    """
    n = min(m, d, k)
    width = min(2 * rank + EXTRA_COLUMNS, d, k)
    products = 2 * POWER_ITERATIONS + 2  # the sketch, the iterations, and (Q^T B) A
    return {
        "exact": 2.0 * (d + k) * m * n + 22.0 * n**3,
        "randomized": 2.0 * products * (d + k) * m * width + 22.0 * k * width**2,
    }


def top_svd(
    B: Tensor, A: Tensor, rank: int, method: SvdMethod = "auto", seed: int = 0
) -> tuple[tuple[Tensor, Tensor, Tensor], str]:
    """The top ``rank`` singular triplets of ``B @ A`` and the method that found them.

    ``"auto"`` takes the randomised range finder where its flop count is the smaller
    (:func:`svd_costs`): where the stacked rank ``m`` is well above ``rank``, as with
    hundreds of clients. Few clients keep the exact path. On 4096 x 4096 products of this
    2-core machine, rank 16: 10 clients of rank 16 (m = 160) 0.45 s exact, 1.23 s
    randomised; m = 480 1.76 s against 0.50 s; m = 1,600 12.45 s against 1.11 s.
    """
    if method == "auto":
        costs = svd_costs(B.shape[0], A.shape[1], B.shape[1], rank)
        method = "randomized" if costs["randomized"] < costs["exact"] else "exact"
    if method == "randomized":
        return randomized_svd(B, A, rank, seed=seed), method
    if method != "exact":
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    return factored_svd(B, A, rank), method


def truncate_to_rank(
    U: Tensor, S: Tensor, V: Tensor, r: int, scaling: float, split: SvdSplit = "left"
) -> tuple[Tensor, Tensor]:
    """Split the best rank-``r`` part of ``U diag(S) V^T`` into LoRA factors ``(B, A)``.

    ``scaling * B @ A == U_r diag(S_r) V_r^T`` either way; ``split`` chooses the factors:
    ``"left"`` (the FlexLoRA authors' code) ``B = U_r S_r / scaling``, ``A = V_r^T``;
    ``"sqrt"`` (balanced) ``B = U_r sqrt(S_r / scaling)``, ``A = sqrt(S_r / scaling) V_r^T``.
    The product is the same; the next round trains from different factors. With fewer
    than ``r`` singular values the factors are zero-padded to (d x r), (r x k).
    """
    if r < 0:
        raise ValueError(f"rank must be non-negative, got {r}")
    if scaling <= 0:
        raise ValueError(f"scaling must be positive, got {scaling}")
    if split not in ("left", "sqrt"):
        raise ValueError(f"split must be 'left' or 'sqrt', got {split!r}")
    keep = min(r, S.shape[0])
    values = S[:keep].clamp_min(0) / scaling
    if split == "left":
        left, right = values, torch.ones_like(values)
    else:
        left = right = values.sqrt()
    b = U.new_zeros(U.shape[0], r)
    a = V.new_zeros(r, V.shape[0])
    b[:, :keep] = U[:, :keep] * left
    a[:keep, :] = right[:, None] * V[:, :keep].mH
    return b, a


def flexlora_aggregate(
    Bs: Sequence[Tensor],
    As: Sequence[Tensor],
    weights: Sequence[float],
    scalings: Sequence[float] | None,
    client_ranks: Sequence[int],
    client_scalings: Sequence[float],
    split: SvdSplit = "left",
) -> list[tuple[Tensor, Tensor]]:
    """FlexLoRA: SVD of ``sum p_i s_i B_i A_i``, one rank-``r_j`` truncation per target.

    The sum is exact and never dense (:func:`stack_factors` then :func:`factored_svd`); target
    ``j`` gets ``(B_j, A_j)`` with ``client_scalings[j] * B_j @ A_j`` the best rank
    ``client_ranks[j]`` approximation of the sum (Eckart-Young), split as ``split`` says.
    """
    if len(client_ranks) != len(client_scalings):
        raise ValueError(
            f"need one scaling per target rank, got {len(client_scalings)} for {len(client_ranks)}"
        )
    stacked_b, stacked_a = stack_factors(Bs, As, weights, scalings)
    u, s, v = factored_svd(stacked_b, stacked_a, max(client_ranks, default=0))
    return [
        truncate_to_rank(u, s, v, r_j, s_j, split)
        for r_j, s_j in zip(client_ranks, client_scalings, strict=True)
    ]


def _product_norm(B: Tensor, A: Tensor) -> Tensor:
    # ||B A||_F^2 = trace(B^T B A A^T): two r x r Gram matrices instead of the d x k product
    return torch.sqrt(((B.mT @ B) * (A @ A.mT)).sum().clamp_min(0))


def hetlora_aggregate(
    Bs: Sequence[Tensor],
    As: Sequence[Tensor],
    weights: Sequence[float],
    r_max: int,
    weighting: HetLoRAWeighting = "norm",
) -> tuple[Tensor, Tensor]:
    """HetLoRA: zero-pad every client to rank ``r_max`` and average the padded factors.

    Client ``i`` counts ``||B_i A_i||_F`` (``weighting="norm"``, the paper's sparsity-weighted
    aggregation: larger updates count more) or ``p_i * ||B_i A_i||_F`` (``"examples_norm"``),
    renormalised. If every product is zero the example weights ``p_i`` alone are used.
    Returns ``B`` (d x r_max) and ``A`` (r_max x k).
    """
    _check_pairs(Bs, As, weights)
    if weighting not in ("norm", "examples_norm"):
        raise ValueError(f"weighting must be 'norm' or 'examples_norm', got {weighting!r}")
    p = normalise_weights(weights)
    padded_b, padded_a = [], []
    for i, (b, a) in enumerate(zip(Bs, As, strict=True)):
        r_i = b.shape[1]
        if r_i > r_max:
            raise ValueError(f"client {i} has rank {r_i} > r_max={r_max}")
        padded_b.append(torch.cat([b, b.new_zeros(b.shape[0], r_max - r_i)], dim=1))
        padded_a.append(torch.cat([a, a.new_zeros(r_max - r_i, a.shape[1])], dim=0))
    norms = [float(_product_norm(b, a)) for b, a in zip(Bs, As, strict=True)]
    norm_weights = (
        norms if weighting == "norm" else [p_i * n for p_i, n in zip(p, norms, strict=True)]
    )
    if sum(norm_weights) <= 0:
        norm_weights = p
    return weighted_mean(padded_b, norm_weights), weighted_mean(padded_a, norm_weights)


def hetlora_truncate(B: Tensor, A: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """HetLoRA's download: the first ``r`` columns of ``B`` and first ``r`` rows of ``A``."""
    if r < 0:
        raise ValueError(f"rank must be non-negative, got {r}")
    return B[:, :r], A[:r, :]


def _keep_rank(r: int, prune_fraction: float) -> int:
    if not 0 <= prune_fraction < 1:
        raise ValueError(f"prune_fraction must lie in [0, 1), got {prune_fraction}")
    # round first so that e.g. 10 * (1 - 0.7) = 3.0000000000000004 keeps 3, not 4
    return max(1, math.ceil(round(r * (1 - prune_fraction), 9)))


def hetlora_self_pruning_penalty(
    B: Tensor, A: Tensor, r: int, gamma: float, prune_fraction: float = 0.5
) -> Tensor:
    """HetLoRA's rank self-pruning regulariser on the tail of the rank dimension.

    ``gamma * ||A[r_keep:r, :]||_F * ||B[:, r_keep:r]||_F`` with
    ``r_keep = ceil(r * (1 - prune_fraction))`` (at least 1): it pushes the tail components
    towards zero so that :func:`hetlora_prune_rank` can drop them. Differentiable.
    """
    r_keep = _keep_rank(r, prune_fraction)
    tail_a = torch.linalg.matrix_norm(A[r_keep:r, :])
    tail_b = torch.linalg.matrix_norm(B[:, r_keep:r])
    return gamma * tail_a * tail_b


def hetlora_prune_rank(
    B: Tensor, A: Tensor, r: int, prune_fraction: float, threshold: float
) -> int:
    """HetLoRA's local rank pruning decision: ``r_keep`` if the tail is negligible, else ``r``.

    With ``r_keep = ceil(r * (1 - prune_fraction))`` (at least 1), returns ``r_keep`` when
    ``||A_tail||_F ||B_tail||_F < threshold * ||A_head||_F ||B_head||_F`` (head: the first
    ``r_keep`` components, tail: components ``r_keep`` to ``r``), otherwise ``r``.
    """
    r_keep = _keep_rank(r, prune_fraction)
    if r_keep >= r:
        return r
    with torch.no_grad():
        head = torch.linalg.matrix_norm(A[:r_keep, :]) * torch.linalg.matrix_norm(B[:, :r_keep])
        tail = torch.linalg.matrix_norm(A[r_keep:r, :]) * torch.linalg.matrix_norm(B[:, r_keep:r])
    return r_keep if float(tail) < threshold * float(head) else r


def fedex_residual(
    Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float], scaling: float
) -> tuple[Tensor, Tensor]:
    """FedEx-LoRA's residual ``scaling * (sum p_i B_i A_i - B̄ Ā)`` in factored form.

    ``R_B = [B_1 ... B_K, B̄]``, ``R_A = scaling * [p_1 A_1; ...; p_K A_K; -Ā]``, so that
    ``R_B @ R_A`` is the residual (rank at most ``(K + 1) r``); FedIT's ``scaling * B̄ Ā``
    plus the residual is the exact aggregate. Needs equal ranks.
    """
    _check_pairs(Bs, As, weights)
    p = normalise_weights(weights)
    mean_b, mean_a = weighted_mean(Bs, weights), weighted_mean(As, weights)
    r_b = torch.cat([*Bs, mean_b], dim=1)
    r_a = scaling * torch.cat([*(p_i * a for p_i, a in zip(p, As, strict=True)), -mean_a], dim=0)
    return r_b, r_a


#: :func:`accumulate_factors` re-factors a running sum whenever that costs at most this many
#: flops (``2 (d + k) m^2``, about 50 ms in float64 here); MiniLM's always qualify
REFACTOR_FLOPS = 2e9


def accumulate_factors(
    previous: tuple[Tensor, Tensor] | None, P: Tensor, Q: Tensor, rtol: float = 1e-9
) -> tuple[Tensor, Tensor]:
    """Add ``P @ Q`` to a running factored sum, re-factoring it compactly when worth it.

    Stacks the old and new factors (exact). When the stacked rank ``m`` exceeds
    ``min(d, k)``, or re-factoring costs at most :data:`REFACTOR_FLOPS`, it takes their
    factored SVD and keeps the components whose singular value exceeds ``rtol`` times the
    largest, so the running sum of many rounds (FLoRA merges, FedEx-LoRA residuals) stays
    at its numerical rank (``<= min(d, k)``) instead of growing by the stacked rank every
    round. Otherwise the stack is kept as it is: a QR of 100 7B-shaped clients' factors
    (m = 1,600, d = 4,096) takes 6 s per module and would not shrink them.
    """
    if previous is not None:
        P = torch.cat([previous[0], P], dim=1)
        Q = torch.cat([previous[1], Q], dim=0)
    (d, m), k = P.shape, Q.shape[1]
    if m <= min(d, k) and 2.0 * (d + k) * m * m > REFACTOR_FLOPS:
        return P, Q
    u, s, v = factored_svd(P, Q)
    keep = max(1, int((s > rtol * s.max()).sum().item())) if s.numel() and s.max() > 0 else 1
    root = s[:keep].sqrt()
    return u[:, :keep] * root, root[:, None] * v[:, :keep].mT
