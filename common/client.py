"""The federation client: connect, say echo, train each round, until done.

One thread, one connection. The lifecycle is ``connect`` (with retries),
``greet`` (send ``echo``), then for every ``model`` from the server
``train`` and ``reply``, and finally ``done``. The client's own samples
never leave this process; only the best weights vector, the number of
examples and a few metrics do.

The examples are a ``common.datasets.Dataset``: the XOR rows of
``client1.py`` and ``client2.py``, or a user's file (``client.py --data``).
They become one-hot labels of the model's output width when the model
arrives; data that does not fit the model ends the client with one line
(``DataError``) and exit status 2, and the server is told why.

TensorFlow is imported only when the first model arrives, so a client that
cannot reach its server says so at once.

Run it: ``python client.py --data data/iris.csv --port 5000``, or
``client1.py`` and ``client2.py`` (see their ``--help``).
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from common import protocol
from common.config import ClientConfig, GAConfig, configure_logging, parse_client_args
from common.datasets import DataError, Dataset, load_dataset
from common.progress import generation_progress

log = logging.getLogger("fedga.client")

EXIT_DONE = 0
EXIT_FAILED = 1
# The client's data cannot be read, or does not fit the server's model.
EXIT_BAD_DATA = 2


class ClientError(Exception):
    """The client cannot go on; the message is the one line to show."""


class LocalTrainer:
    """The client's model and scorer, rebuilt only when the architecture
    the server sends changes."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        # What the echo announces and the replies count: rows of the file.
        self.inputs = dataset.features
        self.model_json: str | None = None
        self.scorer: Any = None

    def train(self, task: dict[str, Any], on_generation: Any = None) -> Any:
        # Imported here: TensorFlow takes seconds to load.
        from common import model as model_lib
        from common import training

        if task["model_json"] != self.model_json:
            model = model_lib.model_from_json(task["model_json"])
            # DataError here: the file does not fit the model.
            inputs, labels = self.dataset.fit(*model_lib.io_shapes(model))
            self.scorer = training.PopulationScorer(model, inputs, labels)
            self.model_json = task["model_json"]
        shapes = model_lib.weight_shapes(self.scorer.model)
        weights = task["weights"]
        if [tuple(w.shape) for w in weights] != shapes:
            raise protocol.InvalidMessage("weights do not fit the model's shapes")
        settings = self.settings(task)
        return training.train_locally(self.scorer, weights, settings, on_generation)

    @staticmethod
    def settings(task: dict[str, Any]) -> GAConfig:
        settings = GAConfig(**{k: v for k, v in task["ga"].items() if k in _GA_FIELDS})
        if settings.num_parents_mating > settings.num_solutions:
            raise protocol.InvalidMessage("GA asks for more parents than solutions")
        return settings


_GA_FIELDS = set(GAConfig.__dataclass_fields__)


def connect(config: ClientConfig) -> socket.socket:
    """Connect to the server, retrying with a doubling delay."""
    delay = config.retry_delay
    attempts = max(1, config.retries)
    for attempt in range(1, attempts + 1):
        try:
            return socket.create_connection(
                (config.host, config.port), timeout=config.io_timeout
            )
        except OSError as exc:
            if attempt == attempts:
                raise ClientError(
                    f"cannot reach the server at {config.host}:{config.port} "
                    f"after {attempts} attempt(s): {exc.strerror or exc}"
                ) from None
            log.info(
                "server not reachable (%s); retrying in %.1fs",
                exc.strerror or exc,
                delay,
            )
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def main(prog: str, description: str, dataset: Dataset | None = None) -> int:
    """The console entry of every client script: parse the command line,
    read the data (``--data`` unless ``dataset`` is given), take part.

    Exit status: 0 after ``done``, 1 when the server cannot be reached or
    breaks the protocol, 2 when the data cannot be read or does not fit the
    model, 130 on Ctrl-C.
    """
    config = parse_client_args(prog, description, with_data=dataset is None)
    configure_logging(config.quiet)
    try:
        if dataset is None:
            dataset = load_dataset(config.data, config.label_column, config.classes)
        return run_client(config, dataset)
    except DataError as exc:
        log.error("%s", exc)
        return EXIT_BAD_DATA
    except KeyboardInterrupt:
        return 130


def run_client(config: ClientConfig, dataset: Dataset) -> int:
    """Take part in a federation until the server says done; return the
    process exit status. DataError escapes when the data does not fit the
    server's model."""
    trainer = LocalTrainer(dataset)
    try:
        with connect(config) as sock:
            return session(sock, config, trainer)
    except ClientError as exc:
        log.error("%s", exc)
        return EXIT_FAILED


def session(sock: socket.socket, config: ClientConfig, trainer: LocalTrainer) -> int:
    name = config.client_id
    num_examples = len(trainer.inputs)
    try:
        protocol.send_message(
            sock,
            "echo",
            {"client_id": name, "num_examples": num_examples},
            config.io_timeout,
        )
        log.info(
            "%s connected to %s:%s with %d examples",
            name,
            config.host,
            config.port,
            num_examples,
        )
        while True:
            message = protocol.recv_message(
                sock,
                protocol.SERVER_TO_CLIENT,
                max_bytes=config.max_message_bytes,
                io_timeout=config.io_timeout,
                idle_timeout=config.idle_timeout,
            )
            if message.subject == "done":
                log.info(
                    "%s done after round %d: %s (accuracy %.2f)",
                    name,
                    message.data["round"],
                    message.data["reason"],
                    message.data["accuracy"],
                )
                return EXIT_DONE
            reply_to_model(sock, config, trainer, message.data)
    except protocol.PeerError as exc:
        raise ClientError(f"server refused {name}: {exc}") from None
    except protocol.ProtocolError as exc:
        if not isinstance(exc, protocol.ConnectionClosed):
            protocol.send_error(sock, str(exc))
        raise ClientError(f"{name} lost the server: {exc}") from None


def reply_to_model(
    sock: socket.socket, config: ClientConfig, trainer: LocalTrainer, task: dict
) -> None:
    """Train on the received model and send back the best weights."""
    from common.model import ModelRefused

    round_number = task["round"]
    on_generation, end_progress = generation_progress(
        f"{config.client_id} [ROUND {round_number}]",
        LocalTrainer.settings(task).num_generations,
        quiet=config.quiet,
    )
    try:
        result = trainer.train(task, on_generation)
    except ModelRefused as exc:
        protocol.send_error(sock, f"model refused: {exc}")
        raise ClientError(
            f"{config.client_id} refused the server's model: {exc}"
        ) from None
    except DataError as exc:
        protocol.send_error(sock, f"{config.client_id}'s data does not fit: {exc}")
        raise
    finally:
        end_progress()
    protocol.send_message(
        sock,
        "model",
        {
            "round": round_number,
            "best_model_weights_vector": result.best_vector,
            "num_examples": len(trainer.inputs),
            "metrics": result.metrics(),
        },
        config.io_timeout,
    )
    log.info(
        "%s [ROUND %d] local loss %.4f -> %.4f, accuracy %.2f, %.1fs",
        config.client_id,
        round_number,
        result.initial_loss,
        result.loss,
        result.accuracy,
        result.seconds,
    )
