"""Frames and messages over real loopback sockets, and the decoder's refusals."""

from __future__ import annotations

import pickle
import socket

import numpy as np
import pytest

from common import protocol

MAX = 1 << 20


def model_task(weights=None) -> dict:
    return {
        "round": 3,
        "model_json": '{"class_name": "Sequential"}',
        "weights": weights
        if weights is not None
        else [np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)],
        "ga": {
            "num_generations": 5,
            "num_solutions": 4,
            "num_parents_mating": 2,
            "seed": 123,
        },
    }


def model_reply(vector=None) -> dict:
    return {
        "round": 3,
        "best_model_weights_vector": vector
        if vector is not None
        else np.array([0.1, -2.5, 1e-30, 3.0]),
        "num_examples": 2,
        "metrics": {"loss": 0.25, "accuracy": 1.0},
    }


MESSAGES = [
    ("echo", {"client_id": "client1", "num_examples": 2}, protocol.CLIENT_TO_SERVER),
    ("model", model_reply(), protocol.CLIENT_TO_SERVER),
    ("model", model_task(), protocol.SERVER_TO_CLIENT),
    (
        "done",
        {"round": 7, "accuracy": 1.0, "reason": "target accuracy reached"},
        protocol.SERVER_TO_CLIENT,
    ),
]


def recv(sock: socket.socket, schema, timeout: float = 5.0) -> protocol.Message:
    return protocol.recv_message(sock, schema, max_bytes=MAX, io_timeout=timeout)


def assert_same(sent, received) -> None:
    """Equal values, and arrays equal bit for bit with the same dtype."""
    if isinstance(sent, np.ndarray):
        assert isinstance(received, np.ndarray)
        assert sent.dtype == received.dtype and sent.shape == received.shape
        assert sent.tobytes() == received.tobytes()
    elif isinstance(sent, dict):
        assert sent.keys() == received.keys()
        for key in sent:
            assert_same(sent[key], received[key])
    elif isinstance(sent, (list, tuple)):
        assert len(sent) == len(received)
        for a, b in zip(sent, received, strict=True):
            assert_same(a, b)
    else:
        assert sent == received and type(sent) is type(received)


@pytest.mark.parametrize("subject, data, schema", MESSAGES)
def test_every_message_round_trips_bit_exact(tcp_pair, subject, data, schema):
    near, far = tcp_pair
    protocol.send_message(near, subject, data, timeout=5)
    message = recv(far, schema)
    assert message.subject == subject
    assert_same(data, message.data)


def test_a_frame_split_across_many_sends_decodes(tcp_pair):
    near, far = tcp_pair
    near.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = model_task([np.arange(300, dtype=np.float64).reshape(30, 10)])
    wire = protocol.frame(protocol.encode("model", data))
    for i in range(len(wire)):
        near.sendall(wire[i : i + 1])
    assert_same(data, recv(far, protocol.SERVER_TO_CLIENT).data)


def test_several_frames_in_one_send_decode_in_order(tcp_pair):
    near, far = tcp_pair
    batch = b"".join(
        protocol.frame(protocol.encode(subject, data))
        for subject, data, schema in MESSAGES
        if schema is protocol.CLIENT_TO_SERVER
    )
    near.sendall(batch)
    assert recv(far, protocol.CLIENT_TO_SERVER).subject == "echo"
    second = recv(far, protocol.CLIENT_TO_SERVER)
    assert_same(model_reply(), second.data)


def test_numpy_pickles_of_every_modern_protocol_decode():
    arrays = [
        np.arange(6, dtype=np.float64).reshape(2, 3),
        np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        np.zeros(0, dtype=np.float16),
    ]
    for version in (3, 4, 5):
        payload = pickle.dumps(
            {"subject": "model", "data": model_task(arrays)}, protocol=version
        )
        decoded = protocol.decode(payload, protocol.SERVER_TO_CLIENT).data["weights"]
        for sent, got in zip(arrays, decoded, strict=True):
            assert np.array_equal(sent, got) and sent.dtype == got.dtype


