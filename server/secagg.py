"""Secure aggregation (SecAgg+) for fedpeft's Message-API strategies.

Flower 1.42 has SecAgg+ only as a legacy-API workflow (``SecAggPlusWorkflow``, driven by
a ``LegacyContext`` and ``Strategy.configure_fit``). :class:`SecAggGrid` runs the same
protocol as a Grid wrapper, so any weighted-sum strategy gets it unchanged. It uses
Flower's primitives (Shamir shares, key agreement, masks, quantization) and, on the
client, Flower's own ``secaggplus_mod`` (see :mod:`fedpeft.clients.secagg`). For one round's
training instructions it runs the four stages:

0. setup: send the protocol's settings; each client answers with two public keys;
1. share keys: send each client its neighbours' keys; each answers with encrypted
   Shamir shares of its mask seed and its first secret key, one per neighbour;
2. collect masked vectors: forward those shares together with the training instruction.
   Each client trains, quantizes ``n * change`` (its example count times its change from
   what it got), adds its private mask and the pairwise masks, and sends the sum mod 2^32;
3. unmask: ask the survivors for shares. They give mask-seed shares of the clients that
   sent a vector, and secret-key shares of the clients that dropped after sharing keys.
   The server removes the masks and is left with the sum only.

The weighted mean change ``sum n_i d_i / sum n_i`` goes back to the strategy as every
surviving client's update (``received + mean change``). The weighted mean of identical
updates is that update, so a weighted-sum rule gives its usual result, up to the
quantization step (``2 * secagg_clipping_range / 2^22`` per unit of weight). Metrics and
example counts stay per client, as in Flower. The server never sees one client's update,
so validation of single updates, norm clipping and central DP cannot apply; the scenario
check refuses them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import cast

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    get_parameters_shape,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedpeft import records
from fedpeft.codecs import message_state, state_to_arrayrecord
from fedpeft.config import Scenario
from fedpeft.records import round_of
from fedpeft.server.grid import CountingGrid, DelegatingGrid, _short, is_training

logger = logging.getLogger(__name__)

QUANTIZATION_RANGE = 2**22  # Flower's defaults
MODULUS_RANGE = 2**32


class SecAggFailed(Exception):
    """The round's secure aggregation cannot finish (too few clients left)."""


