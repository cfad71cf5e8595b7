"""The federation server: rounds of send model, collect weights, average.

Threads and what they share:

- The main thread runs ``Federation.run``: it waits for clients, starts each
  round, collects the results, aggregates, evaluates, writes the outputs and
  finally says ``done``. Only this thread touches the global model.
- ``socketserver`` gives each connection a thread running
  ``ConnectionHandler`` (``common.connections``): greet the client
  (``echo``), register its ``ClientSession``, then carry out the tasks the
  main thread puts on the session's queue (send ``model`` and wait for the
  reply, or send ``done``). A handler never decides anything about rounds;
  it reports a ``Reply`` or a ``Failure`` on the round's result queue and
  goes back to waiting.
- ``Federation.sessions`` (client_id -> session) is shared by both; the
  ``Federation.changed`` condition and its lock guard it.
- ``Federation.stopping`` is an event that the SIGTERM and SIGINT handlers set
  (they run in the main thread and take no lock); every wait of the main
  thread polls it, so a stop is noticed within ``POLL_SECONDS``.

Robustness, in the order a round meets it:

- A round starts once ``max(min_clients, min_fit_clients)`` clients are
  connected; a client that joins later takes part from the next round.
- A client that disconnects or misses the round's deadline is a ``Failure``
  (who and why). The round counts when at least ``min_fit_clients`` replied;
  otherwise the global model stays as it was and the same round number is
  tried again once enough clients are connected.
- After every counted round the state goes to ``checkpoint.npz`` in
  ``--out`` (``common.checkpoint``, atomic); ``--resume`` continues from it.
- A stop signal abandons the running round, writes the checkpoint, sends
  ``done`` with the reason to every connected client and exits (130 for
  SIGINT, 143 for SIGTERM).
- A connection thread notices a client that leaves between rounds within
  ``POLL_SECONDS`` and ends, so threads and sockets do not pile up.

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
import io
import ipaddress
import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from common import checkpoint, protocol
from common.aggregation import AGGREGATORS, ServerOptimizer
from common.config import ServerConfig, as_dict, derive_seed
from common.connections import (
    GOODBYE_SECONDS,
    POLL_SECONDS,
    ClientSession,
    DoneTask,
    Failure,
    FederationTCPServer,
    Reply,
    RoundTask,
)
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
EXIT_BAD_SETTINGS = 2
EXIT_ROUNDS_EXHAUSTED = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
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


# The round side --------------------------------------------------------------


class Stopped(Exception):
    """A stop signal arrived; the run ends with ``reason`` and ``exit_code``."""

    def __init__(self, reason: str, exit_code: int):
        super().__init__(reason)
        self.reason = reason
        self.exit_code = exit_code


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
        # Last counted round; the next one to run is round + 1.
        self.round = 0
        # Failures in attempts of the next round that did not count.
        self.earlier_failures = 0

        self.changed = threading.Condition()
        self.sessions: dict[str, ClientSession] = {}
        self.tcp_server: FederationTCPServer | None = None
        # Set from a signal handler; read by every wait of the main thread.
        self.stopping = threading.Event()
        self.stop_reason = ""
        self.stop_code = EXIT_INTERRUPTED

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

    def drop(self, session: ClientSession) -> None:
        """Forget a session and tell its thread to close the connection once
        it is done with its current task."""
        self.unregister(session)
        session.tasks.put(None)

    def is_connected(self, session: ClientSession) -> bool:
        with self.changed:
            return self.sessions.get(session.client_id) is session

    def check_vector(self, vector: np.ndarray) -> np.ndarray:
        """The reply's weights as float64, or InvalidMessage when their length
        is not the model's."""
        expected = self.global_vector.size
        if vector.shape != (expected,):
            raise protocol.InvalidMessage(
                f"weights vector has shape {vector.shape}, expected ({expected},)"
            )
        return vector.astype(np.float64)

    # Stop requests, from signal handlers in the main thread.

    def request_stop(self, reason: str, exit_code: int) -> None:
        """Ask the run to end at its next wait; takes no lock, so a signal
        handler may call it."""
        if not self.stopping.is_set():
            self.stop_reason, self.stop_code = reason, exit_code
            self.stopping.set()

    def check_stop(self) -> None:
        if self.stopping.is_set():
            raise Stopped(self.stop_reason, self.stop_code)

    # The lifecycle: restore, listen, rounds, finish.

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
        exposed = not ipaddress.ip_address(host).is_loopback
        if exposed and self.tcp_server.secret is None and self.tcp_server.tls is None:
            log.warning(
                "listening beyond loopback with neither --secret-file nor TLS: "
                "anyone who can reach %s:%s can join and send updates",
                host,
                port,
            )
        return host, port

    def run(self) -> int:
        """Run every round; return the exit status."""
        self.out.mkdir(parents=True, exist_ok=True)
        log.info("settings: %s", as_dict(self.config))
        self.restore()
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
            try:
                code, reason = self.train()
            except Stopped as stop:
                log.warning("stopping: %s", stop.reason)
                self.save_checkpoint()
                code, reason = stop.exit_code, stop.reason
            self.finish(reason)
            return code
        finally:
            self.close()

    def train(self) -> tuple[int, str]:
        """Run rounds until the target or the round limit; return the exit
        status and the reason. Raises Stopped on a stop request."""
        while True:
            if self.monitor.reached:
                return EXIT_TARGET_REACHED, "target accuracy reached"
            if self.monitor.stalled:
                reason = f"no improvement in {self.config.patience} rounds"
                return EXIT_ROUNDS_EXHAUSTED, reason
            if self.round >= self.config.rounds:
                return EXIT_ROUNDS_EXHAUSTED, "rounds used up"
            self.run_round(self.round + 1, self.wait_for_clients())

    def wait_for_clients(self) -> list[ClientSession]:
        """Block until enough clients for a round that can count are
        connected; return them by id. Raises Stopped on a stop request."""
        needed = max(self.config.min_clients, self.config.min_fit_clients)
        with self.changed:
            announced = None
            while len(self.sessions) < needed:
                missing = needed - len(self.sessions)
                if missing != announced:
                    log.info("waiting for %d more client(s)", missing)
                    announced = missing
                self.check_stop()
                self.changed.wait(timeout=POLL_SECONDS)
            self.check_stop()
            return [self.sessions[k] for k in sorted(self.sessions)]

    def run_round(self, round_number: int, sessions: list[ClientSession]) -> bool:
        """One attempt at a round; True when it counted."""
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

        # Without enough replies the round does not count: try it again.
        if len(replies) < self.config.min_fit_clients:
            self.earlier_failures += len(failures)
            log.warning(
                "[ROUND %d] %d of %d client(s) replied, %d needed: not counted, "
                "global model unchanged; the round runs again when enough "
                "clients are connected",
                round_number,
                len(replies),
                len(sessions),
                self.config.min_fit_clients,
            )
            return False

        # Aggregate in client_id order, so the result does not depend on
        # who answered first.
        replies.sort(key=lambda r: r.client_id)
        aggregate = self.aggregate(
            [r.vector for r in replies], [r.num_examples for r in replies]
        )
        self.global_vector = self.optimizer.step(self.global_vector, aggregate)

        self.record_round(
            round_number,
            received,
            replies,
            self.earlier_failures + len(failures),
            started,
        )
        self.earlier_failures = 0

        # The checkpoint that --resume trusts comes after the history.
        self.round = round_number
        self.save_checkpoint()
        log.info(
            "[ROUND %d] %s", round_number, round_line(self.history[-1], len(sessions))
        )
        return True

    def record_round(
        self,
        round_number: int,
        received: np.ndarray,
        replies: list[Reply],
        failures: int,
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
                failures=failures,
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
        back before the round's deadline. Raises Stopped on a stop request,
        after telling the connection threads to stop waiting."""
        results: queue.Queue = queue.Queue()
        cancelled = threading.Event()
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
            session.tasks.put(
                RoundTask(round_number, payload, deadline, results, cancelled)
            )

        replies: dict[str, Reply] = {}
        failures: dict[str, Failure] = {}
        pending = {s.client_id: s for s in sessions}
        while pending:
            # A stop abandons the round; the connection threads let go of it.
            if self.stopping.is_set():
                cancelled.set()
                self.check_stop()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break

            # Take the next result, or notice clients that left meanwhile.
            try:
                item = results.get(timeout=min(remaining, POLL_SECONDS))
            except queue.Empty:
                for client_id, session in list(pending.items()):
                    if not self.is_connected(session):
                        failures[client_id] = Failure(client_id, "disconnected")
                        del pending[client_id]
                continue
            if item.client_id in pending:
                del pending[item.client_id]
                target = replies if isinstance(item, Reply) else failures
                target[item.client_id] = item

        for client_id in sorted(pending):
            failures[client_id] = Failure(
                client_id, "no reply before the round deadline"
            )

        # Drop the failed clients now: a client that missed the deadline
        # must not be counted for the next round, nor be left waiting.
        by_id = {s.client_id: s for s in sessions}
        for client_id in failures:
            self.drop(by_id[client_id])
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
        """Give the clients a few seconds to take ``done`` and close."""
        deadline = time.monotonic() + min(self.config.io_timeout, GOODBYE_SECONDS)
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

    # Checkpoints and outputs.

    def save_checkpoint(self) -> None:
        """Write the state after the last counted round to checkpoint.npz."""
        path = checkpoint.checkpoint_path(self.out)
        checkpoint.save(
            path,
            checkpoint.Checkpoint(
                round=self.round,
                global_vector=self.global_vector,
                accuracy=self.accuracy,
                history=[dataclasses.asdict(r) for r in self.history],
                clients=[dataclasses.asdict(r) for r in self.client_history],
                settings=as_dict(self.config),
                velocity=self.optimizer.velocity,
                rng={
                    "seed": self.config.seed,
                    "numpy": checkpoint.numpy_rng_state(),
                },
            ),
        )

    def restore(self) -> None:
        """With --resume, continue from the checkpoint in --out; raises
        CheckpointError when it cannot be used with these settings."""
        path = checkpoint.checkpoint_path(self.out)
        if not self.config.resume:
            if path.exists():
                log.warning(
                    "%s holds a checkpoint that this run will overwrite; "
                    "use --resume to continue it instead",
                    self.out,
                )
            return
        if not path.exists():
            log.warning("no checkpoint in %s yet; starting at round 1", self.out)
            return

        # Refuse settings that would make the resumed rounds differ.
        saved = checkpoint.load(path)
        mismatch = checkpoint.settings_mismatch(saved.settings, as_dict(self.config))
        if mismatch:
            raise checkpoint.CheckpointError(
                f"checkpoint {path} was written with other settings "
                f"({'; '.join(mismatch)}); resume with the same ones or use "
                "another --out"
            )
        if saved.global_vector.shape != self.global_vector.shape:
            raise checkpoint.CheckpointError(
                f"checkpoint {path} holds {saved.global_vector.size} weights, "
                f"the model has {self.global_vector.size}"
            )

        # Take over its state, and rewrite history.csv from it.
        self.round = saved.round
        self.global_vector = saved.global_vector
        self.optimizer.velocity = saved.velocity
        self.accuracy = saved.accuracy
        self.history = [RoundRecord(**row) for row in saved.history]
        self.client_history = [ClientRecord(**row) for row in saved.clients]
        if "numpy" in saved.rng:
            checkpoint.restore_numpy_rng(saved.rng["numpy"])
        self.model.set_weights(vector_to_weights(self.global_vector, self.shapes))
        self.write_history()
        log.info(
            "resumed from the checkpoint of round %d (accuracy %.2f) in %s",
            self.round,
            self.accuracy,
            path,
        )

    def write_history(self) -> None:
        """Rewrite history.csv and clients.csv with every round so far, each
        atomically."""
        for name, fields, records in (
            ("history.csv", HISTORY_FIELDS, self.history),
            ("clients.csv", CLIENT_FIELDS, self.client_history),
        ):

            def write(handle: Any, fields=fields, records=records) -> None:
                text = io.TextIOWrapper(handle, newline="", encoding="utf-8")
                writer = csv.DictWriter(text, fieldnames=fields)
                writer.writeheader()
                for record in records:
                    writer.writerow(dataclasses.asdict(record))
                text.flush()
                text.detach()

            checkpoint.write_atomically(self.out / name, write)

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
    """Run a federation with ``config``; return the process exit status.

    In the main thread, SIGINT and SIGTERM ask the run to stop cleanly; a
    second SIGINT during the goodbyes raises KeyboardInterrupt at once.
    """
    try:
        federation = Federation(config)
    except (ModelRefused, DataError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_SETTINGS

    exit_codes = {signal.SIGINT: EXIT_INTERRUPTED, signal.SIGTERM: EXIT_TERMINATED}

    def on_signal(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and federation.stopping.is_set():
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        federation.request_stop(f"server stopped by {name}", exit_codes[signum])

    # Signal handlers can only be set from the main thread.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in exit_codes:
            previous[signum] = signal.signal(signum, on_signal)
    try:
        return federation.run()
    except checkpoint.CheckpointError as exc:
        log.error("%s", exc)
        return EXIT_BAD_SETTINGS
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
