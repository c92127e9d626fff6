from collections import Counter

import pytest

from fedpeft.config import DataConfig, ScenarioError
from fedpeft.data import client_partition, load_task_data, partition_summary, wordnet


def test_wordnet_supersense_is_built_from_the_real_files():
    texts, labels = wordnet.read_noun_glosses()
    assert len(texts) == 82115
    assert set(labels) == set(range(26))
    data = load_task_data(DataConfig())
    assert data.num_labels == 26 and data.label_names[2] == "noun.animal"
    assert len(data.train) + len(data.test) == 82115
    # The "animal" gloss of "dog" is in there with its supersense.
    idx = texts.index(next(t for t in texts if t.startswith("a member of the genus Canis")))
    assert data.label_names[labels[idx]] == "noun.animal"


def test_missing_wordnet_is_one_line_with_install_hint(tmp_path):
    with pytest.raises(ScenarioError, match="apt-get install wordnet-base"):
        wordnet.read_noun_glosses(tmp_path)


def test_held_out_split_is_fixed():
    a = load_task_data(DataConfig()).test
    from fedpeft import data as data_module

    data_module._CACHE.clear()
    b = load_task_data(DataConfig()).test
    assert a["text"] == b["text"] and a["label"] == b["label"]


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_partitions_are_a_pure_function_of_the_seed(partitioner):
    from fedpeft import data as data_module

    cfg = DataConfig(partitioner=partitioner, num_clients=5, classes_per_client=3)
    first = [client_partition(cfg, 7, i)["text"] for i in range(5)]
    data_module._CACHE.clear()
    again = [client_partition(cfg, 7, i)["text"] for i in range(5)]
    other = [client_partition(cfg, 8, i)["text"] for i in range(5)]
    assert first == again
    assert first != other
    if partitioner != "pathological":  # these two hand out every training example once
        flat = Counter(t for part in first for t in part)
        assert flat == Counter(load_task_data(cfg).train["text"])


def test_iid_covers_the_train_split_and_pathological_limits_classes():
    iid = DataConfig(partitioner="iid", num_clients=4)
    sizes = [row["size"] for row in partition_summary(iid, 0)]
    assert sum(sizes) == len(load_task_data(iid).train)
    assert max(sizes) - min(sizes) <= 1
    patho = DataConfig(partitioner="pathological", num_clients=6, classes_per_client=2)
    for pid in range(6):
        assert len(Counter(client_partition(patho, 0, pid)["label"])) <= 2


def test_unreachable_hub_data_set_is_a_scenario_error():
    with pytest.raises(ScenarioError, match="cannot load data.name='nobody/no-such-set'"):
        load_task_data(DataConfig(name="nobody/no-such-set"))


def test_local_csv_file(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = ["body,stars"] + [f"review number {i},{'good' if i % 2 else 'bad'}" for i in range(50)]
    path.write_text("\n".join(rows) + "\n")
    cfg = DataConfig(name=str(path), text_column="body", label_column="stars", num_clients=2)
    data = load_task_data(cfg)
    assert data.label_names == ["bad", "good"]
    assert len(data.train) + len(data.test) == 50
    assert set(data.train.column_names) == {"text", "label"}
    with pytest.raises(ScenarioError, match="data.text_column='review'"):
        load_task_data(DataConfig(name=str(path), text_column="review", label_column="stars"))


def test_a_node_reads_its_cached_split_back_without_partitioning_again(tmp_path, monkeypatch):
    import fedpeft.data as data

    cfg = DataConfig(num_clients=3, partitioner="dirichlet", alpha=0.5)
    train, holdout = data.client_split(cfg, 7, 1)
    first = data.client_split(cfg, 7, 1, cache_dir=tmp_path)
    assert [p["text"] for p in first] == [train["text"], holdout["text"]]

    def no_partitioning(*args, **kwargs):
        raise AssertionError("partitioned again")

    monkeypatch.setattr(data, "_client_split", no_partitioning)
    cached = data.client_split(cfg, 7, 1, cache_dir=tmp_path)
    assert [p["text"] for p in cached] == [train["text"], holdout["text"]]
    assert [p["label"] for p in cached] == [train["label"], holdout["label"]]
    assert cached[0].features == train.features  # the ClassLabel names survive
    with pytest.raises(AssertionError, match="partitioned again"):  # another seed: new entry
        data.client_split(cfg, 8, 1, cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.tmp*"))


def test_a_nodes_own_file_is_read_in_the_federations_label_space(tmp_path):
    from fedpeft.data import node_split

    names = load_task_data(DataConfig()).label_names
    file = tmp_path / "mine.csv"
    rows = [("a cut", names[3]), ("a walk", names[0]), ("an idea", names[3])] * 4
    file.write_text("gloss,sense\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    cfg = DataConfig(text_column="gloss", label_column="sense", client_holdout=0.25)
    train, holdout = node_split(cfg, str(file), names)
    assert (len(train), len(holdout)) == (9, 3)
    assert train.features["label"].names == names  # the head's classes, not the file's two
    both = sorted([*train["label"], *holdout["label"]])
    assert both == sorted([3, 0, 3] * 4) and set(train.column_names) == {"text", "label"}
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"text": "x", "label": 5}\n{"text": "y", "label": 1}\n')
    mine, none = node_split(DataConfig(client_holdout=0.0), str(ids), names)
    assert sorted(mine["label"]) == [1, 5] and len(none) == 0
    file.write_text("gloss,sense\nz,not.a.sense\n")
    with pytest.raises(ScenarioError, match="not among the federation's 26 classes"):
        node_split(cfg, str(file), names)
    with pytest.raises(ScenarioError, match="expected an existing"):
        node_split(cfg, str(tmp_path / "missing.csv"), names)