def test_frame_over_the_limit_is_refused_before_its_payload(tcp_pair):
    near, far = tcp_pair
    near.sendall(protocol.HEADER.pack(2**31))
    with pytest.raises(protocol.FrameTooLarge, match="over the 1048576-byte limit"):
        recv(far, protocol.CLIENT_TO_SERVER)


def test_a_frame_that_stops_halfway_times_out(tcp_pair):
    near, far = tcp_pair
    near.sendall(protocol.frame(protocol.encode("echo", MESSAGES[0][1]))[:10])
    with pytest.raises(protocol.MessageTimeout, match="in a message"):
        recv(far, protocol.CLIENT_TO_SERVER, timeout=0.2)


def test_a_peer_that_closes_mid_frame_is_reported(tcp_pair):
    near, far = tcp_pair
    near.sendall(protocol.HEADER.pack(100) + b"abc")
    near.shutdown(socket.SHUT_WR)
    with pytest.raises(protocol.ConnectionClosed, match="in a message"):
        recv(far, protocol.CLIENT_TO_SERVER)


def test_an_error_message_raises_peer_error_with_its_reason(tcp_pair):
    near, far = tcp_pair
    protocol.send_error(near, "weights vector has shape (3,), expected (22,)")
    with pytest.raises(protocol.PeerError, match=r"expected \(22,\)"):
        recv(far, protocol.SERVER_TO_CLIENT)


class RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "payload, message",
    [
        (pickle.dumps(RunsCode()), "refused global"),
        (
            pickle.dumps({"subject": "echo", "data": {"client_id": RunsCode()}}),
            "refused global",
        ),
        (
            pickle.dumps({"subject": "error", "data": {"reason": np.array([1, 2])}}),
            "not a float dtype",
        ),
        (
            pickle.dumps(
                {"subject": "error", "data": {"reason": np.array([None], dtype=object)}}
            ),
            "not a float dtype",
        ),
        (b"\x80\x04not a pickle", "not a valid pickle"),
        (pickle.dumps([1, 2, 3]), "must be a dict"),
        (pickle.dumps({"subject": "hello", "data": {}}), "unexpected subject"),
        (
            pickle.dumps({"subject": "echo", "data": {"client_id": "a"}}),
            "missing key 'num_examples'",
        ),
        (
            pickle.dumps(
                {"subject": "echo", "data": {"client_id": "a", "num_examples": True}}
            ),
            "got bool",
        ),
        (
            pickle.dumps(
                {"subject": "echo", "data": {"client_id": "a", "num_examples": -1}}
            ),
            "must be in",
        ),
    ],
)
def test_the_decoder_refuses_what_is_not_the_protocol(payload, message):
    with pytest.raises((protocol.DecodeError, protocol.InvalidMessage), match=message):
        protocol.decode(payload, protocol.CLIENT_TO_SERVER)


@pytest.mark.parametrize(
    "vector, message",
    [
        (np.array([0.0, np.nan]), "NaN or infinite"),
        (np.array([np.inf, 0.0]), "NaN or infinite"),
        (np.array([1, 2], dtype=np.int64), "not a float dtype"),
        (np.zeros((2, 2)), "must be 1-D"),
    ],
)
def test_bad_weights_in_a_reply_are_refused(vector, message):
    payload = pickle.dumps({"subject": "model", "data": model_reply(vector)})
    with pytest.raises((protocol.DecodeError, protocol.InvalidMessage), match=message):
        protocol.decode(payload, protocol.CLIENT_TO_SERVER)


@pytest.mark.parametrize(
    "ga_change, message",
    [
        ({"num_parents_mating": 9}, "exceeds 'num_solutions'"),
        ({"keep_elitism": 99}, "must be in"),
        ({"mutation_range": "wide"}, "must be int or float"),
        ({"mutation_percent_genes": 150.0}, "must be in"),
        ({"seed": -1}, "must be in"),
        ({"target_loss": -0.5}, "must be in"),
    ],
)
def test_ga_settings_out_of_range_are_refused(ga_change, message):
    task = model_task()
    task["ga"].update(ga_change)
    payload = pickle.dumps({"subject": "model", "data": task})
    with pytest.raises(protocol.InvalidMessage, match=message):
        protocol.decode(payload, protocol.SERVER_TO_CLIENT)
