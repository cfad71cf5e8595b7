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

Run it: ``python server.py --port 0`` (see ``python server.py --help``).
"""

from __future__ import annotations

import csv
import dataclasses
import ipaddress
import logging
import os
import queue
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from common import protocol, security
from common.aggregation import AGGREGATORS, ServerOptimizer
from common.config import ServerConfig, as_dict, derive_seed
from common.data import XOR_INPUTS, XOR_LABELS
from common.model import (
    build_xor_model,
    evaluate,
    vector_to_weights,
    weight_shapes,
    weights_to_vector,
)

log = logging.getLogger("fedga.server")

EXIT_TARGET_REACHED = 0
EXIT_ROUNDS_EXHAUSTED = 3
HISTORY_FIELDS = ["round", "accuracy", "loss", "clients", "failures", "seconds"]


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
    accuracy: float
    loss: float
    clients: int
    failures: int
    seconds: float


# The connection side ---------------------------------------------------------


class ConnectionHandler(socketserver.BaseRequestHandler):
    """Greets one client, then carries out its session's tasks until done."""

    server: FederationTCPServer

    def handle(self) -> None:
        federation = self.server.federation
        config = federation.config
        sock: protocol.Connection = self.request
        peer = "{}:{}".format(*self.client_address[:2])
        session = None
        try:
            sock = self.secure(sock)
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
            quiet = (
                protocol.ConnectionClosed,
                protocol.PeerError,
                protocol.AuthenticationError,
            )
            if not isinstance(exc, quiet):
                protocol.send_error(sock, str(exc))
        finally:
            if session is not None:
                federation.unregister(session)

    def secure(self, sock: socket.socket) -> protocol.Connection:
        """Finish the TLS handshake and the secret handshake, when enabled."""
        timeout = self.server.federation.config.io_timeout
        if isinstance(sock, ssl.SSLSocket):
            try:
                sock.settimeout(timeout)
                sock.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                raise protocol.AuthenticationError(
                    f"TLS handshake failed: {exc}"
                ) from None
        if self.server.secret is None:
            return sock
        return security.server_handshake(sock, self.server.secret, timeout)

    def greet(self, sock: protocol.Connection, peer: str) -> ClientSession:
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
        self, sock: protocol.Connection, session: ClientSession, task: RoundTask
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
            # Leave the registry before reporting, so that the next round
            # never hands a task to this finished connection.
            self.server.federation.unregister(session)
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
    # Many clients may connect at once; the default backlog of 5 would make
    # the kernel drop and retransmit their connection requests.
    request_queue_size = 1024

    def __init__(self, federation: Federation):
        self.federation = federation
        config = federation.config
        self.secret = (
            security.load_secret(config.secret_file) if config.secret_file else None
        )
        self.tls = (
            security.server_tls_context(config.tls_cert, config.tls_key)
            if config.tls_cert and config.tls_key
            else None
        )
        super().__init__((config.host, config.port), ConnectionHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.tls is not None:
            # The TLS handshake runs in the connection's thread (secure), so a
            # slow peer cannot stall the accept loop.
            sock = self.tls.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("unexpected error with %s:%s", *client_address[:2])


# The round side --------------------------------------------------------------


class Federation:
    """Owns the global model and runs the rounds."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.out = config.out or default_out_dir()
        self.model = build_xor_model(config.seed)
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
        log.info("results go to %s", self.out)
        if self.tcp_server is None:
            self.listen()
        try:
            for round_number in range(self.round + 1, self.config.rounds + 1):
                self.round = round_number
                self.run_round(round_number, self.wait_for_clients())
                if self.accuracy >= self.config.target_accuracy:
                    self.finish("target accuracy reached")
                    return EXIT_TARGET_REACHED
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

        # Evaluate the new global model on the truth table.
        self.model.set_weights(vector_to_weights(self.global_vector, self.shapes))
        loss, self.accuracy = evaluate(self.model, XOR_INPUTS, XOR_LABELS)
        record = RoundRecord(
            round=round_number,
            accuracy=self.accuracy,
            loss=loss,
            clients=len(replies),
            failures=len(failures),
            seconds=round(time.monotonic() - started, 3),
        )
        self.history.append(record)
        self.write_history()
        log.info(
            "[ROUND %d] accuracy %.2f loss %.4f clients %d/%d %.1fs",
            round_number,
            record.accuracy,
            record.loss,
            record.clients,
            len(sessions),
            record.seconds,
        )

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
        """Save the model, tell every client the run is over, and say where
        the results are."""
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
        log.info(
            "done after %d round(s): %s, accuracy %.2f; model in %s, history in %s",
            self.round,
            reason,
            self.accuracy,
            model_path,
            self.out / "history.csv",
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
        """Rewrite history.csv with every round so far, atomically."""
        path = self.out / "history.csv"
        temporary = path.with_suffix(".csv.tmp")
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
            writer.writeheader()
            for record in self.history:
                writer.writerow(dataclasses.asdict(record))
        os.replace(temporary, path)


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


def serve(config: ServerConfig) -> int:
    """Run a federation with ``config``; return the process exit status."""
    return Federation(config).run()
