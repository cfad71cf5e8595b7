"""The federation server: rounds of send model, collect weights, average.

Threads and what they share:

- The main thread runs ``Federation.run``: it waits for clients, starts each
  round, collects the results, aggregates, evaluates, writes the outputs and
  finally says ``done``. Only this thread touches the global model.
- ``socketserver`` gives each connection a thread running
  ``ConnectionHandler``: greet the client (``echo``), register its
  ``ClientSession``, then carry out the tasks the main thread puts on the
  session's queue (send ``model`` and wait for the reply, or send ``done``).
  A handler never decides anything about rounds; it reports a ``Reply`` or a
  ``Failure`` on the round's result queue and goes back to waiting.
- ``Federation.sessions`` (client_id -> session) is shared by both; the
  ``Federation.changed`` condition and its lock guard it.

The model is the built-in XOR model or a user's ``--model`` file. After each
round the main thread measures the global model (``common.evaluation``): on
the server's own eval data when it has some (``--eval-data``; the truth table
for XOR), and from the clients' reports on their own data in any case. It
writes ``history.csv`` (one row per round) and ``clients.csv`` (one row per
reply) as it goes, and at the end saves the best measured model, logs a
summary table and draws ``history.png``.

Run it: ``python server.py --port 0`` (see ``python server.py --help``).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import queue
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from common import protocol
from common.aggregation import AGGREGATORS, ServerOptimizer
from common.config import ServerConfig, as_dict, derive_seed
from common.data import XOR_INPUTS, XOR_LABELS
from common.datasets import DataError, load_dataset
from common.evaluation import (
    RECEIVED_ACCURACY,
    RECEIVED_LOSS,
    Measurement,
    Monitor,
    federated_mean,
)
from common.model import (
    ModelRefused,
    build_xor_model,
    evaluate,
    io_shapes,
    load_model_file,
    output_activation,
    vector_to_weights,
    weight_shapes,
    weights_to_vector,
)
from common.report import round_line, summary_table

log = logging.getLogger("fedga.server")

EXIT_TARGET_REACHED = 0
EXIT_ROUNDS_EXHAUSTED = 3
# The model file or the eval data cannot be used.
EXIT_BAD_INPUT = 2
HISTORY_FIELDS = [
    "round",
    "accuracy",
    "loss",
    "clients",
    "failures",
    "seconds",
    "federated_accuracy",
    "federated_loss",
]
CLIENT_FIELDS = [
    "round",
    "client_id",
    "num_examples",
    "received_accuracy",
    "received_loss",
    "accuracy",
    "loss",
    "fitness",
    "seconds",
]


# What travels between the main thread and the connection threads ------------


@dataclass(frozen=True)
class RoundTask:
    """Send ``payload`` (an encoded ``model`` message), then wait until
    ``deadline`` for the reply and report it on ``results``."""

    round_number: int
    payload: bytes
    deadline: float
    results: queue.Queue


@dataclass(frozen=True)
class DoneTask:
    payload: bytes


@dataclass(frozen=True)
class Reply:
    client_id: str
    vector: np.ndarray
    num_examples: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class Failure:
    client_id: str
    reason: str


@dataclass(eq=False)
class ClientSession:
    """One connected client, as the main thread sees it."""

    client_id: str
    peer: str
    num_examples: int
    tasks: queue.Queue = field(default_factory=queue.Queue)


@dataclass
class RoundRecord:
    round: int
    # The server's evaluation of the global model after the round; None
    # without eval data.
    accuracy: float | None
    loss: float | None
    clients: int
    failures: int
    seconds: float
    # The clients' evaluation of the global model they received at the start
    # of the round, weighted by examples; None when no reply reported it.
    federated_accuracy: float | None = None
    federated_loss: float | None = None


@dataclass
class ClientRecord:
    """One client's reply in one round, as it reported it."""

    round: int
    client_id: str
    num_examples: int
    # Accuracy and loss of the received global model on the client's data.
    received_accuracy: float | None
    received_loss: float | None
    # Accuracy, loss and fitness of the client's best solution.
    accuracy: float | None
    loss: float | None
    fitness: float | None
    seconds: float | None


