"""The server's side of differential privacy (see :mod:`fedpeft.privacy` for the maths).

:class:`PrivacyGrid` sits between the strategy and validation. Under ``dp = "central"`` it
clips each valid training reply's change and adds this reply's share of the Gaussian noise,
so the strategy's weighted average is the Gaussian mechanism; under ``dp = "local"`` the
clients did that themselves and it only counts who took part. Either way it keeps the
books the accountant needs for epsilon.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedpeft import records
from fedpeft.codecs import message_state, state_to_arrayrecord
from fedpeft.config import Scenario
from fedpeft.privacy import add_noise, clip_update, epsilon, noise_generator
from fedpeft.server.grid import DelegatingGrid, is_training


def central_noise_std(weights: list[float], noise_multiplier: float, clip: float) -> float:
    """Std of the noise each reply gets so that the weighted mean carries N(0, (s C max p)^2).

    With p_i = w_i / sum(w), the mean's noise variance is sum(p_i^2) v; setting it to
    (s C max p)^2 gives v = (s C max p)^2 / sum(p_i^2).
    """
    total = sum(weights)
    shares = [w / total for w in weights]
    target = noise_multiplier * clip * max(shares)
    return target / math.sqrt(sum(p * p for p in shares))


class PrivacyGrid(DelegatingGrid):
    """Clip and noise replies (central DP), and count the releases for the accountant."""

    def __init__(self, grid: Grid, scenario: Scenario, partitions: dict[int, int]) -> None:
        super().__init__(grid)
        self.privacy = scenario.privacy
        self.population = scenario.data.num_clients
        self.partitions = partitions  # node id -> partition id (CountingGrid.partitions)
        self.releases = 0  # central: aggregated rounds
        #: local: valid replies per client (partition id; node ids change when a run resumes)
        self.participations: Counter[int] = Counter()

    def books(self) -> dict[str, Any]:
        """What the accountant has counted, for a checkpoint."""
        return {"releases": self.releases, "participations": dict(self.participations)}

    def restore(self, books: dict[str, Any]) -> None:
        """Carry on counting from a checkpoint's :meth:`books`."""
        self.releases = int(books["releases"])
        self.participations = Counter(books["participations"])

    def epsilon(self) -> float:
        """Epsilon at ``privacy.delta`` so far (local: of the client that took part most)."""
        if self.privacy.dp == "central":
            return epsilon(self.privacy, self.releases, self.population)
        most = max(self.participations.values(), default=0)
        return epsilon(self.privacy, most, self.population)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send; under central DP return clipped, noised training replies.

        Local DP's replies pass on as they arrive. Central DP holds the round's replies:
        the noise's scale depends on every client's weight.
        """
        messages = list(messages)
        replies = self._grid.send_and_receive(messages, timeout=timeout)
        if not is_training(messages):
            return replies
        if self.privacy.dp == "local":
            return self._participating(replies)
        return self._noised(messages, list(replies))

    def _participating(self, replies: Iterable[Message]) -> Iterator[Message]:
        """Count each valid reply's client as taking part (local DP's privacy books)."""
        for reply in replies:
            if not reply.has_error():
                node = reply.metadata.src_node_id
                self.participations[self.partitions.get(node, node)] += 1
            yield reply
            del reply

    def _noised(self, messages: list[Message], replies: list[Message]) -> list[Message]:
        """Clip every valid reply's update and add the round's Gaussian noise."""
        valid = [r for r in replies if not r.has_error()]
        if not valid:
            return replies
        sent = {m.metadata.dst_node_id: m for m in messages}
        weights = [
            float(str(r.content.metric_records[records.METRICS].get(records.NUM_EXAMPLES, 1)))
            if records.METRICS in r.content.metric_records
            else 1.0
            for r in valid
        ]
        std = central_noise_std(weights, self.privacy.noise_multiplier, self.privacy.clipping_norm)
        generator = noise_generator()
        for reply in valid:
            base = message_state(sent[reply.metadata.src_node_id])
            clipped, _ = clip_update(message_state(reply), base, self.privacy.clipping_norm)
            reply.content[records.ARRAYS] = state_to_arrayrecord(add_noise(clipped, std, generator))
        self.releases += 1
        return replies
