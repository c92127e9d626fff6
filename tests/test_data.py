from collections import Counter

import pytest

from fedpeft.config import DataSection, ScenarioError
from fedpeft.data import client_partition, column, load_task_data, partition_summary, wordnet


def test_wordnet_supersense_is_built_from_the_real_files():
    texts, labels = wordnet.read_noun_glosses()
    assert len(texts) == 82115
    assert set(labels) == set(range(26))
    data = load_task_data(DataSection())
    assert data.num_labels == 26 and data.label_names[2] == "noun.animal"
    assert len(data.train) + len(data.test) == 82115
    # The "animal" gloss of "dog" is in there with its supersense.
    idx = texts.index(next(t for t in texts if t.startswith("a member of the genus Canis")))
    assert data.label_names[labels[idx]] == "noun.animal"


def test_missing_wordnet_is_one_line_with_install_hint(tmp_path):
    with pytest.raises(ScenarioError, match="apt-get install wordnet-base"):
        wordnet.read_noun_glosses(tmp_path)


def test_held_out_split_is_fixed():
    a = load_task_data(DataSection()).test
    from fedpeft import data as data_module

    data_module._CACHE.clear()
    b = load_task_data(DataSection()).test
    assert column(a, "text") == column(b, "text") and column(a, "label") == column(b, "label")


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_partitions_are_a_pure_function_of_the_seed(partitioner, tmp_path):
    from fedpeft import data as data_module

    # 3,000 rows in 10 classes: flwr-datasets reads the label column row by row, about
    # 6 s on the 80,000-row default set, and purity does not depend on the size
    path = tmp_path / "glosses.csv"
    rows = ["text,label"] + [f"gloss {i},class{i * 7919 % 10}" for i in range(3000)]
    path.write_text("\n".join(rows) + "\n")
    cfg = DataSection(name=str(path), partitioner=partitioner, num_clients=5, classes_per_client=3)
    first = [column(client_partition(cfg, 7, i), "text") for i in range(5)]
    data_module._CACHE.clear()
    again = [column(client_partition(cfg, 7, i), "text") for i in range(5)]
    other = [column(client_partition(cfg, 8, i), "text") for i in range(5)]
    assert first == again
    assert first != other
    if partitioner != "pathological":  # these two hand out every training example once
        flat = Counter(t for part in first for t in part)
        assert flat == Counter(column(load_task_data(cfg).train, "text"))


def test_iid_covers_the_train_split_and_pathological_limits_classes():
    iid = DataSection(partitioner="iid", num_clients=4)
    sizes = [row["size"] for row in partition_summary(iid, 0)]
    assert sum(sizes) == len(load_task_data(iid).train)
    assert max(sizes) - min(sizes) <= 1
    patho = DataSection(partitioner="pathological", num_clients=6, classes_per_client=2)
    for pid in range(6):
        assert len(Counter(column(client_partition(patho, 0, pid), "label"))) <= 2


def test_unreachable_hub_data_set_is_a_scenario_error():
    with pytest.raises(ScenarioError, match="cannot load data.name='nobody/no-such-set'"):
        load_task_data(DataSection(name="nobody/no-such-set"))


