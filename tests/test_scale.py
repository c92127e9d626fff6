"""Many virtual clients: finding each node's partition cheaply, and waiting for all nodes."""

from collections.abc import Iterable

import pytest
from flwr.app import Message

from fedpeft.clients.app import app as client_app
from fedpeft.config import ScenarioError, load_scenario
from fedpeft.server.grid import CountingGrid, DelegatingGrid
from fedpeft.server.inprocess import InProcessGrid
from fedpeft.server.nodes import (
    DISCOVERY_TIMEOUT_S,
    check_node_count,
    discover_nodes,
    simulated_partitions,
)
from fedpeft.strategies import build_strategy

NODES = 40


class Asked(DelegatingGrid):
    """Counts the messages sent through it; the ``silent`` nodes' replies never arrive."""

    def __init__(self, grid, silent: frozenset[int] = frozenset()) -> None:  # type: ignore[no-untyped-def]
        super().__init__(grid)
        self.sent, self.silent, self.timeouts = 0, silent, []

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        self.sent += len(messages)
        self.timeouts.append(timeout)
        replies = self._grid.send_and_receive(messages, timeout=timeout)
        return [r for r in replies if r.metadata.src_node_id not in self.silent]


def _discover(
    guess: dict[int, int] | None, silent: frozenset[int] = frozenset()
) -> tuple[dict[int, int], int, dict[int, int]]:
    scenario = load_scenario(
        "smoke",
        [f"data.num_clients={NODES}", 'strategy.name="hetlora"', "peft.client_ranks=[2, 4]"],
    )
    asked = Asked(InProcessGrid(client_app, NODES), silent)
    counting = CountingGrid(asked)
    strategy = build_strategy(scenario)
    discover_nodes(counting, scenario, strategy, guess)
    return counting.partitions, asked.sent, strategy.node_ranks  # type: ignore[attr-defined]


def test_a_right_guess_is_checked_on_8_nodes_and_gives_what_asking_all_gives() -> None:
    truth, asked_all, ranks = _discover(None)
    assert asked_all == NODES and truth == {101 + i: i for i in range(NODES)}
    partitions, asked, guessed_ranks = _discover(dict(truth))
    assert asked == 8
    assert partitions == truth and guessed_ranks == ranks
    assert set(ranks.values()) == {2, 4}


def test_a_wrong_guess_falls_back_to_asking_every_node() -> None:
    truth, _, _ = _discover(None)
    swapped = dict(truth)
    swapped[101], swapped[101 + NODES - 1] = NODES - 1, 0  # the probes include both ends
    partitions, asked, _ = _discover(swapped)
    assert partitions == truth and asked == 8 + NODES


def test_probes_still_starting_do_not_refute_a_guess() -> None:
    """A probe that has not answered yet (its client process still starting) says nothing.

    Before, one silent probe threw the guess away and left nodes without a partition, so
    seeded faults and sampling no longer followed the partitions (a flaky smoke-faults run).
    """
    truth, _, _ = _discover(None)
    partitions, asked, _ = _discover(dict(truth), silent=frozenset({101, 102}))
    assert partitions == truth and asked == 8


def test_discovery_waits_longer_than_a_short_round_timeout() -> None:
    scenario = load_scenario("smoke", ["federation.round_timeout=5"])
    asked = Asked(InProcessGrid(client_app, 2))
    discover_nodes(CountingGrid(asked), scenario, build_strategy(scenario))
    assert asked.timeouts == [DISCOVERY_TIMEOUT_S]


def test_only_flowers_in_memory_grid_offers_a_guess() -> None:
    assert simulated_partitions(InProcessGrid(client_app, 3)) is None


class Growing(DelegatingGrid):
    """Nodes appear a few at a time, as when Flower registers thousands of virtual nodes."""

    def __init__(self, final: int, step: int) -> None:
        self.final, self.step, self.seen = final, step, 0

    def get_node_ids(self) -> Iterable[int]:
        self.seen = min(self.seen + self.step, self.final)
        return range(1, self.seen + 1)

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:  # type: ignore[no-untyped-def]
        raise AssertionError("not used")


def test_the_node_count_check_waits_while_nodes_still_register() -> None:
    scenario = load_scenario("smoke", ["data.num_clients=12"])
    check_node_count(Growing(12, 3), scenario)  # 3, 6, 9, 12: waits, then agrees
    with pytest.raises(ScenarioError, match="10 virtual SuperNodes but data.num_clients=12"):
        check_node_count(Growing(10, 5), scenario)  # stops growing short of 12
