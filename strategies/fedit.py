"""FedIT (Zhang et al., 2024): FedAvg applied to each LoRA factor separately.

``A = sum p_i A_i`` and ``B = sum p_i B_i``. It is inexact: the product of the averages
misses the cross term ``sum p_i (B_i - B)(A_i - A)`` (see :func:`fedpeft.strategies.lora_math`),
which is what FFA-LoRA, FLoRA, FlexLoRA and FedEx-LoRA set out to fix.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import Strategy

from fedpeft.config import Scenario
from fedpeft.strategies import register_strategy
from fedpeft.strategies.adapter_strategy import AdapterStrategy


class FedIT(AdapterStrategy):
    """FedIT: weighted average of every adapter tensor, A and B separately.

    This is :class:`AdapterStrategy`'s default rule, applied to the whole adapter.
    """


def build_fedit(scenario: Scenario, sampling: dict[str, Any]) -> Strategy:
    """FedIT with FedAvg's sampling."""
    return FedIT(scenario, sampling)


register_strategy(
    "fedit",
    "FedAvg on the LoRA factors A and B (baseline, inexact)",
    build_fedit,
    weighted_sum=True,
    streams_replies=True,
)