@dataclass(frozen=True)
class EvalSet:
    """Examples the server evaluates the global model on."""

    name: str
    inputs: np.ndarray
    labels: np.ndarray


# The connection side ---------------------------------------------------------


class ConnectionHandler(socketserver.BaseRequestHandler):
    """Greets one client, then carries out its session's tasks until done."""

    server: FederationTCPServer

    def handle(self) -> None:
        federation = self.server.federation
        config = federation.config
        sock: socket.socket = self.request
        peer = "{}:{}".format(*self.client_address[:2])
        session = None
        try:
            session = self.greet(sock, peer)
            while True:
                task = session.tasks.get()
                if task is None:
                    return
                if isinstance(task, DoneTask):
                    protocol.send_payload(sock, task.payload, config.io_timeout)
                    return
                task.results.put(self.run_task(sock, session, task))
        except protocol.ProtocolError as exc:
            log.warning("dropped %s (%s): %s", peer, _client_name(session), exc)
            if not isinstance(exc, (protocol.ConnectionClosed, protocol.PeerError)):
                protocol.send_error(sock, str(exc))
        finally:
            if session is not None:
                federation.unregister(session)

    def greet(self, sock: socket.socket, peer: str) -> ClientSession:
        config = self.server.federation.config
        hello = protocol.recv_message(
            sock,
            {"echo": protocol.check_echo, "error": protocol.check_error},
            max_bytes=config.max_message_bytes,
            io_timeout=config.io_timeout,
        )
        session = ClientSession(
            client_id=hello.data["client_id"],
            peer=peer,
            num_examples=hello.data["num_examples"],
        )
        self.server.federation.register(session)
        return session

    def run_task(
        self, sock: socket.socket, session: ClientSession, task: RoundTask
    ) -> Reply | Failure:
        """Send the round's model and read the reply; a failure to do so is
        reported as a Failure and ends the connection."""
        config = self.server.federation.config
        try:
            protocol.send_payload(sock, task.payload, config.io_timeout)
            answer = protocol.recv_message(
                sock,
                protocol.CLIENT_TO_SERVER,
                max_bytes=config.max_message_bytes,
                io_timeout=config.io_timeout,
                idle_timeout=max(0.0, task.deadline - time.monotonic()),
            )
            if answer.subject != "model":
                raise protocol.InvalidMessage(
                    f"expected 'model', got {answer.subject!r}"
                )
            if answer.data["round"] != task.round_number:
                raise protocol.InvalidMessage(
                    f"reply is for round {answer.data['round']}, "
                    f"expected {task.round_number}"
                )
            vector = self.server.federation.check_vector(
                answer.data["best_model_weights_vector"]
            )
        except protocol.ProtocolError as exc:
            task.results.put(Failure(session.client_id, str(exc)))
            raise
        return Reply(
            client_id=session.client_id,
            vector=vector,
            num_examples=answer.data["num_examples"],
            metrics=answer.data["metrics"],
        )


class FederationTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver keeps every handler thread to join them at close; a long
    # run with many reconnects would hold them all, so it does not.
    block_on_close = False

    def __init__(self, federation: Federation):
        self.federation = federation
        super().__init__(
            (federation.config.host, federation.config.port), ConnectionHandler
        )

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("unexpected error with %s:%s", *client_address[:2])


# The round side --------------------------------------------------------------


