"""The client-side half of a strategy: what it asks of a client beyond training its factors.

Most rules need nothing of the client but the factors their instructions name; the default
:class:`ClientHook` does nothing. A rule that changes the client's own training or what it
sends (HetLoRA's rank self-pruning) registers a hook of its own on its spec
(``register_strategy(..., client_hook=...)``), and the ClientApp calls it at four points:
restoring the client's state, its loss, the rank it sends, and what it keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from fedpeft.adapters import AdapterState

Regulariser = Callable[[], torch.Tensor]


class ClientHook:
    """A strategy's client-side work; this default leaves training as it is."""

    def current_rank(self, personal: AdapterState, rank: int) -> int:
        """The rank the client trains at, given its kept state (``rank``: its adapter's)."""
        return rank

    def restore(self, state: AdapterState, personal: AdapterState) -> AdapterState:
        """The adapter state to train from, after the client's own tensors went in."""
        return state

    def regulariser(
        self,
        live: Mapping[str, torch.Tensor],
        current_rank: int,
        gamma: float,
        device: torch.device,
    ) -> Regulariser | None:
        """A term added to the loss on the live adapter parameters ``live``; None: none."""
        return None

    def rank_to_send(
        self, state: AdapterState, current_rank: int, gamma: float, threshold: float
    ) -> int:
        """The rank the client sends at after training (and keeps for the next round)."""
        return current_rank

    def outgoing(self, state: AdapterState, rank: int) -> AdapterState:
        """What leaves the client of ``state`` (its update, or a gradient) at ``rank``."""
        return state

    def kept(self, sent_rank: int, rank: int) -> AdapterState:
        """Extra state the client keeps for the next round (beyond its personal factors)."""
        return {}
