"""What peft applies for a LoRA adapter: its scaling, and the delta of its factors.

Core maths that adapters, clients and strategies all need: :func:`lora_scaling` is the one
place peft's scaling (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA) is computed, so
every rule, the export and HetLoRA's shared scaling agree with what peft does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """Peft's LoRA scaling at rank ``r``: ``alpha / sqrt(r)`` with rsLoRA, else ``alpha / r``.

    As peft's ``LoraLayer.update_layer`` sets it; every rule that adds products of clients'
    factors, folds them into a weight or exports them computes its scalings here.
    """
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_alpha_for(scaling: float, r: int, use_rslora: bool = False) -> float:
    """The ``lora_alpha`` that gives peft's scaling ``scaling`` at rank ``r``.

    The inverse of :func:`lora_scaling`: an exported adapter whose ``B @ A`` is the delta
    itself takes ``lora_alpha_for(1.0, r, use_rslora)``; HetLoRA's rank-``r_i`` clients take
    ``lora_alpha_for(lora_scaling(alpha, r_max, use_rslora), r_i, use_rslora)``.
    """
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    return scaling * (math.sqrt(r) if use_rslora else r)


def delta_weight(B: Tensor, A: Tensor, scaling: float, fan_in_fan_out: bool = False) -> Tensor:
    """LoRA delta ``scaling * B @ A`` as peft forms it, transposed when ``fan_in_fan_out``.

    GPT-2's ``Conv1D`` stores its weight as (in, out), so its delta is ``(B @ A).T``.
    """
    delta = scaling * (B @ A)
    return delta.mT if fan_in_fan_out else delta


def fold_into_weight(
    weight: Tensor, B: Tensor, A: Tensor, scaling: float, fan_in_fan_out: bool = False
) -> Tensor:
    """``weight + delta_weight(B, A, scaling, fan_in_fan_out)`` in the weight's dtype.

    Folds a FedEx-LoRA residual or a FLoRA merge into the frozen base weight
    (:func:`fedpeft.adapters.fold_base_delta`); the sum is formed in float64 before casting
    back to the weight's dtype.
    """
    delta = delta_weight(B, A, scaling, fan_in_fan_out)
    if delta.shape != weight.shape:
        raise ValueError(
            f"delta {tuple(delta.shape)} does not match weight {tuple(weight.shape)}"
            + ("" if fan_in_fan_out else "; a Conv1D weight needs fan_in_fan_out=True")
        )
    out = weight.double() + delta.to(device=weight.device, dtype=torch.float64)
    return out.to(weight.dtype)