class Federation:
    """Owns the global model and runs the rounds."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.out = config.out or default_out_dir()
        self.model = build_model(config)
        self.eval_set = load_eval_set(config, self.model)
        self.monitor = Monitor(config.target_accuracy, config.patience)
        self.client_history: list[ClientRecord] = []
        self.shapes = weight_shapes(self.model)
        self.global_vector = weights_to_vector(self.model.get_weights())
        self.model_json = self.model.to_json()
        self.aggregate = AGGREGATORS[config.aggregation]
        self.optimizer = ServerOptimizer(
            config.server_learning_rate, config.server_momentum
        )
        self.history: list[RoundRecord] = []
        self.accuracy = 0.0
        self.round = 0

        self.changed = threading.Condition()
        self.sessions: dict[str, ClientSession] = {}
        self.tcp_server: FederationTCPServer | None = None

    # Client registry, shared with the connection threads.

    def register(self, session: ClientSession) -> None:
        with self.changed:
            old = self.sessions.get(session.client_id)
            if old is not None:
                # A client that reconnects replaces its old connection.
                old.tasks.put(None)
                log.info("%s reconnected from %s", session.client_id, session.peer)
            else:
                log.info("%s joined from %s", session.client_id, session.peer)
            self.sessions[session.client_id] = session
            self.changed.notify_all()

    def unregister(self, session: ClientSession) -> None:
        with self.changed:
            if self.sessions.get(session.client_id) is session:
                del self.sessions[session.client_id]
                self.changed.notify_all()

    def check_vector(self, vector: np.ndarray) -> np.ndarray:
        """The reply's weights as float64, or InvalidMessage when their length
        is not the model's."""
        expected = self.global_vector.size
        if vector.shape != (expected,):
            raise protocol.InvalidMessage(
                f"weights vector has shape {vector.shape}, expected ({expected},)"
            )
        return vector.astype(np.float64)

    # The lifecycle: listen, rounds, finish.

    def listen(self) -> tuple[str, int]:
        self.tcp_server = FederationTCPServer(self)
        host, port = self.tcp_server.server_address[:2]
        thread = threading.Thread(
            target=self.tcp_server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="accept",
            daemon=True,
        )
        thread.start()
        log.info("listening on %s:%s", host, port)
        return host, port

    def run(self) -> int:
        """Run every round; return the exit status."""
        self.out.mkdir(parents=True, exist_ok=True)
        log.info("settings: %s", as_dict(self.config))
        log.info(
            "model %s with %d weights; accuracy measured on %s",
            self.model.name,
            self.global_vector.size,
            self.eval_set.name if self.eval_set else "the clients' data (federated)",
        )
        log.info("results go to %s", self.out)
        if self.tcp_server is None:
            self.listen()
        try:
            for round_number in range(self.round + 1, self.config.rounds + 1):
                self.round = round_number
                self.run_round(round_number, self.wait_for_clients())
                if self.monitor.reached:
                    self.finish("target accuracy reached")
                    return EXIT_TARGET_REACHED
                if self.monitor.stalled:
                    self.finish(f"no improvement in {self.config.patience} rounds")
                    return EXIT_ROUNDS_EXHAUSTED
            self.finish("rounds used up")
            return EXIT_ROUNDS_EXHAUSTED
        finally:
            self.close()

    def wait_for_clients(self) -> list[ClientSession]:
        """Block until ``min_clients`` are connected; return them by id."""
        with self.changed:
            announced = None
            while len(self.sessions) < self.config.min_clients:
                missing = self.config.min_clients - len(self.sessions)
                if missing != announced:
                    log.info("waiting for %d more client(s)", missing)
                    announced = missing
                # A bounded wait keeps Ctrl-C responsive.
                self.changed.wait(timeout=1.0)
            return [self.sessions[k] for k in sorted(self.sessions)]

    def run_round(self, round_number: int, sessions: list[ClientSession]) -> None:
        started = time.monotonic()
        received = self.global_vector
        replies, failures = self.collect(round_number, sessions)
        for failure in failures:
            log.warning(
                "[ROUND %d] %s failed: %s",
                round_number,
                failure.client_id,
                failure.reason,
            )

        # Aggregate in client_id order, so the result does not depend on
        # who answered first.
        if replies:
            replies.sort(key=lambda r: r.client_id)
            aggregate = self.aggregate(
                [r.vector for r in replies], [r.num_examples for r in replies]
            )
            self.global_vector = self.optimizer.step(self.global_vector, aggregate)
        else:
            log.warning("[ROUND %d] no replies; global model unchanged", round_number)

        self.record_round(round_number, received, replies, failures, started)
        log.info(
            "[ROUND %d] %s", round_number, round_line(self.history[-1], len(sessions))
        )

    def record_round(
        self,
        round_number: int,
        received: np.ndarray,
        replies: list[Reply],
        failures: list[Failure],
        started: float,
    ) -> None:
        """Measure the global model, feed the stopping rule, and write the
        round to the history files."""
        # The server's evaluation, of the new global model.
        loss = accuracy = None
        if self.eval_set is not None:
            self.model.set_weights(vector_to_weights(self.global_vector, self.shapes))
            loss, accuracy = evaluate(
                self.model, self.eval_set.inputs, self.eval_set.labels
            )

        # The clients' evaluation, of the global model they received.
        federated = federated_mean(
            [r.num_examples for r in replies], [r.metrics for r in replies]
        )
        federated_loss, federated_accuracy = federated or (None, None)

        # The stopping rule watches the server's evaluation when there is one.
        if accuracy is not None:
            measured = Measurement(round_number, accuracy, loss, self.global_vector)
        elif federated is not None:
            measured = Measurement(
                round_number, federated_accuracy, federated_loss, received
            )
        else:
            measured = None
        self.monitor.update(measured)
        if measured is not None:
            self.accuracy = measured.accuracy

        self.history.append(
            RoundRecord(
                round=round_number,
                accuracy=accuracy,
                loss=loss,
                clients=len(replies),
                failures=len(failures),
                seconds=round(time.monotonic() - started, 3),
                federated_accuracy=federated_accuracy,
                federated_loss=federated_loss,
            )
        )
        self.client_history.extend(
            ClientRecord(
                round=round_number,
                client_id=r.client_id,
                num_examples=r.num_examples,
                received_accuracy=r.metrics.get(RECEIVED_ACCURACY),
                received_loss=r.metrics.get(RECEIVED_LOSS),
                accuracy=r.metrics.get("accuracy"),
                loss=r.metrics.get("loss"),
                fitness=r.metrics.get("fitness"),
                seconds=r.metrics.get("seconds"),
            )
            for r in replies
        )
        self.write_history()

    def collect(
        self, round_number: int, sessions: list[ClientSession]
    ) -> tuple[list[Reply], list[Failure]]:
        """Send this round's model to every session and gather what comes
        back before the round's deadline."""
        results: queue.Queue = queue.Queue()
        deadline = time.monotonic() + self.config.round_timeout
        weights = vector_to_weights(self.global_vector, self.shapes)
        for session in sessions:
            ga = dataclasses.replace(
                self.config.ga,
                seed=derive_seed(self.config.seed, session.client_id, round_number),
            )
            payload = protocol.encode(
                "model",
                {
                    "round": round_number,
                    "model_json": self.model_json,
                    "weights": weights,
                    "ga": dataclasses.asdict(ga),
                },
            )
            session.tasks.put(RoundTask(round_number, payload, deadline, results))

        replies: dict[str, Reply] = {}
        failures: dict[str, Failure] = {}
        pending = {s.client_id for s in sessions}
        while pending:
            try:
                item = results.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item.client_id in pending:
                pending.discard(item.client_id)
                target = replies if isinstance(item, Reply) else failures
                target[item.client_id] = item
        for client_id in sorted(pending):
            failures[client_id] = Failure(
                client_id, "no reply before the round deadline"
            )
        return list(replies.values()), list(failures.values())

    def finish(self, reason: str) -> None:
        """Save the best measured model, tell every client the run is over,
        show the summary and the plot, and say where the results are."""
        final = self.monitor.final()
        if final is not None:
            self.global_vector, self.accuracy = final.vector, final.accuracy
        self.model.set_weights(vector_to_weights(self.global_vector, self.shapes))
        model_path = self.out / "model.keras"
        self.model.save(model_path)
        payload = protocol.encode(
            "done", {"round": self.round, "accuracy": self.accuracy, "reason": reason}
        )
        with self.changed:
            sessions = list(self.sessions.values())
        for session in sessions:
            session.tasks.put(DoneTask(payload))
        self.wait_for_goodbyes(sessions)
        if self.history:
            log.info("summary:\n%s", summary_table(self.history, final))
        plot = self.draw_history(reason)
        log.info(
            "done after %d round(s): %s, accuracy %.3f (model of round %s); "
            "model in %s, history in %s%s",
            self.round,
            reason,
            self.accuracy,
            final.round if final is not None else self.round,
            model_path,
            self.out / "history.csv",
            f", plot in {plot}" if plot else "",
        )

    def wait_for_goodbyes(self, sessions: list[ClientSession]) -> None:
        """Give the connection threads up to io_timeout to send ``done``."""
        deadline = time.monotonic() + self.config.io_timeout
        with self.changed:
            while any(self.sessions.get(s.client_id) is s for s in sessions):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.changed.wait(timeout=remaining)

    def close(self) -> None:
        if self.tcp_server is not None:
            self.tcp_server.shutdown()
            self.tcp_server.server_close()
            self.tcp_server = None

    # Outputs.

    def write_history(self) -> None:
        """Rewrite history.csv and clients.csv with every round so far,
        atomically."""
        for name, fields, records in (
            ("history.csv", HISTORY_FIELDS, self.history),
            ("clients.csv", CLIENT_FIELDS, self.client_history),
        ):
            path = self.out / name
            temporary = path.with_suffix(".csv.tmp")
            with open(temporary, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=fields)
                writer.writeheader()
                for record in records:
                    writer.writerow(dataclasses.asdict(record))
            os.replace(temporary, path)

    def draw_history(self, reason: str) -> Path | None:
        """Draw history.png next to history.csv; a drawing that fails is a
        warning, never the end of a finished run."""
        from common.plotting import plot_history

        path = self.out / "history.png"
        try:
            plot_history(
                path,
                [dataclasses.asdict(r) for r in self.history],
                [dataclasses.asdict(r) for r in self.client_history],
                target_accuracy=self.config.target_accuracy,
                eval_name=self.eval_set.name if self.eval_set else None,
                title=f"{self.model.name}: {reason} after {self.round} round(s)",
            )
        except Exception as exc:  # matplotlib missing, a full disk, ...
            log.warning("could not draw %s: %s", path, exc)
            return None
        return path


