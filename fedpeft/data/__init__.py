"""Task data: bundled offline sets, local files, hub data sets, and client partitions.

Every data set is normalised to two splits (``train``, ``test``) whose columns have the
canonical names a task reads: ``text`` (seq-cls text, causal-lm instruction), ``response``
(causal-lm), ``image`` (image-cls) and ``label`` (an integer ``ClassLabel``). The
``data.*_column`` keys name them in a local or hub set; whichever of them the set has are
kept, and the task checks that its own are there (:meth:`fedpeft.tasks.Task.check_data`).
The held-out ``test`` split is fixed (constant seed), so every scenario on a data set
evaluates on the same examples. Training data is divided among clients by flwr-datasets
partitioners, as a pure function of the scenario's seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr_datasets.partitioner.partitioner import Partitioner

import datasets

from fedpeft.config import DataSection, ScenarioError
from fedpeft.data import digits, wordnet
from fedpeft.data.files import LOCAL_SUFFIXES, read_local_file
from fedpeft.data.formats import (
    ALPACA_INPUT,
    CHOSEN,
    CONVERSATIONS,
    FORMATS,
    MESSAGES,
    REJECTED,
    check_rows,
    column,
    conversations,
    encode_as,
    from_alpaca,
    from_preferences,
    row_format,
)

SPLIT_SEED = 2024  # fixes every held-out split, whatever the scenario's seed
WORDNET_TEST_SIZE = 2000
CACHE_VERSION = "v1"

BUNDLED = {
    "wordnet-supersense": "WordNet 3.0 noun gloss -> 26 supersenses (82k, offline)",
    "wordnet-definitions": "instruction 'Define the word X.' -> WordNet gloss (82k, offline)",
    "digits": "scikit-learn's 8x8 handwritten digits, 10 classes (1.8k images, offline)",
    "wordnet-chat": "two-exchange chats: define a word, then name a broader word (82k, offline)",
    "wordnet-preferences": "'Define the word X.' -> chosen: its definition; rejected: another "
    "noun's whole gloss (82k pairs, offline)",
}

# canonical column -> the DataSection key that names it in a local or hub data set
COLUMN_KEYS = {
    "text": "text_column",
    "response": "response_column",
    "image": "image_column",
    "label": "label_column",
}


@dataclass
class TaskData:
    """The two splits of a data set and its label names (empty when it has no labels)."""

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


def _split_and_save(
    columns: dict[str, Any], features: datasets.Features, test_size: int, target: Path
) -> None:
    """Fix the held-out split (stratified by label if any, constant seed); save it atomically."""
    full = datasets.Dataset.from_dict(columns, features=features)
    stratify = "label" if "label" in columns else None
    splits = full.train_test_split(
        test_size=test_size, seed=SPLIT_SEED, stratify_by_column=stratify
    )
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    splits.save_to_disk(str(tmp))
    os.replace(tmp, target)  # atomic: readers never see a half-written folder


def _build_wordnet_supersense(target: Path) -> None:
    texts, labels = wordnet.read_noun_glosses()
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=wordnet.NOUN_SUPERSENSES),
        }
    )
    _split_and_save({"text": texts, "label": labels}, features, WORDNET_TEST_SIZE, target)


def _build_wordnet_definitions(target: Path) -> None:
    # the supersense label stays, so label-skewed partitioners split this set too
    texts, responses, labels = wordnet.read_noun_definitions()
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "response": datasets.Value("string"),
            "label": datasets.ClassLabel(names=wordnet.NOUN_SUPERSENSES),
        }
    )
    columns = {"text": texts, "response": responses, "label": labels}
    _split_and_save(columns, features, WORDNET_TEST_SIZE, target)


def _build_wordnet_chat(target: Path) -> None:
    turn = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    features = datasets.Features({MESSAGES: datasets.List(turn)})
    columns = {MESSAGES: wordnet.read_noun_conversations()}
    _split_and_save(columns, features, WORDNET_TEST_SIZE, target)


def _build_wordnet_preferences(target: Path) -> None:
    texts, chosen, rejected, labels = wordnet.read_noun_preferences()
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            CHOSEN: datasets.Value("string"),
            REJECTED: datasets.Value("string"),
            "label": datasets.ClassLabel(names=wordnet.NOUN_SUPERSENSES),
        }
    )
    columns = {"text": texts, CHOSEN: chosen, REJECTED: rejected, "label": labels}
    _split_and_save(columns, features, WORDNET_TEST_SIZE, target)


def _build_digits(target: Path) -> None:
    images, labels = digits.read_digits()
    features = datasets.Features(
        {
            "image": datasets.Array2D(shape=images.shape[1:], dtype="float32"),
            "label": datasets.ClassLabel(names=digits.DIGIT_NAMES),
        }
    )
    columns = {"image": list(images), "label": labels}
    _split_and_save(columns, features, digits.DIGITS_TEST_SIZE, target)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "wordnet-supersense": _build_wordnet_supersense,
    "wordnet-definitions": _build_wordnet_definitions,
    "digits": _build_digits,
    "wordnet-chat": _build_wordnet_chat,
    "wordnet-preferences": _build_wordnet_preferences,
}


def _load_bundled(name: str) -> datasets.DatasetDict:
    from filelock import FileLock

    target = bundled_path(name)
    if not (target / "dataset_dict.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not (target / "dataset_dict.json").is_file():
                BUILDERS[name](target)
    return datasets.load_from_disk(str(target))


def _normalise(
    dd: datasets.DatasetDict, cfg: DataSection, label_names: list[str] | None = None
) -> datasets.DatasetDict:
    """Keep the configured columns under their canonical names, encode labels, split.

    Which columns a task needs is the task's business (``Task.check_data``); here every
    configured column the set has is kept, and it needs a text or an image column.
    ``label_names`` (a node's own file) encodes labels as the federation's classes.
    """
    if "train" not in dd:
        first = next(iter(dd))
        dd = datasets.DatasetDict({"train": dd[first]})
    fmt = row_format(dd["train"].column_names, cfg)
    if fmt == "preference":
        dd = from_preferences(dd, cfg)
        cfg = dataclasses.replace(cfg, text_column="text", label_column="label")
    elif fmt == "alpaca":
        dd = from_alpaca(dd)
        cfg = dataclasses.replace(cfg, text_column="text", response_column="response")
    elif fmt in CONVERSATIONS:
        dd = conversations(dd, fmt, cfg.name)
    columns = dd["train"].column_names
    found = {
        canonical: getattr(cfg, key)
        for canonical, key in COLUMN_KEYS.items()
        if getattr(cfg, key) in columns
    }
    if fmt in CONVERSATIONS:
        found = {MESSAGES: MESSAGES}
    if fmt == "preference":
        found |= {CHOSEN: CHOSEN, REJECTED: REJECTED}
    if not {"text", "image", MESSAGES} & set(found):
        raise ScenarioError(
            f"data.text_column={cfg.text_column!r} (or data.image_column={cfg.image_column!r}) "
            f"is not a column of data set {cfg.name!r}; columns: {columns}; formats accepted: "
            f"{FORMATS}"
        )
    kept = list(found.values()) + [ALPACA_INPUT] * (ALPACA_INPUT in columns)
    dd = dd.select_columns(kept)
    renames = {column: canonical for canonical, column in found.items() if column != canonical}
    if renames:
        dd = dd.rename_columns(renames)
    check_rows(dd, found, cfg.name)
    if "label" in found and label_names is not None:
        dd = encode_as(dd, label_names, cfg.name)
    elif "label" in found and not isinstance(dd["train"].features["label"], datasets.ClassLabel):
        dd = dd.class_encode_column("label")
    if "test" not in dd:
        rows = len(dd["train"])
        if rows < 2:
            raise ScenarioError(
                f"data set {cfg.name!r} has {rows} row{'s' * (rows != 1)}: too few to hold out "
                f"data.test_fraction={cfg.test_fraction} for evaluation and train on the rest"
            )
        dd = dd["train"].train_test_split(test_size=cfg.test_fraction, seed=SPLIT_SEED)
    return datasets.DatasetDict({"train": dd["train"], "test": dd["test"]})


def node_split(
    cfg: DataSection, path: str, label_names: list[str] | None
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A deployed node's own data file (``--data PATH``): its (train, local held-out) parts.

    Columns are named by the scenario's ``data.*_column`` keys; labels (names or class
    ids) must be classes of the federation's data set, which fixes the model's head.
    """
    rows = read_local_file(Path(path))
    dd = datasets.DatasetDict({"train": rows, "test": rows.select([])})  # no split of its own
    part = _normalise(dd, dataclasses.replace(cfg, name=path), label_names)["train"]
    return _holdout(part, cfg, SPLIT_SEED)


def _load_uncached(cfg: DataSection) -> datasets.DatasetDict:
    if cfg.name in BUNDLED:
        return _load_bundled(cfg.name)
    path = Path(cfg.name)
    if path.suffix in LOCAL_SUFFIXES:
        dd = datasets.DatasetDict({"train": read_local_file(path)})
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


def forget_loaded_data() -> None:
    """Drop this process's loaded data sets and partitioners (they reload on next use)."""
    _CACHE.clear()


def load_task_data(cfg: DataSection) -> TaskData:
    """Load (once per process) the train and held-out splits of ``cfg.name``."""
    columns = tuple(getattr(cfg, key) for key in COLUMN_KEYS.values())
    key = ("data", cfg.name, *columns, cfg.test_fraction)
    if key not in _CACHE:
        dd = _load_uncached(cfg)
        label = dd["train"].features.get("label")
        names = list(label.names) if isinstance(label, datasets.ClassLabel) else []
        _CACHE[key] = TaskData(dd["train"], dd["test"], names)
    data: TaskData = _CACHE[key]
    return data


def eval_split(cfg: DataSection) -> datasets.Dataset:
    """The held-out split evaluated centrally: all of it, or its first ``eval_examples``."""
    return _first(load_task_data(cfg).test, cfg.eval_examples)


def personal_eval_split(holdout: datasets.Dataset, cfg: DataSection) -> datasets.Dataset:
    """A client's held-out share as evaluated: all of it, or its first ``client_eval_examples``.

    Only the evaluation is cut: the share itself, and so what the client trains on, stays.
    """
    return _first(holdout, cfg.client_eval_examples)


def _first(data: datasets.Dataset, n: int) -> datasets.Dataset:
    """``data``'s first ``n`` examples; all of them where ``n`` is 0 or at least its size."""
    return data.select(range(n)) if 0 < n < len(data) else data


def build_partitioner(cfg: DataSection, seed: int) -> Partitioner:
    """Divide the training split among ``cfg.num_clients`` clients, deterministically."""
    # imported here: flwr-datasets pulls in its plotting helpers, ~0.7 s a fresh process
    # (a deployed ClientApp) saves when it reads its partition from the disk cache
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    key = (
        "partitioner",
        cfg.name,
        cfg.partitioner,
        cfg.alpha,
        cfg.classes_per_client,
        cfg.num_clients,
        seed,
    )
    if key in _CACHE:
        partitioner: Partitioner = _CACHE[key]
        return partitioner
    train = load_task_data(cfg).train
    if cfg.partitioner != "iid" and "label" not in train.column_names:
        raise ScenarioError(
            f"data.partitioner={cfg.partitioner!r} splits by label, but data set {cfg.name!r} "
            f"has no column data.label_column={cfg.label_column!r}; use data.partitioner='iid'"
        )
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


def check_partitions(cfg: DataSection, seed: int) -> None:
    """Refuse, in one line and before any round, a training split the clients cannot share.

    Every client needs an example; a label-skewed partitioner may also fail to reach its
    minimum partition size on a small set (flwr-datasets raises after many tries).
    """
    train = load_task_data(cfg).train
    what = (
        f"data file {cfg.name}"
        if Path(cfg.name).suffix in LOCAL_SUFFIXES
        else (f"data set {cfg.name!r}")
    )
    if len(train) < cfg.num_clients:
        raise ScenarioError(
            f"{what} has {len(train)} training example{'s' * (len(train) != 1)} (after the "
            f"held-out split), fewer than data.num_clients={cfg.num_clients}: every client "
            "needs at least one; lower data.num_clients or add rows"
        )
    try:
        with warnings.catch_warnings():  # each retry of a Dirichlet draw warns; the end counts
            warnings.simplefilter("ignore")
            build_partitioner(cfg, seed).load_partition(0)  # partitions the whole split
    except ValueError as err:
        raise ScenarioError(
            f"data.partitioner={cfg.partitioner!r} cannot divide the {len(train)} training "
            f"examples of {what} among data.num_clients={cfg.num_clients} clients "
            f"({str(err).splitlines()[0]}); lower data.num_clients or use data.partitioner='iid'"
        ) from None


def client_partition(cfg: DataSection, seed: int, partition_id: int) -> datasets.Dataset:
    """The training examples of client ``partition_id``."""
    if not 0 <= partition_id < cfg.num_clients:
        raise ValueError(f"partition id {partition_id} outside [0, {cfg.num_clients})")
    return build_partitioner(cfg, seed).load_partition(partition_id)


def client_split(
    cfg: DataSection, seed: int, partition_id: int, cache_dir: Path | None = None
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Client ``partition_id``'s (train, local held-out) parts.

    The held-out part is the ``data.client_holdout`` share, for personalised evaluation.
    With ``cache_dir`` (a deployed node, whose ClientApp is a fresh process per message)
    both parts are saved there once, as Arrow files read back memory-mapped, instead of
    re-partitioning the whole training split every round.
    """
    if cache_dir is None:
        return _client_split(cfg, seed, partition_id)
    key = hashlib.sha256(
        json.dumps([CACHE_VERSION, dataclasses.asdict(cfg), seed], sort_keys=True).encode()
    ).hexdigest()[:16]
    folder = Path(cache_dir) / f"partition-{partition_id}-{key}"
    if not (folder / "done").is_file():
        parts = _client_split(cfg, seed, partition_id)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        for name, part in zip(("train", "holdout"), parts, strict=True):
            part.save_to_disk(str(tmp / name))
        (tmp / "done").write_text("")
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)  # whole or absent: a killed process leaves no half cache
        except OSError:  # another process of this node cached it first
            shutil.rmtree(tmp, ignore_errors=True)
        return parts
    return (
        datasets.load_from_disk(str(folder / "train")),
        datasets.load_from_disk(str(folder / "holdout")),
    )


def _client_split(
    cfg: DataSection, seed: int, partition_id: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    return _holdout(client_partition(cfg, seed, partition_id), cfg, SPLIT_SEED + partition_id)


def _holdout(
    part: datasets.Dataset, cfg: DataSection, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``part`` less its ``data.client_holdout`` share, and that share."""
    n_holdout = _holdout_size(len(part), cfg)
    if n_holdout == 0:
        return part, part.select([])
    split = part.train_test_split(test_size=n_holdout, seed=seed)
    return split["train"], split["test"]


def _holdout_size(size: int, cfg: DataSection) -> int:
    """Examples of a ``size``-example partition held out (none if nothing would be left)."""
    n_holdout = int(round(size * cfg.client_holdout))
    return n_holdout if size - n_holdout >= 1 else 0


def client_train_size(cfg: DataSection, seed: int, partition_id: int) -> int:
    """How many examples client ``partition_id`` trains on: its partition less the holdout."""
    size = len(client_partition(cfg, seed, partition_id))
    return size - _holdout_size(size, cfg)


def partition_summary(cfg: DataSection, seed: int) -> list[dict[str, Any]]:
    """Size and label counts of every client's partition (recorded in summary.json)."""
    names = load_task_data(cfg).label_names
    rows = []
    for pid in range(cfg.num_clients):
        part = client_partition(cfg, seed, pid)
        counts = Counter(column(part, "label") if names else [])
        rows.append(
            {
                "client": pid,
                "size": len(part),
                "label_counts": {names[k]: v for k, v in sorted(counts.items())},
            }
        )
    return rows