def test_local_csv_file(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = ["body,stars"] + [f"review number {i},{'good' if i % 2 else 'bad'}" for i in range(50)]
    path.write_text("\n".join(rows) + "\n")
    cfg = DataSection(name=str(path), text_column="body", label_column="stars", num_clients=2)
    data = load_task_data(cfg)
    assert data.label_names == ["bad", "good"]
    assert len(data.train) + len(data.test) == 50
    assert set(data.train.column_names) == {"text", "label"}
    with pytest.raises(ScenarioError, match="data.text_column='review'"):
        load_task_data(DataSection(name=str(path), text_column="review", label_column="stars"))


def test_a_node_reads_its_cached_split_back_without_partitioning_again(tmp_path, monkeypatch):
    import fedpeft.data as data

    cfg = DataSection(num_clients=3, partitioner="dirichlet", alpha=0.5)
    train, holdout = data.client_split(cfg, 7, 1)
    first = data.client_split(cfg, 7, 1, cache_dir=tmp_path)
    texts = [column(train, "text"), column(holdout, "text")]
    assert [column(p, "text") for p in first] == texts

    def no_partitioning(*args, **kwargs):
        raise AssertionError("partitioned again")

    monkeypatch.setattr(data, "_client_split", no_partitioning)
    cached = data.client_split(cfg, 7, 1, cache_dir=tmp_path)
    assert [column(p, "text") for p in cached] == texts
    labels = [column(train, "label"), column(holdout, "label")]
    assert [column(p, "label") for p in cached] == labels
    assert cached[0].features == train.features  # the ClassLabel names survive
    with pytest.raises(AssertionError, match="partitioned again"):  # another seed: new entry
        data.client_split(cfg, 8, 1, cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.tmp*"))


def test_a_nodes_own_file_is_read_in_the_federations_label_space(tmp_path):
    from fedpeft.data import node_split

    names = load_task_data(DataSection()).label_names
    file = tmp_path / "mine.csv"
    rows = [("a cut", names[3]), ("a walk", names[0]), ("an idea", names[3])] * 4
    file.write_text("gloss,sense\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    cfg = DataSection(text_column="gloss", label_column="sense", client_holdout=0.25)
    train, holdout = node_split(cfg, str(file), names)
    assert (len(train), len(holdout)) == (9, 3)
    assert train.features["label"].names == names  # the head's classes, not the file's two
    both = sorted([*train["label"], *holdout["label"]])
    assert both == sorted([3, 0, 3] * 4) and set(train.column_names) == {"text", "label"}
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"text": "x", "label": 5}\n{"text": "y", "label": 1}\n')
    mine, none = node_split(DataSection(client_holdout=0.0), str(ids), names)
    assert sorted(mine["label"]) == [1, 5] and len(none) == 0
    file.write_text("gloss,sense\nz,not.a.sense\n")
    with pytest.raises(ScenarioError, match="not among the federation's 26 classes"):
        node_split(cfg, str(file), names)
    with pytest.raises(ScenarioError, match="expected an existing"):
        node_split(cfg, str(tmp_path / "missing.csv"), names)


GOOD_ROWS = "".join(f"gloss number {i},{'good' if i % 2 else 'bad'}\n" for i in range(30))
# (file name, its bytes, what the one error line says): each a new user's likely mistake
BAD_FILES = [
    ("header-only.csv", b"text,label\n", "has no data rows (only a header)"),
    (
        "no-label.csv",
        f"text,label\n{GOOD_ROWS}a gloss,\n".encode(),
        "row 31 (line 32) has an empty label (column 'label')",
    ),
    (
        "blank-label.jsonl",
        b'{"text": "a", "label": "x"}\n\n{"text": "b", "label": " "}\n',
        "row 2 (line 3) has an empty label",
    ),
    (
        "no-text.csv",
        f"text,label\n{GOOD_ROWS},good\n".encode(),
        "row 31 (line 32) has an empty text",
    ),
    ("binary.csv", bytes(range(256)) * 4, "is binary, not csv text (a NUL byte on line 1)"),
    (
        "latin1.csv",
        "text,label\ncafé,x\n".encode("latin-1"),
        "binary or not UTF-8 text: line 2 holds byte 0xe9",
    ),
    ("nothing.csv", b"", "is empty"),
    ("broken.jsonl", b'{"text": "a", "label": 1}\n{"text": "b"\n', "line 2 is not JSON"),
    ("list.jsonl", b'{"text": "a", "label": 1}\n[1, 2]\n', "line 2 is not a JSON object"),
    ("broken.parquet", b"PAR1 this is not parquet", "cannot be read as parquet"),
    ("one-row.csv", b"text,label\nalone,x\n", "has 1 row: too few to hold out"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_FILES, ids=[f[0] for f in BAD_FILES])
def test_a_bad_data_file_is_one_error_naming_the_file_and_line(name, content, message, tmp_path):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ScenarioError) as err:
        load_task_data(DataSection(name=str(path)))
    assert str(path) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_quoted_line_break_drops_the_line_number_not_the_row(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text('text,label\n"two\nlines",a\nb,\n')
    with pytest.raises(ScenarioError, match=r"row 2 has an empty label"):
        load_task_data(DataSection(name=str(path)))


def test_fewer_examples_than_clients_or_an_impossible_split_is_refused(tmp_path):
    from fedpeft.data import check_partitions

    path = tmp_path / "small.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(10)))
    check_partitions(DataSection(name=str(path), partitioner="iid", num_clients=9), 0)
    with pytest.raises(ScenarioError, match=r"has 9 training examples .* data.num_clients=10"):
        check_partitions(DataSection(name=str(path), partitioner="iid", num_clients=10), 0)
    with pytest.raises(ScenarioError, match="data.partitioner='dirichlet' cannot divide the 9"):
        check_partitions(DataSection(name=str(path), partitioner="dirichlet", num_clients=2), 0)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        BAD_FILES[0],
        BAD_FILES[1],
        BAD_FILES[4],
        ("small.csv", f"text,label\n{GOOD_ROWS}".encode(), "fewer than data.num_clients=40"),
    ],
    ids=["header-only", "empty-label", "binary", "fewer-rows-than-clients"],
)
def test_fedpeft_run_refuses_a_bad_data_file_before_any_round(
    name, content, message, tmp_path, capsys
):
    from fedpeft.tools.cli import main

    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "out"
    args = [
        "run",
        "smoke",
        "--set",
        f"data.name='{path}'",
        "--set",
        "data.num_clients=40",
        "--set",
        "federation.clients_per_round=2",
        "--out",
        str(out),
    ]
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedpeft: error: data file"), captured.err
    assert str(path) in lines[0] and message in lines[0]
    assert "Traceback" not in captured.out + captured.err
    assert "Generating train split" not in captured.out + captured.err
    assert not out.exists()  # refused before the run started


def test_quiet_libraries_silences_what_was_imported_before(tmp_path, capfd, monkeypatch):
    """`fedpeft run` imports datasets and transformers before it can set their variables."""
    import importlib

    import datasets
    import transformers

    from fedpeft.config import ModelSection
    from fedpeft.models import load_base_model
    from fedpeft.tools.simulation import quiet_libraries

    path = tmp_path / "rows.csv"
    path.write_text("text,label\n" + GOOD_ROWS)
    # as on a user's machine, where no variable was set when datasets was imported
    bars = importlib.import_module("datasets.utils.tqdm")  # the module, not its tqdm class
    monkeypatch.setattr(bars, "HF_DATASETS_DISABLE_PROGRESS_BARS", None)
    datasets.enable_progress_bars()
    transformers.logging.set_verbosity_warning()
    try:
        quiet_libraries()
        load_task_data(DataSection(name=str(path)))
        load_base_model(ModelSection(name="minilm"), 2)  # a fresh head: a LOAD REPORT
    finally:
        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
    captured = capfd.readouterr()
    assert "Generating train split" not in captured.err
    assert "LOAD REPORT" not in captured.err + captured.out
