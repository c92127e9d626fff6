"""Before round 1: the connected nodes, how many there are, and which partition each serves."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpeft import records
from fedpeft.config import Scenario, ScenarioError
from fedpeft.report import RoundProgress, console, step
from fedpeft.server.grid import CountingGrid, PackingGrid, PollingGrid
from fedpeft.strategies.adapter_strategy import AdapterStrategy

logger = logging.getLogger(__name__)

#: the least time nodes get to answer the partition query: their client processes start then
DISCOVERY_TIMEOUT_S = 300.0


def connect_nodes(grid: Grid, scenario: Scenario, engine: str, strategy: Strategy) -> CountingGrid:
    """Check (simulation) or wait for (deployment) the nodes, then learn each one's partition.

    Returns the byte-counting Grid every later layer talks through.
    """
    guess = None
    progress = RoundProgress(scenario.federation.rounds)  # "4/10 clients answered" in a round
    if engine == "simulation":
        check_node_count(grid, scenario)
        guess = simulated_partitions(grid)  # read from Flower's in-memory Grid itself
        grid = PollingGrid(grid, first_s=0.1, max_s=0.1, progress=progress)  # Flower's 0.1 s
        step("starting the client processes (each imports torch, then builds its model once)")
    elif engine == "deployment":
        wait_for_nodes(grid, scenario)
        # replies in ~0.1 s instead of Flower's 3 s pull interval; each ArrayRecord one object
        grid = PollingGrid(PackingGrid(grid), progress=progress)
        step(f"asking the {len(list(grid.get_node_ids()))} SuperNodes which partition each serves")
    counting = CountingGrid(grid)
    discover_nodes(counting, scenario, strategy, guess)
    return counting


def discover_nodes(
    grid: CountingGrid, scenario: Scenario, strategy: Strategy, guess: dict[int, int] | None = None
) -> None:
    """Learn every connected node's partition and rank before round 1.

    Node ids are random per run; knowing each node's partition lets the seeded sampler
    pick the same clients in every run, and lets heterogeneous-rank strategies send each
    node its own rank from the first round. Each node is asked (a query message), unless
    ``guess`` gives the partitions (:func:`simulated_partitions`): then 8 nodes spread
    over it are asked, and any disagreement falls back to asking every node.
    """
    config = ConfigRecord({records.SCENARIO: scenario.to_json()})
    # A node's first message starts its client process (torch, the model), which can take
    # longer than a round on a busy machine: a round timeout alone would leave nodes unknown.
    timeout = max(scenario.federation.round_timeout, DISCOVERY_TIMEOUT_S)
    answers: dict[int, tuple[int, int]] = {}  # node -> (partition, rank)
    if guess:
        nodes = list(guess)
        probes = sorted({nodes[round(i * (len(nodes) - 1) / 7)] for i in range(8)})
        answers = _ask(grid, config, timeout, probes)
        # a probe that did not answer says nothing; one that answered otherwise refutes it
        if all(answers[n][0] == guess[n] for n in probes if n in answers):
            answers |= {n: (p, scenario.rank_of(p)) for n, p in guess.items() if n not in answers}
        else:
            logger.warning("node partitions differ from Flower's registration order; asking all")
            guess = None
    if not guess:
        answers = _ask(grid, config, timeout, grid.get_node_ids())
        if silent := sorted(set(grid.get_node_ids()) - answers.keys()):
            logger.warning(
                "%d node(s) did not say which partition they serve within %.0f s: %s",
                len(silent),
                timeout,
                silent[:5],
            )
    for node, (partition, rank) in answers.items():
        grid.partitions[node] = partition
        if rank != scenario.max_rank and not getattr(strategy, "heterogeneous_ranks", False):
            raise ScenarioError(
                f"node {node} (partition {partition}) trains LoRA rank {rank}, but "
                f"strategy.name={scenario.strategy.name!r} needs every client at rank "
                f"{scenario.max_rank}; use flora, flexlora or hetlora, or drop the node's rank"
            )
        if isinstance(strategy, AdapterStrategy):
            strategy.node_ranks[node] = rank
    grid.take()  # discovery traffic is not a training round's


def simulated_partitions(grid: Grid) -> dict[int, int] | None:
    """Node id -> partition id in Flower's Simulation Engine, without asking the nodes.

    The engine registers node i for partition i, in order, and its in-memory state keeps
    its nodes in that order. Asking 10,000 virtual nodes instead takes minutes, because
    Flower's in-memory state scans every pending message for every node. None where the
    order cannot be read (any other Grid or state); :func:`discover_nodes` checks a guess.
    """
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    registered = getattr(getattr(grid, "state", None), "nodes", None)
    if not isinstance(grid, InMemoryGrid) or not isinstance(registered, dict):
        return None
    live = set(grid.get_node_ids())
    order = [node for node in registered if node in live]
    return {node: i for i, node in enumerate(order)} if len(order) == len(live) else None


def _ask(
    grid: Grid, config: ConfigRecord, timeout: float, nodes: Iterable[int]
) -> dict[int, tuple[int, int]]:
    """Each answering node's (partition, rank), asked in batches."""
    answers = {}
    for reply in _ask_in_batches(grid, config, timeout, list(nodes)):
        if not reply.has_error():
            metrics = reply.content.metric_records[records.METRICS]
            partition = int(str(metrics[records.PARTITION_ID]))
            rank = int(str(metrics[records.CLIENT_RANK]))
            answers[reply.metadata.src_node_id] = (partition, rank)
    return answers


