"""Your own data and model, as real processes on loopback: client.py --data,
server.py --model and --eval-data, bad data files, and simulate.py."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.datasets import load_dataset, write_csv
from common.launcher import (
    ROOT,
    Process,
    python_script,
    start_client,
    start_server,
    wait_for_federation,
)

pytestmark = pytest.mark.slow

TIMEOUT = 300
IRIS = ROOT / "data" / "iris.csv"
# The accuracy the README states for simulate.py's defaults.
README_ACCURACY = 0.9


def save_iris_model(path: Path) -> None:
    """A model that is not XOR: 4 features -> Dense(5, relu) -> 3 classes."""
    from common.quiet_tf import keras

    keras.utils.set_random_seed(11)
    model = keras.Sequential(
        [
            keras.Input(shape=(4,)),
            keras.layers.Dense(5, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ],
        name="iris_test",
    )
    model.save(path)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """server.py --model --eval-data with one CSV client and one .npz client."""
    folder = tmp_path_factory.mktemp("own")
    iris = load_dataset(IRIS)
    rows = np.random.default_rng(0).permutation(len(iris))
    csv_rows, npz_rows, eval_rows = rows[:30], rows[30:50], rows[50:80]
    write_csv(folder / "alice.csv", iris.subset(csv_rows))
    np.savez(
        folder / "bob.npz",
        x=iris.features[npz_rows],
        y=np.eye(3)[iris.labels[npz_rows]],
    )
    write_csv(folder / "eval.csv", iris.subset(eval_rows))
    save_iris_model(folder / "initial.keras")

    out = folder / "out"
    server, port = start_server(
        "--out", str(out), "--model", str(folder / "initial.keras"),
        "--eval-data", str(folder / "eval.csv"), "--rounds", "2",
        "--generations", "5", "--solutions", "6", "--parents-mating", "2",
        "--mutation-range", "0.2", "--init-range", "0.2",
    )  # fmt: skip
    clients = [
        start_client(
            "client.py", port, "--data", str(folder / name), "--client-id", name
        )
        for name in ("alice.csv", "bob.npz")
    ]
    server_code, client_codes = wait_for_federation(server, clients, TIMEOUT)
    codes = [server_code, *client_codes]
    return {
        "folder": folder,
        "out": out,
        "codes": codes,
        "server": server.output,
        "clients": [c.output for c in clients],
        "rows": {"alice.csv": csv_rows, "bob.npz": npz_rows, "eval": eval_rows},
    }


def test_csv_and_npz_clients_train_with_a_model_of_your_own(own_run):
    # Exit 3: two rounds do not reach the default target of 1.0.
    assert own_run["codes"] == [3, 0, 0], own_run["server"]
    history = read_csv(own_run["out"] / "history.csv")
    assert [int(r["clients"]) for r in history] == [2, 2]
    assert all(r["accuracy"] and r["federated_accuracy"] for r in history)
    assert "measured on " + str(own_run["folder"] / "eval.csv") in own_run["server"]
    for output in own_run["clients"]:
        assert re.search(r"\[ROUND 2\] local loss", output), output
        assert "generation 5/5" in output


def test_the_first_round_federated_metrics_equal_a_hand_computation(own_run):
    from common.model import evaluate
    from common.quiet_tf import keras

    # Round 1's clients received the initial model: measure it on their rows.
    model = keras.models.load_model(own_run["folder"] / "initial.keras")
    iris = load_dataset(IRIS)
    measured = []
    for name in ("alice.csv", "bob.npz"):
        part = iris.subset(own_run["rows"][name])
        measured.append((len(part), *evaluate(model, *part.fit((4,), 3))))
    total = sum(n for n, _, _ in measured)
    loss = sum(n * loss for n, loss, _ in measured) / total
    accuracy = sum(n * acc for n, _, acc in measured) / total

    first = read_csv(own_run["out"] / "history.csv")[0]
    assert float(first["federated_loss"]) == pytest.approx(loss, rel=1e-5)
    assert float(first["federated_accuracy"]) == pytest.approx(accuracy, abs=1e-9)
    replies = [r for r in read_csv(own_run["out"] / "clients.csv") if r["round"] == "1"]
    assert sorted((r["client_id"], int(r["num_examples"])) for r in replies) == [
        ("alice.csv", 30),
        ("bob.npz", 20),
    ]


def test_the_result_loads_in_plain_keras_and_history_png_is_drawn(own_run):
    script = (
        "import os; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\n"
        "import sys, keras, numpy as np\n"
        "model = keras.models.load_model(sys.argv[1])\n"
        "print(model.name, model.predict(np.ones((2, 4)), verbose=0).shape)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(own_run["out"] / "model.keras")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.strip().splitlines()[-1] == "iris_test (2, 3)"
    png = (own_run["out"] / "history.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "summary:" in own_run["server"]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("empty.csv", "", "the file is empty"),
        ("header.csv", "a,b,c,d,label\n", "has a header but no examples"),
        ("ragged.csv", "a,b,c,d,label\n1,2,3,4,0\n1,2\n", "line 3 has 2 fields"),
        ("missing.csv", None, "cannot read the file"),
        ("garbage.npz", "not a zip", "not a NumPy .npz archive"),
    ],
)
def test_an_unreadable_data_file_gets_one_line_and_exit_2(
    tmp_path, name, text, message
):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    client = Process(python_script("client.py", "--data", str(path), "--port", "9"))
    assert client.wait(60) == 2
    lines = client.output.strip().splitlines()
    assert len(lines) == 1, client.output
    assert str(path) in lines[0] and message in lines[0]


def test_data_that_does_not_fit_the_model_gets_one_line_and_exit_2(tmp_path):
    """Three features, or a label 7, for a model of 4 features and 3 classes."""
    save_iris_model(tmp_path / "initial.keras")
    (tmp_path / "three.csv").write_text("a,b,c,label\n1,2,3,0\n4,5,6,1\n")
    (tmp_path / "label7.csv").write_text("a,b,c,d,label\n1,2,3,4,0\n5,6,7,8,7\n")
    server, port = start_server(
        "--out", str(tmp_path / "out"), "--model", str(tmp_path / "initial.keras"),
        "--min-clients", "1", "--min-fit-clients", "1", "--rounds", "50",
        "--generations", "2",
    )  # fmt: skip
    try:
        for name, message in [
            ("three.csv", "3 feature(s) per example, the model takes 4 feature(s)"),
            ("label7.csv", "label 7 on line 3 is not one of the model's 3 classes"),
        ]:
            path = tmp_path / name
            client = start_client("client.py", port, "--data", str(path))
            assert client.wait(120) == 2, client.output
            errors = [line for line in client.output.splitlines() if str(path) in line]
            assert len(errors) == 1 and message in errors[0], client.output
            assert "Traceback" not in client.output
            server.wait_for_line(re.escape(f"data does not fit: {path}"), 60)
    finally:
        server.stop()


def test_a_model_file_outside_the_allow_list_is_refused_in_one_line(tmp_path):
    from common.quiet_tf import keras

    model = keras.Sequential([keras.Input(shape=(2,)), keras.layers.Lambda(abs)])
    model.save(tmp_path / "lambda.keras")
    result = subprocess.run(
        python_script("server.py", "--model", str(tmp_path / "lambda.keras")),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "lambda.keras: model uses class 'Lambda', not allowed" in result.stderr
    assert "Traceback" not in result.stderr


def test_simulate_five_label_skewed_clients_reach_the_readme_accuracy(tmp_path):
    result = subprocess.run(
        python_script("simulate.py", "--clients", "5", "--partition", "label-skew",
                      "--out", str(tmp_path / "sim")),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(
        r"final accuracy on the 30 held-out rows: ([\d.]+)", result.stdout
    )
    assert match, result.stdout
    assert float(match.group(1)) >= README_ACCURACY
    assert (tmp_path / "sim" / "history.png").exists()
    assert len(list((tmp_path / "sim" / "data").glob("client-*.csv"))) == 5