class SecAggGrid(DelegatingGrid):
    """Runs each round's training exchange as SecAgg+ (see the module docstring)."""

    def __init__(self, grid: Grid, counting: CountingGrid, scenario: Scenario) -> None:
        super().__init__(grid)
        self.counting = counting
        self.privacy = scenario.privacy
        self.seed = scenario.seed
        #: no client's weight (examples seen in a round) exceeds this: batches x batch size,
        #: or federation.max_examples (which train.epochs requires here)
        t, cap = scenario.train, scenario.federation.max_examples
        self.max_weight = float(cap or (t.batches_per_round or 0) * t.batch_size)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Training instructions go through SecAgg+; anything else passes as it is."""
        messages = list(messages)
        if not is_training(messages):
            return self._grid.send_and_receive(messages, timeout=timeout)
        run = _Round(self, {m.metadata.dst_node_id: m for m in messages}, timeout)
        try:
            return run.aggregate()
        except SecAggFailed as err:
            logger.warning("secure aggregation failed: %s", err)
            run.give_up(str(err))
            return []

    def exchange(
        self,
        stage: str,
        configs: dict[int, ConfigRecord],
        timeout: float | None,
        *,
        count_failures: bool = True,
    ) -> dict[int, ConfigRecord]:
        """Send one protocol stage (no training): each answering node's reply configs.

        A node that fails or does not answer is counted as a failed client, unless
        ``count_failures`` is off (unmasking: its update is already in the sum).
        """
        messages = [  # a record per message: the client's mod pops entries off its own
            Message(
                RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(dict(cfg))}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
            )
            for node, cfg in configs.items()
        ]
        answers: dict[int, ConfigRecord] = {}
        failed: dict[int, str] = {node: f"no reply within {timeout} s" for node in configs}
        for reply in self._grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                failed[node] = _short(reply.error.reason)
            else:
                answers[node] = reply.content.config_records[RECORD_KEY_CONFIGS]
                del failed[node]
        for node, reason in failed.items():
            logger.warning("SecAgg+ %s: node %s failed: %s", stage, node, reason)
            if count_failures:
                self.counting.lost(node, f"SecAgg+ {stage}: {reason}")
        return answers

    def train(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """The training exchange proper (counted as such by the CountingGrid below)."""
        return list(self._grid.send_and_receive(messages, timeout=timeout))


class _Round:
    """One round of SecAgg+ (state of the server's side)."""

    def __init__(
        self, grid: SecAggGrid, instructions: dict[int, Message], timeout: float | None
    ) -> None:
        self.grid, self.instructions, self.timeout = grid, instructions, timeout
        self.sampled = sorted(instructions)
        self.keyed: set[int] = set()  # sent key shares: their masks may be in the sum
        self.trained: set[int] = set()  # got the training instruction (counted below)
        self.masked: list[Message] = []  # replies carrying a masked vector
        self.lost: set[int] = set()  # counted as failed before training

    # ---------------------------------------------------------------- the four stages
    def aggregate(self) -> list[Message]:
        """Run the stages; return the survivors' replies, each carrying the mean update."""
        privacy, n = self.grid.privacy, len(self.sampled)
        if n < 2:
            raise SecAggFailed(f"{n} client(s) in the round; a secure sum needs 2")
        shares = round(privacy.secagg_shares * n)
        if shares < n and shares % 2 == 0:
            shares += 1  # a ring neighbourhood of each side plus itself: an odd size
        if shares <= 2:
            shares = n
        self.threshold = max(round(privacy.secagg_threshold * shares), 2)
        order = list(self.sampled)
        server_round = round_of(self.instructions[order[0]])
        random.Random(self.grid.seed * 1_000_003 + server_round).shuffle(order)
        half = shares // 2
        self.neighbours = {
            node: {order[(i + k) % n] for k in range(-half, half + 1)}
            for i, node in enumerate(order)
        }
        keys = self._setup(n, shares)
        ciphertexts = self._share_keys(keys)
        total = self._collect(ciphertexts)
        return self._unmask(total, keys)

    def _setup(self, n: int, shares: int) -> dict[int, list[bytes]]:
        settings = ConfigRecord(
            {
                Key.STAGE: Stage.SETUP,
                Key.SAMPLE_NUMBER: n,
                Key.SHARE_NUMBER: shares,
                Key.THRESHOLD: self.threshold,
                Key.CLIPPING_RANGE: float(self.grid.privacy.secagg_clipping_range),
                Key.TARGET_RANGE: QUANTIZATION_RANGE,
                Key.MOD_RANGE: MODULUS_RANGE,
                Key.MAX_WEIGHT: self.grid.max_weight,
            }
        )
        answers = self.grid.exchange("setup", {n: settings for n in self.sampled}, self.timeout)
        self.lost |= set(self.sampled) - answers.keys()
        self._check(answers.keys(), "setup")
        return {
            node: [cast(bytes, cfg[Key.PUBLIC_KEY_1]), cast(bytes, cfg[Key.PUBLIC_KEY_2])]
            for node, cfg in answers.items()
        }

    def _share_keys(self, keys: dict[int, list[bytes]]) -> dict[int, list[tuple[int, bytes]]]:
        def config(node: int) -> ConfigRecord:
            cfg = ConfigRecord({str(m): keys[m] for m in self.neighbours[node] & keys.keys()})
            cfg[Key.STAGE] = Stage.SHARE_KEYS
            return cfg

        answers = self.grid.exchange("share keys", {n: config(n) for n in keys}, self.timeout)
        self.lost |= keys.keys() - answers.keys()
        self._check(answers.keys(), "share keys")
        self.keyed = set(answers)
        forward: dict[int, list[tuple[int, bytes]]] = {node: [] for node in answers}
        for src, cfg in answers.items():
            dsts = cast(list[int], cfg[Key.DESTINATION_LIST])
            for dst, text in zip(dsts, cast(list[bytes], cfg[Key.CIPHERTEXT_LIST]), strict=True):
                if dst in forward:
                    forward[dst].append((src, text))
        return forward

    def _collect(self, ciphertexts: dict[int, list[tuple[int, bytes]]]) -> list[np.ndarray]:
        messages = []
        for node, received in ciphertexts.items():
            # its own RecordDict: a strategy may hand every node the same one
            content = RecordDict(dict(self.instructions[node].content.items()))
            content[RECORD_KEY_CONFIGS] = ConfigRecord(
                {
                    Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                    Key.CIPHERTEXT_LIST: [text for _, text in received],
                    Key.SOURCE_LIST: [src for src, _ in received],
                }
            )
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        self.trained = set(ciphertexts)
        replies = self.grid.train(messages, self.timeout)
        self.masked = [r for r in replies if not r.has_error()]
        self._check({r.metadata.src_node_id for r in self.masked}, "collect masked vectors")
        key_lists = {tuple(cast(list[str], _secagg_keys(r)["keys"])) for r in self.masked}
        if len(key_lists) != 1:
            raise SecAggFailed("clients summed different sets of tensors")
        self.keys = list(key_lists.pop())
        total: list[np.ndarray] | None = None
        for reply in self.masked:
            masked = cast(
                list[bytes], reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
            )
            vector = [bytes_to_ndarray(b) for b in masked]
            total = vector if total is None else parameters_addition(total, vector)
        assert total is not None
        return parameters_mod(total, MODULUS_RANGE)

    def _unmask(self, total: list[np.ndarray], keys: dict[int, list[bytes]]) -> list[Message]:
        alive = {r.metadata.src_node_id for r in self.masked}
        dropped = self.keyed - alive  # their pairwise masks are in the sum

        def config(node: int) -> ConfigRecord:
            return ConfigRecord(
                {
                    Key.STAGE: Stage.UNMASK,
                    Key.ACTIVE_NODE_ID_LIST: sorted(self.neighbours[node] & alive),
                    Key.DEAD_NODE_ID_LIST: sorted(self.neighbours[node] & dropped),
                }
            )

        answers = self.grid.exchange(
            "unmask", {n: config(n) for n in alive}, self.timeout, count_failures=False
        )
        collected: dict[int, list[bytes]] = {node: [] for node in alive | dropped}
        for cfg in answers.values():
            owners = cast(list[int], cfg[Key.NODE_ID_LIST])
            for owner, share in zip(owners, cast(list[bytes], cfg[Key.SHARE_LIST]), strict=True):
                collected[owner].append(share)
        shape = get_parameters_shape(total)
        for node, node_shares in collected.items():
            if len(node_shares) < self.threshold:
                raise SecAggFailed(
                    f"{len(node_shares)} shares of node {node}'s secret came back; "
                    f"{self.threshold} are needed"
                )
            secret = combine_shares(node_shares)
            if node in alive:  # its private mask
                total = parameters_subtraction(total, pseudo_rand_gen(secret, MODULUS_RANGE, shape))
                continue
            for other in self.neighbours[node] & alive:  # a dropped node's pairwise masks
                shared = generate_shared_key(
                    bytes_to_private_key(secret), bytes_to_public_key(keys[other][0])
                )
                mask = pseudo_rand_gen(shared, MODULUS_RANGE, shape)
                total = (parameters_addition if node > other else parameters_subtraction)(
                    total, mask
                )
        weight, summed = factor_extract(parameters_mod(total, MODULUS_RANGE))
        clip = self.grid.privacy.secagg_clipping_range
        mean = dequantize(summed, clip, QUANTIZATION_RANGE)
        for vec in mean:
            vec += -(len(alive) - 1) * clip  # each client's values were shifted by +clip
            vec *= QUANTIZATION_RANGE / weight
        return [self._with_mean(reply, mean) for reply in self.masked]

    # ---------------------------------------------------------------- helpers
    def _with_mean(self, reply: Message, mean: list[np.ndarray]) -> Message:
        """``reply`` as the strategy expects it: what the node got plus the mean change."""
        given = message_state(self.instructions[reply.metadata.src_node_id])
        update = {
            key: (given[key].double() + torch.from_numpy(np.asarray(change))).to(given[key].dtype)
            for key, change in zip(self.keys, mean, strict=True)
        }
        content = reply.content
        for name in (RECORD_KEY_CONFIGS, records.SECAGG_KEYS):
            if name in content:
                del content[name]
        content[records.ARRAYS] = state_to_arrayrecord(update)
        return reply

    def _check(self, answered: Iterable[int], stage: str) -> None:
        """Every sampled node needs ``threshold`` live neighbours (itself included)."""
        live = set(answered)
        for node in self.sampled:
            if node in live and len(self.neighbours[node] & live) < self.threshold:
                raise SecAggFailed(
                    f"after stage {stage!r} node {node} has {len(self.neighbours[node] & live)} "
                    f"live neighbours; privacy.secagg_threshold needs {self.threshold}"
                )

    def give_up(self, reason: str) -> None:
        """Count the clients whose updates the failed round leaves out (each once)."""
        why = f"secure aggregation failed: {reason}"
        for node in set(self.sampled) - self.lost - self.trained:
            self.grid.counting.lost(node, why)  # stopped before it trained
        for reply in self.masked:
            self.grid.counting.reject(reply, why)


def _secagg_keys(reply: Message) -> ConfigRecord:
    return reply.content.config_records[records.SECAGG_KEYS]
