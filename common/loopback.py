"""A whole federation on this machine from one data set: simulate.py.

``run`` splits a data set into a held-out part and one shard per client
(``common.datasets``), writes the shards as CSV files, saves a small model
for the data, starts ``server.py --model`` and one ``client.py --data`` per
shard on loopback (``common.launcher``), waits for the end, and measures the
saved model on the held-out rows, which no client and not the server ever
saw. The server stops on the clients' federated evaluation.

Everything a run writes goes to its ``out`` folder: ``data/`` (the shards and
the held-out rows), ``initial.keras`` and the server's outputs.

Run it: ``python simulate.py --clients 5 --data data/iris.csv``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.datasets import Dataset, load_dataset, partition, split_holdout, write_csv
from common.launcher import Process, start_client, start_server, wait_for_federation

log = logging.getLogger("fedga.simulate")

# Server settings that suit small tabular data sets such as Iris: smaller
# GA steps than XOR's (with label skew, large local steps pull the clients'
# weights apart), server momentum to make up for them, a federated target,
# and a round limit that keeps a run within about a minute. Options given to
# simulate.py come after these and win.
SERVER_DEFAULTS = (
    "--rounds", "40",
    "--generations", "50",
    "--solutions", "20",
    "--parents-mating", "6",
    "--mutation-range", "0.2",
    "--init-range", "0.2",
    "--server-momentum", "0.5",
    "--server-learning-rate", "1.0",
    "--target-loss", "0",
    "--target-accuracy", "0.95",
)  # fmt: skip


@dataclass(frozen=True)
class SimulationConfig:
    """Everything simulate.py needs."""

    # The data set to split, CSV or .npz, and how to read its labels.
    data: Path
    label_column: str | None = None
    classes: tuple[str, ...] | None = None
    # Number of client processes, and how the rows are divided among them.
    clients: int = 5
    partition: str = "label-skew"
    # Dirichlet concentration of label-skew: smaller, more skew.
    alpha: float = 0.5
    # Fraction of the rows held out for the final measurement.
    holdout: float = 0.2
    # Seeds the split, the shards, the initial weights and the server.
    seed: int = 0
    # Units of the model's hidden layer; 0: no hidden layer (softmax
    # regression).
    hidden: int = 8
    # Folder for everything the run writes.
    out: Path = Path("runs/simulate")
    # Show the clients' output too, not only the server's.
    verbose: bool = False
    # Extra server.py options, after SERVER_DEFAULTS.
    server_args: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class SimulationResult:
    server_code: int
    client_codes: list[int]
    # Accuracy and loss of the saved model on the held-out rows; None when
    # the server saved no model.
    accuracy: float | None
    loss: float | None
    holdout_rows: int
    seconds: float

    @property
    def exit_code(self) -> int:
        """The server's status, or the first failing client's."""
        return self.server_code or max(self.client_codes, default=0)


def prepare(config: SimulationConfig) -> tuple[list[Path], Dataset, Path]:
    """Write the shards and the held-out rows, and the initial model; return
    the shard files, the held-out rows and the model file."""
    dataset = load_dataset(config.data, config.label_column, config.classes)
    train, holdout = split_holdout(dataset.labels, config.holdout, config.seed)
    shards = partition(
        dataset.labels[train],
        config.clients,
        config.partition,
        config.seed,
        config.alpha,
    )
    num_classes = dataset.num_classes or int(dataset.labels.max()) + 1

    # The shards and the held-out rows, as files a client reads.
    folder = config.out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, rows in enumerate(shards, start=1):
        path = folder / f"client-{number}.csv"
        shard = dataset.subset(train[rows])
        write_csv(path, shard)
        paths.append(path)
        log.info(
            "client-%d: %d rows, per class %s",
            number,
            len(shard),
            np.bincount(shard.labels, minlength=num_classes).tolist(),
        )
    held_out = dataset.subset(holdout)
    write_csv(folder / "holdout.csv", held_out)

    # A small model for the data: features in, one softmax output per class.
    model_path = config.out / "initial.keras"
    build_model(
        dataset.features.shape[1:], num_classes, config.hidden, config.seed
    ).save(model_path)
    return paths, held_out, model_path


def build_model(
    input_shape: tuple[int, ...], num_classes: int, hidden: int, seed: int
):  # -> keras.Model; Keras is imported here, not at module load.
    """Flatten -> [Dense(hidden, tanh)] -> Dense(num_classes, softmax)."""
    from common.quiet_tf import keras

    keras.utils.set_random_seed(seed)
    layers = [keras.Input(shape=input_shape), keras.layers.Flatten()]
    if hidden:
        layers.append(keras.layers.Dense(hidden, activation="tanh"))
    layers.append(keras.layers.Dense(num_classes, activation="softmax"))
    return keras.Sequential(layers, name="simulated")


def run(config: SimulationConfig) -> SimulationResult:
    """Split, federate on loopback, and measure on the held-out rows."""
    started = time.monotonic()
    # The processes run in the project's folder: give them absolute paths.
    config = dataclasses.replace(config, out=config.out.resolve())
    shard_paths, held_out, model_path = prepare(config)

    # The server, then one client per shard; only the server is shown.
    server, port = start_server(
        "--out",
        str(config.out),
        "--model",
        str(model_path),
        "--min-clients",
        str(config.clients),
        "--seed",
        str(config.seed),
        *SERVER_DEFAULTS,
        *config.server_args,
        echo=True,
    )
    clients: list[Process] = [
        start_client(
            "client.py",
            port,
            "--data",
            str(path),
            "--client-id",
            f"client-{number}",
            *([] if config.verbose else ["--quiet"]),
            echo=config.verbose,
        )
        for number, path in enumerate(shard_paths, start=1)
    ]
    server_code, client_codes = wait_for_federation(server, clients, timeout=3600)
    for number, (client, code) in enumerate(
        zip(clients, client_codes, strict=True), start=1
    ):
        if code and not config.verbose:
            log.error("client-%d exited %d:\n%s", number, code, client.output)

    # The saved model on rows no one trained or stopped on.
    accuracy = loss = None
    if (config.out / "model.keras").exists():
        loss, accuracy = measure(config.out / "model.keras", held_out)
    return SimulationResult(
        server_code,
        client_codes,
        accuracy,
        loss,
        len(held_out),
        time.monotonic() - started,
    )


def measure(model_path: Path, held_out: Dataset) -> tuple[float, float]:
    """Loss and accuracy of a saved model on held-out rows."""
    from common.model import evaluate, io_shapes
    from common.quiet_tf import keras

    model = keras.models.load_model(model_path, compile=False)
    inputs, labels = held_out.fit(*io_shapes(model))
    return evaluate(model, inputs, labels)
