"""Task data: bundled offline sets, local files, hub data sets, and client partitions.

Every data set is normalised to two splits (``train``, ``test``) with a ``text`` column
and an integer ``label`` column (a ``ClassLabel``). The held-out ``test`` split is fixed
(constant seed), so every scenario on a data set evaluates on the same examples. Training
data is divided among clients by flwr-datasets partitioners, as a pure function of the
scenario's seed.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    PathologicalPartitioner,
)
from flwr_datasets.partitioner.partitioner import Partitioner

from fedpeft.config import DataConfig, ScenarioError
from fedpeft.data import wordnet

SPLIT_SEED = 2024  # fixes every held-out split, whatever the scenario's seed
WORDNET_TEST_SIZE = 2000
CACHE_VERSION = "v1"
LOCAL_SUFFIXES = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

BUNDLED = {
    "wordnet-supersense": "WordNet 3.0 noun gloss -> 26 supersenses (82k, offline)",
}


@dataclass
class TaskData:
    """The two splits of a classification data set and its label names."""

    train: datasets.Dataset
    test: datasets.Dataset
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)


def cache_dir() -> Path:
    """Where fedpeft keeps built data sets (``$FEDPEFT_CACHE`` or ``~/.cache/fedpeft``)."""
    return Path(os.environ.get("FEDPEFT_CACHE", Path.home() / ".cache" / "fedpeft"))


def bundled_path(name: str) -> Path:
    """Folder of a built bundled data set (``datasets.load_from_disk`` reads it)."""
    return cache_dir() / "datasets" / f"{name}-{CACHE_VERSION}"


def _build_wordnet_supersense(target: Path) -> None:
    texts, labels = wordnet.read_noun_glosses()
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=wordnet.NOUN_SUPERSENSES),
        }
    )
    full = datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
    splits = full.train_test_split(
        test_size=WORDNET_TEST_SIZE, seed=SPLIT_SEED, stratify_by_column="label"
    )
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    splits.save_to_disk(str(tmp))
    os.replace(tmp, target)  # atomic: readers never see a half-written folder


def _load_bundled(name: str) -> datasets.DatasetDict:
    from filelock import FileLock

    target = bundled_path(name)
    if not (target / "dataset_dict.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not (target / "dataset_dict.json").is_file():
                _build_wordnet_supersense(target)
    return datasets.load_from_disk(str(target))


def _normalise(dd: datasets.DatasetDict, cfg: DataConfig) -> datasets.DatasetDict:
    """Rename the configured columns to text/label, encode labels, make a test split."""
    if "train" not in dd:
        first = next(iter(dd))
        dd = datasets.DatasetDict({"train": dd[first]})
    columns = dd["train"].column_names
    for key, column in (
        ("data.text_column", cfg.text_column),
        ("data.label_column", cfg.label_column),
    ):
        if column not in columns:
            raise ScenarioError(
                f"{key}={column!r} is not a column of data set {cfg.name!r}; columns: {columns}"
            )
    dd = dd.select_columns([cfg.text_column, cfg.label_column])
    if cfg.text_column != "text":
        dd = dd.rename_column(cfg.text_column, "text")
    if cfg.label_column != "label":
        dd = dd.rename_column(cfg.label_column, "label")
    if not isinstance(dd["train"].features["label"], datasets.ClassLabel):
        dd = dd.class_encode_column("label")
    if "test" not in dd:
        dd = dd["train"].train_test_split(test_size=cfg.test_fraction, seed=SPLIT_SEED)
    return datasets.DatasetDict({"train": dd["train"], "test": dd["test"]})


def _load_uncached(cfg: DataConfig) -> datasets.DatasetDict:
    if cfg.name in BUNDLED:
        return _load_bundled(cfg.name)
    path = Path(cfg.name)
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise ScenarioError(f"data file not found: {cfg.name}")
        dd = datasets.load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path))
    else:
        try:
            dd = datasets.load_dataset(cfg.name)
        except Exception as err:  # noqa: BLE001 - datasets raises many kinds; all mean "cannot load"
            raise ScenarioError(
                f"cannot load data.name={cfg.name!r} (not bundled: {', '.join(BUNDLED)}; "
                f"not a local csv/jsonl/parquet file; hub: {str(err).splitlines()[0]})"
            ) from None
    return _normalise(dd, cfg)


_CACHE: dict[tuple[Any, ...], Any] = {}


def load_task_data(cfg: DataConfig) -> TaskData:
    """Load (once per process) the train and held-out splits of ``cfg.name``."""
    key = ("data", cfg.name, cfg.text_column, cfg.label_column, cfg.test_fraction)
    if key not in _CACHE:
        dd = _load_uncached(cfg)
        names = list(dd["train"].features["label"].names)
        _CACHE[key] = TaskData(dd["train"], dd["test"], names)
    data: TaskData = _CACHE[key]
    return data


def eval_split(cfg: DataConfig) -> datasets.Dataset:
    """The held-out split evaluated centrally: all of it, or its first ``eval_examples``."""
    test = load_task_data(cfg).test
    if cfg.eval_examples and cfg.eval_examples < len(test):
        test = test.select(range(cfg.eval_examples))
    return test


def build_partitioner(cfg: DataConfig, seed: int) -> Partitioner:
    """Divide the training split among ``cfg.num_clients`` clients, deterministically."""
    key = ("partitioner", cfg.name, cfg.partitioner, cfg.alpha, cfg.classes_per_client,
           cfg.num_clients, seed)  # fmt: skip
    if key in _CACHE:
        partitioner: Partitioner = _CACHE[key]
        return partitioner
    train = load_task_data(cfg).train
    if cfg.partitioner == "iid":
        partitioner = IidPartitioner(num_partitions=cfg.num_clients)
    elif cfg.partitioner == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=cfg.num_clients, partition_by="label", alpha=cfg.alpha, seed=seed
        )
    else:
        partitioner = PathologicalPartitioner(
            num_partitions=cfg.num_clients,
            partition_by="label",
            num_classes_per_partition=cfg.classes_per_client,
            seed=seed,
        )
    # IidPartitioner takes contiguous shards, so shuffle first (with the scenario's seed).
    partitioner.dataset = train.shuffle(seed=seed).flatten_indices()
    _CACHE[key] = partitioner
    return partitioner


def client_partition(cfg: DataConfig, seed: int, partition_id: int) -> datasets.Dataset:
    """The training examples of client ``partition_id``."""
    if not 0 <= partition_id < cfg.num_clients:
        raise ValueError(f"partition id {partition_id} outside [0, {cfg.num_clients})")
    return build_partitioner(cfg, seed).load_partition(partition_id)


def client_split(
    cfg: DataConfig, seed: int, partition_id: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Client ``partition_id``'s (train, local held-out) parts.

    The held-out part is the ``data.client_holdout`` share, for personalised evaluation.
    """
    part = client_partition(cfg, seed, partition_id)
    n_holdout = int(round(len(part) * cfg.client_holdout))
    if n_holdout == 0 or len(part) - n_holdout < 1:
        return part, part.select([])
    split = part.train_test_split(test_size=n_holdout, seed=SPLIT_SEED + partition_id)
    return split["train"], split["test"]


def partition_summary(cfg: DataConfig, seed: int) -> list[dict[str, Any]]:
    """Size and label counts of every client's partition (recorded in summary.json)."""
    names = load_task_data(cfg).label_names
    rows = []
    for pid in range(cfg.num_clients):
        labels = client_partition(cfg, seed, pid)["label"]
        counts = Counter(labels)
        rows.append(
            {
                "client": pid,
                "size": len(labels),
                "label_counts": {names[k]: v for k, v in sorted(counts.items())},
            }
        )
    return rows
