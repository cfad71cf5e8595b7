"""Who may talk to whom: the shared-secret handshake and TLS.

Two independent layers, each optional, each on both ends:

- A shared secret (``--secret-file``). Before any message, the server sends
  a random nonce; the client answers with its own nonce and an HMAC-SHA256
  of both under the secret; the server checks it and proves its own
  knowledge the same way. Both then derive a session key from the secret and
  the two nonces, and every later frame carries a tag under that key (see
  ``protocol.Channel``), so an altered, replayed or injected frame is refused
  before it is decoded. The secret itself never crosses the wire.
- TLS (``--tls-cert``/``--tls-key`` on the server, ``--tls-ca`` on clients),
  from Python's ``ssl``: encryption, and a client that refuses a server whose
  certificate does not verify against its CA.

The handshake frames are raw bytes, not pickles:

    server -> client   AUTH_MAGIC + server_nonce (32 bytes)
    client -> server   client_nonce (32 bytes) + HMAC(secret, "client" + nonces)
    server -> client   HMAC(secret, "server" + nonces)   (or an error message)
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import ssl
from pathlib import Path

from common import protocol
from common.protocol import AUTH_MAGIC, AuthenticationError, Channel

NONCE_BYTES = 32
# Shorter secrets are refused: they can be guessed from one captured handshake.
MIN_SECRET_BYTES = 16


class SecretError(ValueError):
    """A secret file that cannot be used; the message says why."""


def load_secret(path: Path) -> bytes:
    """The secret in ``path``, without surrounding white space."""
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise SecretError(f"cannot read secret file {path}: {exc.strerror}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretError(
            f"secret file {path} holds {len(secret)} bytes; use at least "
            f"{MIN_SECRET_BYTES} (for example: openssl rand -hex 32 > {path})"
        )
    return secret


def _mac(
    secret: bytes, label: bytes, server_nonce: bytes, client_nonce: bytes
) -> bytes:
    return hmac.new(
        secret, label + server_nonce + client_nonce, hashlib.sha256
    ).digest()


def server_handshake(sock: socket.socket, secret: bytes, io_timeout: float) -> Channel:
    """Challenge a new client; return a keyed channel, or raise
    AuthenticationError after telling the client why."""
    raw = Channel(sock, role="server")
    server_nonce = secrets.token_bytes(NONCE_BYTES)
    raw.write_frame(AUTH_MAGIC + server_nonce, io_timeout)

    # The answer is exactly a nonce and a MAC; a client without a secret sends
    # its echo instead, which is refused unread.
    try:
        answer = raw.read_frame(2 * NONCE_BYTES, io_timeout)
    except (protocol.FrameTooLarge, protocol.InvalidMessage):
        answer = b""
    client_nonce, proof = answer[:NONCE_BYTES], answer[NONCE_BYTES:]
    expected = _mac(secret, b"client", server_nonce, client_nonce)
    if len(answer) != 2 * NONCE_BYTES or not hmac.compare_digest(proof, expected):
        protocol.send_error(raw, "authentication failed: wrong or missing secret")
        raise AuthenticationError("client failed the secret handshake")

    raw.write_frame(_mac(secret, b"server", server_nonce, client_nonce), io_timeout)
    key = _mac(secret, b"session", server_nonce, client_nonce)
    return Channel(sock, key=key, role="server")


def client_handshake(sock: socket.socket, secret: bytes, io_timeout: float) -> Channel:
    """Answer the server's challenge; return a keyed channel, or raise
    AuthenticationError."""
    raw = Channel(sock, role="client")
    challenge = raw.read_frame(1024, io_timeout)
    if not challenge.startswith(AUTH_MAGIC):
        raise AuthenticationError(
            "the server did not ask for a secret; does it run without --secret-file?"
        )
    server_nonce = challenge[len(AUTH_MAGIC) :]
    client_nonce = secrets.token_bytes(NONCE_BYTES)
    proof = _mac(secret, b"client", server_nonce, client_nonce)
    raw.write_frame(client_nonce + proof, io_timeout)

    # The server answers with its own proof, or with an error message.
    answer = raw.read_frame(4096, io_timeout)
    expected = _mac(secret, b"server", server_nonce, client_nonce)
    if not hmac.compare_digest(answer, expected):
        try:
            protocol.decode(answer, {"error": protocol.check_error})
        except protocol.PeerError as exc:
            raise AuthenticationError(f"the server refused us: {exc}") from None
        except protocol.ProtocolError:
            pass
        raise AuthenticationError("the server does not know our secret")
    key = _mac(secret, b"session", server_nonce, client_nonce)
    return Channel(sock, key=key, role="client")


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def client_tls_context(ca: Path) -> ssl.SSLContext:
    """Verifies the server's certificate and host name against ``ca``."""
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
