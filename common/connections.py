"""The connection side of the server: one thread per client, doing I/O only.

``socketserver`` gives each connection a thread running
``ConnectionHandler``: finish the TLS and secret handshakes when enabled,
greet the client (``echo``), register its ``ClientSession`` with the
federation, then carry out the tasks that the main thread puts on the
session's queue: send ``model`` and wait for the reply (``RoundTask``), or
send ``done`` (``DoneTask``). A handler never decides anything about rounds;
it reports a ``Reply`` or a ``Failure`` on the round's result queue and goes
back to waiting. While it waits it looks at the socket every
``POLL_SECONDS``, so a client that leaves between rounds ends its thread.

What a handler shares with the main thread is the session's task queue, the
round's result queue, and the federation's registry (``register``,
``unregister``, guarded by the federation's own lock); the round logic is in
``common.server``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from common import protocol, security

if TYPE_CHECKING:
    from common.server import Federation

log = logging.getLogger("fedga.server")

# Longest pause of any wait before it looks again at stop requests, departed
# clients and deadlines.
POLL_SECONDS = 0.25
# Most seconds the end of a run waits for clients to take ``done`` and close
# (less when --io-timeout is shorter); a client that is training stops after
# its current generation, so this is ample.
GOODBYE_SECONDS = 5.0


# What travels between the main thread and the connection threads ------------


@dataclass(frozen=True)
class RoundTask:
    """Send ``payload`` (an encoded ``model`` message), then wait until
    ``deadline`` for the reply and report it on ``results``."""

    round_number: int
    payload: bytes
    deadline: float
    results: queue.Queue
    # Set by the main thread when it abandons the round (a stop request).
    cancelled: threading.Event


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
                task = self.next_task(sock, session)
                if task is None:
                    return
                if isinstance(task, DoneTask):
                    protocol.send_payload(sock, task.payload, config.io_timeout)
                    _wait_for_close(sock, min(config.io_timeout, GOODBYE_SECONDS))
                    return
                task.results.put(self.run_task(sock, session, task))
        except protocol.ProtocolError as exc:
            # A client that goes away is ordinary; anything else is worth a look.
            level = (
                logging.INFO
                if isinstance(exc, protocol.ConnectionClosed)
                else logging.WARNING
            )
            log.log(level, "dropped %s (%s): %s", peer, _client_name(session), exc)
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

    def next_task(
        self, sock: protocol.Connection, session: ClientSession
    ) -> RoundTask | DoneTask | None:
        """The session's next task; ConnectionClosed when the client leaves
        while it has nothing to do, so that its thread does not linger."""
        while True:
            try:
                return session.tasks.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if _peer_closed(sock):
                    raise protocol.ConnectionClosed("left between rounds") from None

    def run_task(
        self, sock: protocol.Connection, session: ClientSession, task: RoundTask
    ) -> Reply | Failure:
        """Send the round's model and read the reply; a failure to do so is
        reported as a Failure and ends the connection. A round abandoned by
        the main thread ends the wait without ending the connection."""
        config = self.server.federation.config
        try:
            protocol.send_payload(sock, task.payload, config.io_timeout)
            if not _wait_for_reply(sock, task):
                return Failure(session.client_id, "round abandoned by the server")
            answer = protocol.recv_message(
                sock,
                protocol.CLIENT_TO_SERVER,
                max_bytes=config.max_message_bytes,
                io_timeout=config.io_timeout,
                # The reply has started; the rest must follow within io_timeout.
                idle_timeout=config.io_timeout,
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
        # Connections with a thread of their own; guarded by _active_lock.
        self._active: set[Any] = set()
        self._active_lock = threading.Lock()
        super().__init__((config.host, config.port), ConnectionHandler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit a connection while fewer than max_connections are open, so
        that a flood of connections cannot exhaust the server's threads."""
        limit = self.federation.config.max_connections
        with self._active_lock:
            admitted = len(self._active) < limit
            if admitted:
                self._active.add(request)
        if not admitted:
            log.warning(
                "refused %s:%s: already %d connections (--max-connections)",
                *client_address[:2],
                limit,
            )
            if not isinstance(request, ssl.SSLSocket):
                protocol.send_error(
                    request, f"server is full ({limit} connections); try later"
                )
        return admitted

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)
        with self._active_lock:
            self._active.discard(request)

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


def _peer_closed(conn: protocol.Connection) -> bool:
    """True when the peer has closed its end or the socket has failed; bytes
    waiting to be read are left where they are."""
    sock = protocol.raw_socket(conn)
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except ValueError:
        # A socket wrapper that cannot peek: the next read will tell.
        return False
    except OSError:
        return True


def _wait_for_reply(conn: protocol.Connection, task: RoundTask) -> bool:
    """Wait until the client's reply starts to arrive (True) or the round is
    abandoned (False); MessageTimeout once the round's deadline has passed."""
    sock = protocol.raw_socket(conn)
    while True:
        remaining = task.deadline - time.monotonic()
        if remaining <= 0:
            raise protocol.MessageTimeout("no reply before the round deadline")
        if task.cancelled.is_set():
            return False
        # Bytes already decrypted by a wrapper count as readable too.
        if getattr(sock, "pending", lambda: 0)():
            return True
        try:
            readable, _, _ = select.select([sock], [], [], min(remaining, POLL_SECONDS))
        except (OSError, ValueError) as exc:
            raise protocol.ConnectionClosed(
                f"connection lost waiting for the reply: {exc}"
            ) from None
        if readable:
            return True


def _wait_for_close(conn: protocol.Connection, timeout: float) -> None:
    """After ``done``: drop whatever the client still sends until it closes,
    so that closing first does not reset the connection under its last read
    (the client may have been sending its reply as ``done`` went out)."""
    sock = protocol.raw_socket(conn)
    deadline = time.monotonic() + timeout
    with contextlib.suppress(OSError):
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            if not sock.recv(65536):
                return


def _client_name(session: ClientSession | None) -> str:
    return session.client_id if session is not None else "before echo"
