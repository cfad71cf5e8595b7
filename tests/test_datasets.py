"""Data files: reading CSV and .npz, fitting them to a model, splitting them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.datasets import (
    DataError,
    from_arrays,
    load_dataset,
    partition,
    split_holdout,
    write_csv,
)

ROOT = Path(__file__).resolve().parent.parent
IRIS = ROOT / "data" / "iris.csv"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_shipped_iris_file_has_150_rows_4_features_3_classes():
    iris = load_dataset(IRIS)
    assert iris.features.shape == (150, 4)
    assert iris.feature_names[0] == "sepal_length"
    assert iris.label_name == "species"
    assert np.bincount(iris.labels).tolist() == [50, 50, 50]


def test_csv_labels_become_one_hot_rows_of_the_model_width(tmp_path):
    data = load_dataset(write(tmp_path / "d.csv", "a,b,label\n1,2,0\n3,4,2\n"))
    features, labels = data.fit((2,), 4)
    assert features.tolist() == [[1, 2], [3, 4]]
    assert labels.tolist() == [[1, 0, 0, 0], [0, 0, 1, 0]]


def test_the_label_column_can_be_named_or_numbered(tmp_path):
    path = write(tmp_path / "d.csv", "kind,a,b\n1,0.5,2\n0,1.5,3\n")
    by_name = load_dataset(path, label_column="kind")
    by_index = load_dataset(path, label_column="0")
    for data in (by_name, by_index):
        assert data.labels.tolist() == [1, 0]
        assert data.features.tolist() == [[0.5, 2], [1.5, 3]]


def test_class_names_map_to_outputs_in_the_order_given(tmp_path):
    path = write(tmp_path / "d.csv", "a,label\n1,cat\n2,dog\n3,cat\n")
    data = load_dataset(path, classes=["dog", "cat"])
    assert data.labels.tolist() == [1, 0, 1]
    with pytest.raises(DataError, match="labels name 2 classes, the model has 3"):
        data.fit((1,), 3)


def test_npz_with_class_numbers_or_one_hot_rows(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(3, 2, 2)
    np.savez(tmp_path / "numbers.npz", x=x, y=np.array([2, 0, 1]))
    np.savez(tmp_path / "onehot.npz", x=x, y=np.eye(3)[[2, 0, 1]])
    for name in ("numbers.npz", "onehot.npz"):
        data = load_dataset(tmp_path / name)
        features, labels = data.fit((4,), 3)
        assert features.shape == (3, 4)
        assert labels.argmax(axis=1).tolist() == [2, 0, 1]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "the file is empty"),
        ("a,b,label\n", "has a header but no examples"),
        ("1,2,0\n3,4,1\n", "must be a header"),
        ("a,b,label\n1,2,0\n3,1\n", "line 3 has 2 fields, the header has 3"),
        ("a,b,label\n1,x,0\n", "line 2, column 'b': 'x' is not a finite number"),
        ("a,b,label\n1,2,0\n1,2,cat\n", "label 'cat' on line 3 is not a class"),
        ("a,b,label\n1,2,-1\n", "label '-1' on line 2 is not a class"),
        ("label\n1\n", "at least one feature column"),
    ],
)
def test_a_bad_csv_file_gets_one_line_naming_it(tmp_path, text, message):
    path = write(tmp_path / "bad.csv", text)
    with pytest.raises(DataError, match=message) as caught:
        load_dataset(path)
    assert str(caught.value).startswith(str(path))
    assert "\n" not in str(caught.value)


def test_a_missing_file_and_an_unknown_label_column(tmp_path):
    with pytest.raises(DataError, match="cannot read the file: No such file"):
        load_dataset(tmp_path / "missing.csv")
    path = write(tmp_path / "d.csv", "a,b\n1,0\n")
    with pytest.raises(DataError, match="no label column 'c'; the columns are a, b"):
        load_dataset(path, label_column="c")


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((2, 2))}, "no array 'y' in the archive \\(arrays: x\\)"),
        ({"x": np.zeros((2, 2)), "y": np.zeros(3)}, "x has 2 rows but y has 3"),
        ({"x": np.zeros((0, 2)), "y": np.zeros(0)}, "has no examples"),
        ({"x": np.zeros(4), "y": np.zeros(4)}, "one row per example"),
        ({"x": np.zeros((2, 2)), "y": np.array([0.5, 1])}, "label '0.5' on row 0"),
        ({"x": np.zeros((2, 2)), "y": np.ones((2, 3))}, "rows are not one-hot"),
        ({"x": np.full((2, 2), np.nan), "y": np.zeros(2)}, "NaN or infinite"),
    ],
)
def test_a_bad_npz_archive_gets_one_line_naming_it(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset(path)


def test_an_npz_that_is_not_an_archive_or_holds_objects(tmp_path):
    with pytest.raises(DataError, match="not a NumPy .npz archive"):
        load_dataset(write(tmp_path / "text.npz", "hello"))
    np.savez(tmp_path / "objects.npz", x=np.zeros((1, 2)), y=np.array([{}]))
    with pytest.raises(DataError, match="object arrays, which are refused"):
        load_dataset(tmp_path / "objects.npz")


def test_data_that_does_not_fit_the_model_says_how(tmp_path):
    data = load_dataset(write(tmp_path / "d.csv", "a,b,c,label\n1,2,3,0\n1,2,3,5\n"))
    with pytest.raises(DataError, match="3 feature\\(s\\) per example, the model "):
        data.fit((4,), 6)
    with pytest.raises(DataError, match="label 5 on line 3 is not one of the mod"):
        data.fit((3,), 3)


def test_xor_rows_in_memory_fit_like_their_one_hot_labels():
    from common.data import CLIENT1_INPUTS, CLIENT1_LABELS

    data = from_arrays("client1's rows", CLIENT1_INPUTS, CLIENT1_LABELS)
    features, labels = data.fit((2,), 2)
    assert np.array_equal(features, CLIENT1_INPUTS)
    assert np.array_equal(labels, CLIENT1_LABELS)


def test_a_written_csv_reads_back_the_same(tmp_path):
    iris = load_dataset(IRIS)
    part = iris.subset(np.array([0, 75, 149]))
    write_csv(tmp_path / "part.csv", part)
    again = load_dataset(tmp_path / "part.csv")
    assert np.array_equal(again.features, part.features)
    assert again.labels.tolist() == [0, 1, 2]
    assert again.feature_names == iris.feature_names


def test_holdout_is_stratified_and_disjoint():
    labels = np.repeat([0, 1, 2], 50)
    train, holdout = split_holdout(labels, 0.2, seed=0)
    assert np.bincount(labels[holdout]).tolist() == [10, 10, 10]
    assert not set(train) & set(holdout)
    assert len(train) + len(holdout) == 150


@pytest.mark.parametrize("how", ["iid", "label-skew"])
def test_partitions_cover_every_row_once_and_repeat_by_seed(how):
    labels = np.repeat([0, 1, 2], 40)
    shards = partition(labels, 5, how, seed=3)
    assert sorted(np.concatenate(shards).tolist()) == list(range(120))
    assert all(len(s) >= 2 for s in shards)
    again = partition(labels, 5, how, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))


def test_label_skew_gives_clients_unequal_class_mixes():
    labels = np.repeat([0, 1, 2], 40)
    shards = partition(labels, 5, "label-skew", seed=0, alpha=0.5)
    dominant = [np.bincount(labels[s], minlength=3).max() / len(s) for s in shards]
    assert np.mean(dominant) > 0.6


def test_client_py_is_named_after_its_data_file_unless_told():
    from common.config import parse_client_args

    def client_id(*argv: str) -> str:
        return parse_client_args("client.py", "", list(argv), with_data=True).client_id

    assert client_id("--data", "shards/alice.csv") == "alice"
    assert client_id("--data", "alice.csv", "--client-id", "bob") == "bob"
    assert parse_client_args("client1.py", "", []).client_id == "client1"
