"""Differential privacy of adapter updates: clipping, Gaussian noise, RDP accounting.

An update is a client's change from the adapter it received, tensor by tensor (only the
factors it sends: FFA-LoRA's B, FedSA-LoRA's A). Its L2 norm over all those tensors is
clipped to ``privacy.clipping_norm`` C.

- ``dp = "local"``: each client adds N(0, (sigma C)^2) to its clipped update before it
  leaves (:func:`fedpeft.clients.privacy.local_dp_mod`); each of its participations is
  one Gaussian mechanism.
- ``dp = "central"``: the server clips each reply and adds noise so that the weighted
  average the strategy computes carries exactly N(0, (sigma C max_i p_i)^2) per coordinate,
  p_i being the clients' aggregation weights (sigma C / m for m equal weights, as in
  Flower's ``DifferentialPrivacyServerSideFixedClipping``). It does so by giving reply i
  the noise share N(0, v) with v = (sigma C max p)^2 / sum p_i^2, which sums exactly to that
  Gaussian under a weighted mean, so it holds only for weighted-sum strategies.

Epsilon at ``privacy.delta`` comes from Flower's ``RdpAccountant`` (Google's dp-accounting),
one Gaussian release per aggregated round, without sampling amplification (conservative).
"""

from __future__ import annotations

import math
import os

import torch

from fedpeft.adapters import AdapterState
from fedpeft.config import PrivacySection


def update_changes(update: AdapterState, sent: AdapterState) -> AdapterState:
    """Each tensor's change from ``sent``, in float64.

    A tensor without a same-shaped counterpart in ``sent`` counts as all change.
    """
    return {
        k: v.double() - sent[k].double() if k in sent and sent[k].shape == v.shape else v.double()
        for k, v in update.items()
    }


def change_norm(changes: AdapterState) -> float:
    """The L2 norm of an update's changes over all its tensors together."""
    return math.sqrt(sum(float(c.square().sum()) for c in changes.values()))


def clip_update(
    update: AdapterState, sent: AdapterState, clip: float
) -> tuple[AdapterState, float]:
    """``sent + change * min(1, clip / ||change||)`` per tensor, and the change's norm."""
    changes = update_changes(update, sent)
    norm = change_norm(changes)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    out = {}
    for key, value in update.items():
        base = value.double() - changes[key]
        out[key] = (base + changes[key] * scale).to(value.dtype)
    return out, norm


def add_noise(state: AdapterState, std: float, generator: torch.Generator) -> AdapterState:
    """Each entry plus independent N(0, std^2) noise (drawn in float64)."""
    return {
        k: (v.double() + torch.randn(v.shape, generator=generator, dtype=torch.float64) * std).to(
            v.dtype
        )
        for k, v in state.items()
    }


def noise_generator() -> torch.Generator:
    """A generator seeded from the OS's entropy.

    DP noise must not be predictable from the scenario's seed, so a run with DP is not
    bit-reproducible.
    """
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def epsilon(privacy: PrivacySection, releases: int, population: int) -> float:
    """Epsilon at ``privacy.delta`` after ``releases`` Gaussian mechanisms (RDP)."""
    if releases == 0:
        return 0.0
    from flwr.serverapp import RdpAccountant
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )

    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=privacy.delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        ),
        orders=tuple(float(o) for o in range(2, 257)),
    )
    accountant.compose(GaussianPrivacyEvent(privacy.noise_multiplier, 1, population), releases)
    return float(accountant.get_epsilon(privacy.delta))