def _client_name(session: ClientSession | None) -> str:
    return session.client_id if session is not None else "before echo"


def default_out_dir() -> Path:
    """A new folder under runs/ named by the current time."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / stamp
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path("runs") / f"{stamp}-{suffix}"
    return path


def build_model(config: ServerConfig) -> Any:
    """The model to federate: the user's ``--model`` file, or the built-in
    XOR model drawn from the seed."""
    if config.model is None:
        return build_xor_model(config.seed)
    model = load_model_file(config.model)
    activation = output_activation(model)
    if activation not in ("softmax", "sigmoid"):
        log.warning(
            "%s ends with activation %s, not softmax: the clients score its "
            "outputs as class probabilities",
            config.model,
            activation,
        )
    return model


def load_eval_set(config: ServerConfig, model: Any) -> EvalSet | None:
    """The server's eval data fitted to the model: ``--eval-data``, the truth
    table for the XOR model, or None (federated evaluation only)."""
    if config.eval_data is not None:
        dataset = load_dataset(config.eval_data, config.label_column, config.classes)
        inputs, labels = dataset.fit(*io_shapes(model))
        return EvalSet(str(config.eval_data), inputs, labels)
    if config.model is None:
        return EvalSet("the XOR truth table", XOR_INPUTS, XOR_LABELS)
    return None


def serve(config: ServerConfig) -> int:
    """Run a federation with ``config``; return the process exit status."""
    try:
        federation = Federation(config)
    except (ModelRefused, DataError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    return federation.run()
