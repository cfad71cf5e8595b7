"""Property tests: whatever bytes arrive, the decoder answers with the
project's own protocol errors, and never hangs."""

from __future__ import annotations

import contextlib
import pickle
import socket

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from common import protocol

VALID = [
    protocol.encode("echo", {"client_id": "client1", "num_examples": 2}),
    protocol.encode(
        "model",
        {
            "round": 1,
            "best_model_weights_vector": np.ones(22),
            "num_examples": 2,
            "metrics": {"loss": 0.5},
        },
    ),
    pickle.dumps(
        {"subject": "model", "data": {"weights": [np.zeros((2, 4))]}}, protocol=5
    ),
]


def decode_or_protocol_error(payload: bytes) -> None:
    with contextlib.suppress(protocol.ProtocolError):
        protocol.decode(payload, protocol.CLIENT_TO_SERVER)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_give_only_protocol_errors(payload):
    decode_or_protocol_error(payload)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutated_valid_pickles_give_only_protocol_errors(data):
    payload = bytearray(data.draw(st.sampled_from(VALID)))
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(payload) - 1))
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip":
            payload[position] ^= data.draw(st.integers(1, 255))
        elif action == "insert":
            payload[position:position] = data.draw(st.binary(min_size=1, max_size=9))
        elif len(payload) > 1:
            del payload[position]
    decode_or_protocol_error(bytes(payload))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=6), st.booleans())
def test_random_frames_on_a_socket_end_in_a_protocol_error(chunks, prefixed):
    """Random bytes, with or without a plausible length prefix, then the
    sender closes: the reader raises a ProtocolError instead of waiting."""
    body = b"".join(chunks)
    wire = protocol.frame(body) if prefixed else body
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    with near, far:
        near.sendall(wire)
        near.shutdown(socket.SHUT_WR)
        while True:
            try:
                protocol.recv_message(
                    far, protocol.CLIENT_TO_SERVER, max_bytes=1 << 16, io_timeout=5
                )
            except protocol.ProtocolError:
                break
