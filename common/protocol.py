"""The wire protocol: frames, messages, the allow-list decoder, and its errors.

A frame is a 4-byte big-endian unsigned length N followed by N bytes of
payload. The payload is a pickle of ``{"subject": str, "data": dict}``.
``docs/PROTOCOL.md`` is the full contract; this module is its reference
implementation.

Bytes from a socket are hostile, so they are never given to ``pickle.loads``.
``decode`` runs a restricted unpickler that

- resolves only the exact (module, name) pairs numpy arrays need, each bound
  to a checking stand-in rather than the real function;
- calls (REDUCE) only those stand-ins, and builds state (BUILD) only on
  arrays and dtypes, after checking that the state describes a plain float
  array whose bytes match its shape;
- refuses every other opcode that creates objects (INST, OBJ, NEWOBJ,
  extension codes, persistent ids).

A decoded message is then checked against the schema of its subject (keys,
types, finite float arrays) before anyone sees it. Every refusal is a
``ProtocolError`` with a one-line reason.

Reads have deadlines: ``recv_message`` waits at most ``idle_timeout`` for a
frame to start and at most ``io_timeout`` for a started frame to finish, and
checks the length against ``max_bytes`` before reading the payload.

A ``Channel`` wraps a connected socket; with a session key (agreed by the
handshake in ``common.security``) it adds an HMAC tag to every frame it sends
and checks the tag of every frame it reads before anything is decoded. The
module-level ``send_*``/``recv_message`` functions take a plain socket or a
channel. A channel counts its frames, so one connection must not be read (or
written) by two threads at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import math
import pickle
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

HEADER = struct.Struct(">I")
# Pickle protocol the encoder writes; the decoder reads protocols 2 to 5.
PICKLE_PROTOCOL = 4
# Upper bound on num_examples that a peer may claim.
MAX_EXAMPLES = 10**9
# Longest client_id, reason or model JSON accepted, in characters.
MAX_ID_CHARS = 128
MAX_REASON_CHARS = 1000

# The float dtypes that arrays on the wire may have (type codes; a dtype name
# may also carry a byte order, "<" or ">").
FLOAT_CODES = frozenset({"f2", "f4", "f8"})


# Errors ----------------------------------------------------------------------


class ProtocolError(Exception):
    """Base of every failure to exchange a valid message with a peer."""


class ConnectionClosed(ProtocolError):
    """The peer closed the connection, or the socket failed."""


class MessageTimeout(ProtocolError):
    """A message did not start or finish before its deadline."""


class FrameTooLarge(ProtocolError):
    """A frame's length prefix is over the configured limit."""


class DecodeError(ProtocolError):
    """The payload is not a pickle that the allow-list decoder accepts."""


class InvalidMessage(ProtocolError):
    """The payload decoded, but is not a valid message for this peer."""


class PeerError(ProtocolError):
    """The peer sent an ``error`` message; its reason is the text."""


@dataclass(frozen=True)
class Message:
    subject: str
    data: dict[str, Any]