def _ask_in_batches(
    grid: Grid, config: ConfigRecord, timeout: float, nodes: list[int], batch: int = 256
) -> Iterator[Message]:
    """Query ``nodes``, ``batch`` at a time.

    Flower's in-memory state scans every pending message on each delivery, so one query to
    10,000 nodes at once would take quadratic time.
    """
    for start in range(0, len(nodes), batch):
        messages = [
            Message(
                RecordDict({records.CONFIG: config}), dst_node_id=n, message_type=MessageType.QUERY
            )
            for n in nodes[start : start + batch]
        ]
        yield from grid.send_and_receive(messages, timeout=timeout)


def check_node_count(grid: Grid, scenario: Scenario, wait_s: float = 300.0) -> None:
    """In simulation every virtual node must match the data split.

    Flower registers the virtual nodes while the ServerApp starts (thousands take seconds),
    so wait while their number still grows towards ``data.num_clients``.
    """
    wanted, deadline = scenario.data.num_clients, time.monotonic() + wait_s
    nodes, grew = len(list(grid.get_node_ids())), time.monotonic()
    while 0 < nodes < wanted and time.monotonic() < min(deadline, grew + 5.0):
        time.sleep(0.5)
        if (now := len(list(grid.get_node_ids()))) != nodes:
            nodes, grew = now, time.monotonic()
    if nodes and nodes != scenario.data.num_clients:
        raise ScenarioError(
            f"the federation has {nodes} virtual SuperNodes but data.num_clients="
            f"{scenario.data.num_clients}; make them equal (options.num-supernodes of the "
            f"Flower connection, or --run-config / --set data.num_clients={nodes})"
        )


def wait_for_nodes(grid: Grid, scenario: Scenario, poll_s: float = 1.0) -> None:
    """Deployment: wait (5 minutes at most) for ``data.num_clients`` nodes to connect.

    SuperNodes join when they start, so the first round could otherwise begin with only
    some of them known. Past the deadline the run goes on with the nodes it has.
    """
    wanted = scenario.data.num_clients
    deadline = time.monotonic() + min(scenario.federation.round_timeout, 300.0)
    shown = -1
    while (have := len(list(grid.get_node_ids()))) < wanted and time.monotonic() < deadline:
        if have != shown:
            console.print(f"waiting for SuperNodes: {have}/{wanted} connected")
            shown = have
        time.sleep(poll_s)
    if have < wanted:
        console.print(f"[yellow]going on with {have}/{wanted} SuperNodes[/]")
