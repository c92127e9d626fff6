"""Shared helpers of the LoRA maths tests: seeded client factors and dense reference formulas."""

import torch

from fedpeft.strategies.lora_math import normalise_weights, weighted_mean

F64 = torch.float64
D, K = 7, 5
RANKS = [2, 3, 4]  # heterogeneous client ranks; sum 9 > min(D, K)
COUNTS = [10.0, 30.0, 60.0]  # raw example counts; p = 0.1, 0.3, 0.6
ALPHA = 8.0


def randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=F64)


def clients(seed, ranks, d=D, k=K):
    g = torch.Generator().manual_seed(seed)
    return [randn(g, d, r) for r in ranks], [randn(g, r, k) for r in ranks]


def rel_err(x, y):
    return float(torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(y))


def dense_sum(bs, as_, p, s):
    """sum_i p_i s_i B_i A_i, element by element from the definition."""
    out = torch.zeros(bs[0].shape[0], as_[0].shape[1], dtype=F64)
    for p_i, s_i, b, a in zip(p, s, bs, as_, strict=True):
        for row in range(out.shape[0]):
            for col in range(out.shape[1]):
                out[row, col] += p_i * s_i * sum(b[row, j] * a[j, col] for j in range(b.shape[1]))
    return out


def dense_best_rank(w, r):
    """Eckart-Young reference: truncated SVD of the dense matrix."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r, :]


def product_sum(bs, as_, weights, scalings=None):
    """Dense sum_i p_i s_i B_i A_i (d x k), p from raw weights; ranks may differ."""
    p = normalise_weights(weights)
    s = [1.0] * len(bs) if scalings is None else scalings
    return sum(p_i * s_i * (b @ a) for p_i, s_i, b, a in zip(p, s, bs, as_, strict=True))


def fedit_cross_term(bs, as_, weights):
    """FedIT's error: sum p_i B_i A_i - (sum p_i B_i)(sum p_i A_i)."""
    return product_sum(bs, as_, weights) - weighted_mean(bs, weights) @ weighted_mean(as_, weights)
