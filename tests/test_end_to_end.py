"""The real scripts as processes on loopback: server.py, client1.py, client2.py."""

from __future__ import annotations

import csv
import dataclasses
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import protocol
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


@dataclasses.dataclass
class Run:
    server_code: int
    client_codes: list[int]
    out: Path
    server_output: str
    client_outputs: list[str]

    def history(self) -> list[dict[str, str]]:
        with open(self.out / "history.csv", newline="") as handle:
            return list(csv.DictReader(handle))


def run_federation(out: Path, *server_args: str) -> Run:
    server, port = start_server("--out", str(out), *server_args)
    clients = [start_client(name, port) for name in ("client1.py", "client2.py")]
    server_code, client_codes = wait_for_federation(server, clients, TIMEOUT)
    return Run(
        server_code, client_codes, out, server.output, [c.output for c in clients]
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Run:
    """One full run with the default settings."""
    return run_federation(tmp_path_factory.mktemp("trained"), "--seed", "0")


def test_training_reaches_the_target_and_everyone_exits_zero(trained):
    assert trained.server_code == 0, trained.server_output
    assert trained.client_codes == [0, 0], trained.client_outputs
    assert "target accuracy reached" in trained.server_output
    for output in trained.client_outputs:
        assert "done after round" in output


def test_the_saved_model_loads_in_plain_keras_and_solves_xor(trained):
    script = (
        "import os; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\n"
        "import sys, keras, numpy as np\n"
        "model = keras.models.load_model(sys.argv[1])\n"
        "x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype='float32')\n"
        "print(np.argmax(model.predict(x, verbose=0), axis=1).tolist())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(trained.out / "model.keras")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.strip().splitlines()[-1] == "[0, 1, 1, 0]"


def test_history_has_one_row_per_round_and_one_line_each_on_the_console(trained):
    rows = trained.history()
    assert list(rows[0])[:6] == [
        "round",
        "accuracy",
        "loss",
        "clients",
        "failures",
        "seconds",
    ]
    assert [int(r["round"]) for r in rows] == list(range(1, len(rows) + 1))
    assert float(rows[-1]["accuracy"]) == 1.0
    assert all(int(r["clients"]) == 2 for r in rows)
    round_lines = [
        line for line in trained.server_output.splitlines() if "] accuracy" in line
    ]
    assert len(round_lines) == len(rows)


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory) -> list[Run]:
    """Two runs with the same seed that stop on the round limit."""
    args = ("--seed", "5", "--rounds", "2", "--generations", "2")
    return [
        run_federation(tmp_path_factory.mktemp(f"short{i}"), *args) for i in range(2)
    ]


def test_running_out_of_rounds_exits_3_and_clients_still_get_done(short_runs):
    for run in short_runs:
        assert run.server_code == 3, run.server_output
        assert run.client_codes == [0, 0]
        assert "rounds used up" in run.server_output


def test_the_same_seed_writes_the_same_history(short_runs):
    first, second = (
        [(r["accuracy"], r["loss"]) for r in run.history()] for run in short_runs
    )
    assert len(first) == 2
    assert first == second


def test_the_in_process_simulation_matches_the_networked_run(short_runs):
    from common.config import GAConfig, ServerConfig
    from common.simulation import simulate

    config = ServerConfig(
        seed=5,
        rounds=2,
        target_accuracy=1.01,
        ga=dataclasses.replace(GAConfig(), num_generations=2),
    )
    result = simulate(config)
    last = short_runs[0].history()[-1]
    assert result.rounds == 2
    assert result.loss == pytest.approx(float(last["loss"]), rel=1e-9)


def test_a_client_without_a_server_says_so_in_one_line():
    with socket.create_server(("127.0.0.1", 0)) as spare:
        port = spare.getsockname()[1]
    # The port is closed again: nothing listens there.
    client = Process(
        python_script(
            "client1.py", "--port", str(port), "--retries", "2", "--retry-delay", "0.1"
        )
    )
    assert client.wait(60) == 1
    assert "cannot reach the server" in client.output
    assert "Traceback" not in client.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--solutions", "2"], "cannot exceed --solutions"),
        (["--port", "70000"], "must be 0..65535"),
        (["--rounds", "0"], "positive integer"),
        (["--target-accuracy", "2"], "between 0 and 1"),
    ],
)
def test_bad_server_arguments_exit_2_with_a_message(args, message):
    result = subprocess.run(
        python_script("server.py", *args),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_help_shows_every_default():
    result = subprocess.run(
        python_script("server.py", "--help"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for option in (
        "--host",
        "--port",
        "--min-clients",
        "--rounds",
        "--target-accuracy",
        "--generations",
        "--solutions",
        "--parents-mating",
        "--seed",
        "--out",
    ):
        assert option in result.stdout
    assert result.stdout.count("(default:") >= 10


def test_a_client_refuses_a_model_with_a_lambda_layer():
    """A fake server on loopback sends client1.py a model carrying code."""
    from common.quiet_tf import keras

    model = keras.Sequential(
        [keras.Input(shape=(2,)), keras.layers.Lambda(lambda x: x)]
    )
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]
        client = Process(python_script("client1.py", "--port", str(port)))
        try:
            conn, _ = listener.accept()
            with conn:
                echo = protocol.recv_message(
                    conn, protocol.CLIENT_TO_SERVER, max_bytes=1 << 20, io_timeout=60
                )
                assert echo.data == {"client_id": "client1", "num_examples": 2}
                task = {
                    "round": 1,
                    "model_json": model.to_json(),
                    "weights": [np.zeros(1, dtype=np.float32)],
                    "ga": {
                        "num_generations": 1,
                        "num_solutions": 2,
                        "num_parents_mating": 1,
                        "seed": 0,
                    },
                }
                protocol.send_message(conn, "model", task, timeout=10)
                with pytest.raises(protocol.PeerError, match="model refused.*Lambda"):
                    protocol.recv_message(
                        conn,
                        protocol.CLIENT_TO_SERVER,
                        max_bytes=1 << 20,
                        io_timeout=60,
                        idle_timeout=TIMEOUT,
                    )
            assert client.wait(60) == 1
        finally:
            client.stop()
    assert "refused the server's model" in client.output
    assert "Traceback" not in client.output