# Encoding --------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Numpy scalars become Python numbers and arrays become contiguous, so
    the pickle names nothing the decoder refuses."""
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def encode(subject: str, data: Mapping[str, Any]) -> bytes:
    """The payload of a message (without the length prefix)."""
    envelope = {"subject": subject, "data": _plain(data)}
    return pickle.dumps(envelope, protocol=PICKLE_PROTOCOL)


def frame(payload: bytes) -> bytes:
    """Prefix a payload with its 4-byte big-endian length."""
    return HEADER.pack(len(payload)) + payload


# The allow-list decoder ------------------------------------------------------


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') followed by
    # BUILD with the real state; any other arguments could allocate at will.
    if subtype is not np.ndarray or tuple(shape) != (0,) or dtype != b"b":
        raise DecodeError("array header is not the one numpy writes")
    return np.ndarray((0,), dtype=np.int8)


def _safe_dtype(name: Any, align: Any = False, copy: Any = True) -> np.dtype:
    if not isinstance(name, str):
        raise DecodeError(f"dtype {name!r} is not a float dtype")
    code = name[1:] if name[:1] in ("<", ">") else name
    if code not in FLOAT_CODES:
        raise DecodeError(f"dtype {name!r} is not a float dtype")
    return np.dtype(name)


def _checked_array(dtype: Any, shape: Any, data: Any, order: str = "C") -> np.ndarray:
    """An array from its dtype, shape and raw bytes, refused unless it is a
    float array whose bytes match its shape exactly."""
    if not isinstance(dtype, np.dtype) or dtype.str[1:] not in FLOAT_CODES:
        raise DecodeError(f"array dtype {dtype!r} is not a float dtype")
    if not isinstance(shape, tuple) or not all(
        type(d) is int and d >= 0 for d in shape
    ):
        raise DecodeError("array shape must be a tuple of non-negative ints")
    if not isinstance(data, (bytes, bytearray)):
        raise DecodeError("array data must be bytes")
    if math.prod(shape) * dtype.itemsize != len(data):
        raise DecodeError("array data does not match its shape")
    return np.frombuffer(bytes(data), dtype=dtype).reshape(shape, order=order).copy()


def _safe_frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    # Pickle protocol 5 writes arrays as _frombuffer(bytes, dtype, shape, order).
    if order not in ("C", "F"):
        raise DecodeError("array order must be 'C' or 'F'")
    return _checked_array(dtype, shape, buffer, order)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
}
_CALLABLE = frozenset({_safe_reconstruct, _safe_dtype, _safe_frombuffer})


# The pure-Python unpickler is used because it lets each opcode be replaced;
# the C one offers only find_class, which cannot guard REDUCE and BUILD.
class _AllowListUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DecodeError(f"refused global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise DecodeError("refused persistent id")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if func not in _CALLABLE or not isinstance(args, tuple):
            raise DecodeError("refused call of a non-allow-listed object")
        self.stack[-1] = func(*args)

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.dtype):
            # A dtype's state can turn it into an object dtype; accept only the
            # state numpy itself writes for the plain float dtype it names.
            if state != inst.__reduce__()[2]:
                raise DecodeError("refused dtype state")
        elif isinstance(inst, np.ndarray) and inst.shape == (0,):
            if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
                raise DecodeError("refused array state")
            _, shape, dtype, fortran, data = state
            self.stack[-1] = _checked_array(dtype, shape, data, "F" if fortran else "C")
        else:
            raise DecodeError(f"refused state for {type(inst).__name__}")

    def _refuse(self) -> None:
        raise DecodeError("refused pickle opcode that builds arbitrary objects")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
    for _code in (
        pickle.INST,
        pickle.OBJ,
        pickle.NEWOBJ,
        pickle.NEWOBJ_EX,
        pickle.EXT1,
        pickle.EXT2,
        pickle.EXT4,
        pickle.PERSID,
        pickle.BINPERSID,
        pickle.NEXT_BUFFER,
        pickle.READONLY_BUFFER,
    ):
        dispatch[_code[0]] = _refuse
    del _code


def decode(payload: bytes, schema: Mapping[str, Callable[[dict], None]]) -> Message:
    """Decode a payload with the allow-list unpickler and check it against
    ``schema`` (subject -> checker). Raises DecodeError or InvalidMessage."""
    try:
        envelope = _AllowListUnpickler(io.BytesIO(payload)).load()
    except ProtocolError:
        raise
    except RecursionError:
        raise DecodeError("payload nests too deeply") from None
    except Exception as exc:  # a malformed pickle raises almost anything
        raise DecodeError(
            f"payload is not a valid pickle: {type(exc).__name__}"
        ) from None

    if not isinstance(envelope, dict) or set(envelope) != {"subject", "data"}:
        raise InvalidMessage("payload must be a dict with keys 'subject' and 'data'")
    subject, data = envelope["subject"], envelope["data"]
    if not isinstance(subject, str) or not isinstance(data, dict):
        raise InvalidMessage("'subject' must be a str and 'data' a dict")
    if subject not in schema:
        raise InvalidMessage(f"unexpected subject {subject[:40]!r}")
    schema[subject](data)
    if subject == "error":
        raise PeerError(data["reason"])
    return Message(subject, data)


# Schemas: one checker per subject and direction ------------------------------


def _require(data: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in data:
        raise InvalidMessage(f"missing key {key!r}")
    value = data[key]
    # bool is an int in Python; the protocol never means one by the other.
    if isinstance(value, bool) and kind is not bool:
        raise InvalidMessage(f"{key!r} must be {_kind_name(kind)}, got bool")
    if not isinstance(value, kind):
        raise InvalidMessage(
            f"{key!r} must be {_kind_name(kind)}, got {type(value).__name__}"
        )
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _require_count(data: dict, key: str, low: int, high: int) -> int:
    value = _require(data, key, int)
    if not low <= value <= high:
        raise InvalidMessage(f"{key!r} must be in [{low}, {high}], got {value}")
    return value


def _require_text(data: dict, key: str, limit: int) -> str:
    value = _require(data, key, str)
    if len(value) > limit:
        raise InvalidMessage(f"{key!r} is longer than {limit} characters")
    return value


def check_float_array(value: Any, what: str) -> np.ndarray:
    """A float ndarray with finite values, or InvalidMessage."""
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
        raise InvalidMessage(f"{what} must be a float array")
    if not np.all(np.isfinite(value)):
        raise InvalidMessage(f"{what} has NaN or infinite values")
    return value


def check_echo(data: dict) -> None:
    client_id = _require_text(data, "client_id", MAX_ID_CHARS)
    if not client_id or not client_id.isprintable():
        raise InvalidMessage("'client_id' must be non-empty printable text")
    _require_count(data, "num_examples", 1, MAX_EXAMPLES)


def check_model_task(data: dict) -> None:
    _require_count(data, "round", 1, 2**31)
    _require(data, "model_json", str)
    weights = _require(data, "weights", list)
    for i, array in enumerate(weights):
        check_float_array(array, f"weights[{i}]")
    ga = _require(data, "ga", dict)
    for key in ("num_generations", "num_solutions", "num_parents_mating"):
        _require_count(ga, key, 1, 1_000_000)
    _require_count(ga, "seed", 0, 2**32 - 1)
    if ga["num_parents_mating"] > ga["num_solutions"]:
        raise InvalidMessage("'num_parents_mating' exceeds 'num_solutions'")
    # Optional settings: checked when present, defaults otherwise.
    if "keep_elitism" in ga:
        _require_count(ga, "keep_elitism", 0, ga["num_solutions"])
    for key, low, high in (
        ("mutation_percent_genes", 0.0, 100.0),
        ("mutation_range", 0.0, 1e6),
        ("init_range", 0.0, 1e6),
        ("target_loss", 0.0, 1e6),
    ):
        if key in ga:
            value = _require(ga, key, (int, float))
            if not low <= value <= high:
                raise InvalidMessage(f"{key!r} must be in [{low}, {high}]")


def check_model_reply(data: dict) -> None:
    _require_count(data, "round", 1, 2**31)
    vector = _require(data, "best_model_weights_vector", np.ndarray)
    check_float_array(vector, "'best_model_weights_vector'")
    if vector.ndim != 1:
        raise InvalidMessage("'best_model_weights_vector' must be 1-D")
    _require_count(data, "num_examples", 1, MAX_EXAMPLES)
    metrics = _require(data, "metrics", dict)
    for key, value in metrics.items():
        if not isinstance(key, str) or isinstance(value, bool):
            raise InvalidMessage("'metrics' must map names to numbers")
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidMessage(f"metric {key[:40]!r} must be a finite number")


def check_done(data: dict) -> None:
    _require_count(data, "round", 0, 2**31)
    _require(data, "accuracy", (int, float))
    _require_text(data, "reason", MAX_REASON_CHARS)


def check_error(data: dict) -> None:
    _require_text(data, "reason", MAX_REASON_CHARS)


# What each side accepts.
CLIENT_TO_SERVER = {
    "echo": check_echo,
    "model": check_model_reply,
    "error": check_error,
}
SERVER_TO_CLIENT = {"model": check_model_task, "done": check_done, "error": check_error}


# Connections -----------------------------------------------------------------

# With a shared secret, every frame's payload ends with an HMAC-SHA256 tag of
# the direction, the frame's sequence number and the payload, under the
# session key that the handshake in common/security.py agreed.
TAG_BYTES = 32
# A server that requires a secret opens the connection with a frame that
# starts with this, instead of waiting for echo.
AUTH_MAGIC = b"fedga-auth-1:"


class AuthenticationError(ProtocolError):
    """The peer did not prove knowledge of the shared secret, or a frame's
    tag does not verify (altered, replayed, reordered or forged)."""


class Channel:
    """One connection's stream of frames.

    Without a key, a frame is the length and the payload. With a session key,
    the payload carries a tag that binds it to its direction and position,
    and a frame whose tag does not verify is refused before it is decoded.
    """

    def __init__(
        self, sock: socket.socket, key: bytes | None = None, role: str = "client"
    ):
        self.sock = sock
        self.key = key
        self._send_label = b"C" if role == "client" else b"S"
        self._recv_label = b"S" if role == "client" else b"C"
        self._sent = 0
        self._received = 0

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _tag(self, label: bytes, number: int, body: bytes) -> bytes:
        assert self.key is not None
        message = label + number.to_bytes(8, "big") + body
        return hmac.new(self.key, message, hashlib.sha256).digest()

    def write_frame(self, body: bytes, timeout: float) -> None:
        if self.key is not None:
            body += self._tag(self._send_label, self._sent, body)
            self._sent += 1
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(frame(body))
        except TimeoutError:
            raise MessageTimeout(
                f"peer did not take the message within {timeout:g}s"
            ) from None
        except OSError as exc:
            raise ConnectionClosed(f"connection lost while sending: {exc}") from None

    def read_frame(
        self, max_bytes: int, io_timeout: float, idle_timeout: float | None = None
    ) -> bytes:
        """One frame's payload, its tag checked and removed.

        Waits up to ``idle_timeout`` (default ``io_timeout``) for the frame to
        start, then up to ``io_timeout`` for the rest of it; refuses a length
        over ``max_bytes`` (plus the tag) before reading the payload.
        """
        overhead = TAG_BYTES if self.key is not None else 0
        idle = io_timeout if idle_timeout is None else idle_timeout
        first = _recv_exactly(
            self.sock, 1, time.monotonic() + idle, "waiting for a message"
        )
        deadline = time.monotonic() + io_timeout
        header = first + _recv_exactly(self.sock, 3, deadline, "in a header")
        (length,) = HEADER.unpack(header)
        if length > max_bytes + overhead:
            raise FrameTooLarge(
                f"frame of {length} bytes is over the {max_bytes}-byte limit"
            )
        if length <= overhead:
            raise InvalidMessage("empty frame")
        payload = _recv_exactly(self.sock, length, deadline, "in a message")
        if self.key is None:
            return payload
        body, tag = payload[:-TAG_BYTES], payload[-TAG_BYTES:]
        expected = self._tag(self._recv_label, self._received, body)
        if not hmac.compare_digest(tag, expected):
            raise AuthenticationError(
                "frame failed authentication (altered, replayed or forged)"
            )
        self._received += 1
        return body


Connection = socket.socket | Channel


def raw_socket(conn: Connection) -> socket.socket:
    """The socket under a connection, for waiting on it (select, peek); reading
    messages must go through the channel."""
    return conn.sock if isinstance(conn, Channel) else conn


def _channel(conn: Connection) -> Channel:
    return conn if isinstance(conn, Channel) else Channel(conn)


def send_message(
    conn: Connection, subject: str, data: Mapping[str, Any], timeout: float
) -> None:
    """Send one framed message; a peer that does not read within ``timeout``
    seconds raises MessageTimeout."""
    send_payload(conn, encode(subject, data), timeout)


def send_payload(conn: Connection, payload: bytes, timeout: float) -> None:
    """Send an already encoded payload (used to encode once, send to many)."""
    _channel(conn).write_frame(payload, timeout)


def send_error(conn: Connection, reason: str, timeout: float = 2.0) -> None:
    """Tell the peer why it is being dropped; never raises."""
    with contextlib.suppress(ProtocolError):
        send_message(conn, "error", {"reason": reason[:MAX_REASON_CHARS]}, timeout)


def recv_message(
    conn: Connection,
    schema: Mapping[str, Callable[[dict], None]],
    *,
    max_bytes: int,
    io_timeout: float,
    idle_timeout: float | None = None,
) -> Message:
    """Read, authenticate (on a keyed channel) and decode one message.

    Waits up to ``idle_timeout`` (default ``io_timeout``) for the frame to
    start and then up to ``io_timeout`` for the rest of it.
    """
    channel = _channel(conn)
    payload = channel.read_frame(max_bytes, io_timeout, idle_timeout)
    if channel.key is None and payload.startswith(AUTH_MAGIC):
        raise AuthenticationError(
            "the server requires a shared secret; give --secret-file"
        )
    return decode(payload, schema)


def _recv_exactly(sock: socket.socket, size: int, deadline: float, where: str) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MessageTimeout(f"timed out {where}")
        try:
            sock.settimeout(remaining)
            count = sock.recv_into(view[received:], size - received)
        except TimeoutError:
            raise MessageTimeout(f"timed out {where}") from None
        except OSError as exc:
            raise ConnectionClosed(f"connection lost {where}: {exc}") from None
        if count == 0:
            raise ConnectionClosed(f"peer closed the connection {where}")
        received += count
    return bytes(buffer)
