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

When the connection to the server is lost (the server crashed, restarts, or
closed without ``done``), ``run_client`` connects again with the same
retries and backoff and takes part in the next round; the model it was
training is dropped. While it trains it looks at the socket after every
generation, so a ``done`` or a closed connection cuts the round short.
After ``--retries`` attempts in a row without hearing from a server it
exits 1 with one line.

Run it: ``python client.py --data data/iris.csv --port 5000``, or
``client1.py`` and ``client2.py`` (see their ``--help``).
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import time
from typing import Any

from common import protocol, security
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


class ServerLost(ClientError):
    """The connection to the server ended without ``done``; connecting
    again may help. ``heard`` says whether the server had sent anything."""

    def __init__(self, message: str, heard: bool):
        super().__init__(message)
        self.heard = heard


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
        return GAConfig(**{k: v for k, v in task["ga"].items() if k in _GA_FIELDS})


_GA_FIELDS = set(GAConfig.__dataclass_fields__)


def connect(config: ClientConfig) -> protocol.Connection:
    """Connect to the server, retrying with a doubling delay, then secure the
    connection as configured."""
    delay = config.retry_delay
    attempts = max(1, config.retries)
    for attempt in range(1, attempts + 1):
        try:
            sock = socket.create_connection(
                (config.host, config.port), timeout=config.io_timeout
            )
            return secure(sock, config)
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


def secure(sock: socket.socket, config: ClientConfig) -> protocol.Connection:
    """Wrap in TLS and run the secret handshake, when configured; a failure
    is a ClientError (retrying would not help)."""
    try:
        if config.tls_ca is not None:
            context = security.client_tls_context(config.tls_ca)
            sock = context.wrap_socket(sock, server_hostname=config.host)
        if config.secret_file is None:
            return sock
        secret = security.load_secret(config.secret_file)
        return security.client_handshake(sock, secret, config.io_timeout)
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        raise ClientError(
            f"the server's TLS certificate does not verify: {exc.verify_message}"
        ) from None
    except (ssl.SSLError, protocol.ProtocolError) as exc:
        sock.close()
        raise ClientError(f"cannot set up a secure connection: {exc}") from None


def run_client(config: ClientConfig, dataset: Dataset) -> int:
    """Take part in a federation until the server says done, reconnecting
    when the server goes away; return the process exit status. DataError
    escapes when the data does not fit the server's model."""
    trainer = LocalTrainer(dataset)
    # Sessions in a row that ended before the server sent anything.
    silent = 0
    while True:
        try:
            with connect(config) as sock:
                return session(sock, config, trainer)
        except ServerLost as exc:
            silent = 0 if exc.heard else silent + 1
            if silent >= max(1, config.retries):
                log.error("%s; gave up after %d attempt(s)", exc, silent)
                return EXIT_FAILED
            log.warning("%s; connecting again", exc)

            # A server that keeps closing at once gets the same backoff as
            # one that cannot be reached.
            if silent:
                time.sleep(config.retry_delay * 2 ** (silent - 1))
        except ClientError as exc:
            log.error("%s", exc)
            return EXIT_FAILED


def session(sock: socket.socket, config: ClientConfig, trainer: LocalTrainer) -> int:
    name = config.client_id
    num_examples = len(trainer.inputs)
    heard = False
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
            heard = True
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
    except (protocol.ConnectionClosed, protocol.MessageTimeout) as exc:
        raise ServerLost(f"{name} lost the server: {exc}", heard) from None
    except protocol.ProtocolError as exc:
        protocol.send_error(sock, str(exc))
        raise ClientError(f"{name} lost the server: {exc}") from None


def reply_to_model(
    sock: socket.socket, config: ClientConfig, trainer: LocalTrainer, task: dict
) -> None:
    """Train on the received model and send back the best weights, unless
    the server spoke or left meanwhile: then the round is dropped unsent and
    the caller reads what the server said."""
    from common.model import ModelRefused

    round_number = task["round"]
    progress, end_progress = generation_progress(
        f"{config.client_id} [ROUND {round_number}]",
        LocalTrainer.settings(task).num_generations,
        quiet=config.quiet,
    )
    interrupted = False

    def on_generation(generation: int, best_fitness: float) -> str | None:
        nonlocal interrupted
        if progress is not None:
            progress(generation, best_fitness)
        interrupted = _readable(sock)
        return "stop" if interrupted else None

    log.info(
        "%s [ROUND %d] training for up to %d generation(s)",
        config.client_id,
        round_number,
        task["ga"]["num_generations"],
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
    except protocol.InvalidMessage:
        raise
    except Exception as exc:  # PyGAD and Keras raise many types for bad input
        protocol.send_error(sock, f"cannot train the model: {exc}")
        raise ClientError(
            f"{config.client_id} cannot train the server's model: {exc}"
        ) from None
    finally:
        end_progress()
    if interrupted:
        log.info(
            "%s [ROUND %d] the server spoke during training; reply dropped",
            config.client_id,
            round_number,
        )
        return
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


def _readable(conn: protocol.Connection) -> bool:
    """True when the server has sent something or closed the connection."""
    sock = protocol.raw_socket(conn)
    if getattr(sock, "pending", lambda: 0)():
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
