"""Replies folded one at a time: the server's memory does not grow with the clients.

A round of hundreds of 7B-shaped updates is tens of gigabytes; a weighted-sum rule needs
none of it at once. :class:`WeightedSums` keeps running, unnormalised float64 sums and the
total weight, and divides at the end: the mean is exact (the same operations, in the same
order, as summing a held list), whatever order or number of replies. :func:`fold_replies`
walks the replies a strategy is given (a list, or an iterator that yields each reply as it
arrives), checks each as :mod:`fedpeft.strategies.guard` does, hands it to a folding
function and drops it, so only one reply is alive at a time.

Rules that need every update at once (FedMedian, FedTrimmedAvg, the server optimisers'
Flower code, and FLoRA, FedEx-LoRA and HetLoRA, whose factored sums hold every client's
factors) keep them; the registry says which stream (``StrategySpec.streams_replies``).
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable, Iterable
from logging import INFO

import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedpeft import records
from fedpeft.config import Scenario, ScenarioError
from fedpeft.strategies import AggregationError
from fedpeft.strategies.guard import check_finite, reply_weight

CPU = torch.device("cpu")


def aggregation_device(scenario: Scenario) -> torch.device:
    """Where the server folds and decomposes updates (``federation.server_device``).

    ``model`` is the device of the server's model (``model.device``); ``auto``, there or
    here, is the first CUDA device where there is one, else the CPU. A model on MPS
    aggregates on the CPU: MPS has no float64, which the exact sums need. Asking for CUDA
    on a server without it is a one-line :class:`ScenarioError`.
    """
    name = scenario.federation.server_device
    if name == "model":
        name = scenario.model.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        setting = scenario.federation.server_device
        raise ScenarioError(
            f"federation.server_device = {setting!r} means {name}, and this server has no "
            "CUDA device: set federation.server_device = 'cpu' (or 'auto')"
        )
    return device if device.type == "cuda" else CPU


class OnServerDevice:
    """A strategy that aggregates on its ``scenario``'s ``federation.server_device``."""

    @property
    def device(self) -> torch.device:
        """Where this server aggregates (:func:`aggregation_device`; the CPU without one)."""
        scenario = getattr(self, "scenario", None)  # a checkpoint may predate it
        return CPU if scenario is None else aggregation_device(scenario)


class WeightedSums:
    """Running example-weighted sums of same-keyed tensors; :meth:`mean` divides at the end.

    The sums live on ``device`` (:func:`aggregation_device`); the mean comes back on the CPU.
    """

    def __init__(self, device: torch.device = CPU) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.total = 0.0

    def add(self, state: dict[str, torch.Tensor], weight: float, node: int | str = "?") -> None:
        """Add ``weight * state`` (in float64); a tensor of another shape is refused."""
        for key, value in state.items():
            if key not in self.sums:
                self.sums[key] = torch.zeros(value.shape, dtype=torch.float64, device=self.device)
                self.dtypes[key] = value.dtype
            elif self.sums[key].shape != value.shape:
                raise AggregationError(
                    f"node {node}: tensor '{key}' has shape {tuple(value.shape)}, "
                    f"the others {tuple(self.sums[key].shape)}"
                )
            self.sums[key].add_(value.to(self.device), alpha=weight)  # float64, in place
        self.total += weight

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean of everything added, in each tensor's first dtype."""
        if self.total <= 0:
            raise AggregationError(f"the replies weigh nothing: their weights sum to {self.total}")
        return {k: (s / self.total).to(CPU, self.dtypes[k]) for k, s in self.sums.items()}


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc (Linux)
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()
#: hand freed heap pages back to the system every this many replies
TRIM_EVERY = 8


def give_back_free_memory() -> None:
    """Return the heap's free pages to the system (glibc; elsewhere nothing).

    Each folded reply frees tens of megabytes of 7B-sized tensors of many sizes; glibc keeps
    most freed pages, so without this the resident set grows with the clients (5.8 GB over
    1,000 updates, measured) although what is alive stays the same.
    """
    if _TRIM is not None:
        _TRIM(0)


#: what a strategy does with one checked reply: (message, its weight)
Fold = Callable[[Message, float], None]


def fold_replies(
    replies: Iterable[Message], weighted_by_key: str, fold: Fold
) -> MetricRecord | None:
    """Check and fold each reply as it comes; return the weighted mean of their metrics.

    Replies with an error are counted and logged as Flower's strategies log them; a reply no
    rule can use (NaN or inf, an unusable weight) raises :class:`AggregationError`, as do
    weights that sum to 0. Of each reply only its small MetricRecord is kept. None when no
    reply was valid.
    """
    metrics: list[RecordDict] = []
    weights: list[float] = []
    failures: list[Message] = []
    for msg in replies:
        if msg.has_error():
            failures.append(msg)
            continue
        weights.append(reply_weight(msg, weighted_by_key))
        check_finite(msg)
        found = msg.content.metric_records
        kept = found.get(records.METRICS) or next(iter(found.values()))
        metrics.append(RecordDict({records.METRICS: MetricRecord(dict(kept))}))  # a copy
        fold(msg, weights[-1])
        del msg, found, kept
        # a reply's records refer to each other (Flower's record views): only the cycle
        # collector frees them, and its young generations are cheap to sweep now
        gc.collect(1)
        if len(weights) % TRIM_EVERY == 0:
            give_back_free_memory()
    log(INFO, "aggregate_train: Received %s results and %s failures", len(metrics), len(failures))
    for msg in failures:
        node, reason = msg.metadata.src_node_id, msg.error.reason
        log(INFO, "\t> Received error in reply from node %d: %s", node, reason)
    if not metrics:
        return None
    if sum(weights) <= 0:
        raise AggregationError(f"the replies weigh nothing: '{weighted_by_key}' sums to 0")
    return aggregate_metricrecords(metrics, weighted_by_key)
