"""Hostile peers against a real server on loopback: nothing runs, nothing leaks.

Each test starts server.py as a process and speaks to it over real sockets,
as an attacker would, then checks what the server said and did.
"""

from __future__ import annotations

import pickle
import re
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from common import protocol, security
from common.launcher import (
    Process,
    python_script,
    start_client,
    start_server,
    wait_for_federation,
)

pytestmark = pytest.mark.slow

TIMEOUT = 120
MAX = 1 << 20


def call_pickle(module: str, name: str, *args) -> bytes:
    """A pickle that calls module.name(*args) when loaded with pickle.loads."""
    arguments = pickle.dumps(args, protocol=3)[2:-1]
    return (
        b"\x80\x02c"
        + module.encode()
        + b"\n"
        + name.encode()
        + b"\n"
        + arguments
        + b"R."
    )


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def expect_error(sock: socket.socket, pattern: str) -> None:
    with pytest.raises(protocol.PeerError, match=pattern):
        protocol.recv_message(
            sock, protocol.SERVER_TO_CLIENT, max_bytes=MAX, io_timeout=TIMEOUT
        )


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))


def expect_refused_client(port: int, message: str, *args: str) -> None:
    """client1.py with ``args`` exits 1 with ``message`` and no traceback."""
    client = Process(python_script("client1.py", "--port", str(port), *args))
    assert client.wait(TIMEOUT) == 1, client.output
    assert message in client.output
    assert "Traceback" not in client.output


def finish_with_honest_clients(server: Process, port: int, *args: str) -> None:
    clients = [start_client(n, port, *args) for n in ("client1.py", "client2.py")]
    server_code, client_codes = wait_for_federation(server, clients, TIMEOUT)
    assert server_code in (0, 3), server.output
    assert client_codes == [0, 0]


# Hostile pickles -------------------------------------------------------------


def test_code_carrying_pickles_are_refused_whole_cut_short_and_bytewise(tmp_path):
    marker = tmp_path / "pwned"
    payloads = {
        "os.system": call_pickle("os", "system", f"touch {marker}"),
        "posix.system": call_pickle("posix", "system", f"touch {marker}"),
        "builtins.eval": call_pickle(
            "builtins", "eval", f"open({str(marker)!r}, 'w').close()"
        ),
        "numpy runstring": call_pickle(
            "numpy.testing._private.utils",
            "runstring",
            f"open({str(marker)!r}, 'w').close()",
            {},
        ),
        "numpy f2py myeval": call_pickle(
            "numpy.f2py.crackfortran", "myeval", f"open({str(marker)!r}, 'w').close()"
        ),
    }
    server, port = start_server(
        "--out",
        str(tmp_path / "out"),
        "--rounds",
        "2",
        "--generations",
        "5",
        "--io-timeout",
        "2",
    )
    refused = 0
    for name, payload in payloads.items():
        wire = protocol.frame(payload)
        # Whole: the server answers with the reason and closes.
        with connect(port) as sock:
            sock.sendall(wire)
            expect_error(sock, "refused global")
        # One byte at a time: the same.
        with connect(port) as sock:
            for i in range(len(wire)):
                sock.sendall(wire[i : i + 1])
            expect_error(sock, "refused global")
        # Cut short: the frame never completes, so nothing is decoded.
        with connect(port) as sock:
            sock.sendall(wire[: len(wire) // 2])
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""
        refused += 3
        assert not marker.exists(), name
    server.wait_for_line(r"dropped .*in a message", TIMEOUT)
    finish_with_honest_clients(server, port)
    assert not marker.exists()
    assert server.output.count("dropped") >= refused


def test_huge_declarations_are_refused_without_the_memory_to_match(tmp_path):
    server, port = start_server(
        "--out", str(tmp_path), "--rounds", "1", "--generations", "2"
    )
    before = rss_kib(server.popen.pid)

    # A length prefix of 2^31 is refused before any payload is read.
    with connect(port) as sock:
        sock.sendall(protocol.HEADER.pack(2**31))
        expect_error(sock, "over the .*-byte limit")

    # A tiny pickle that asks numpy for a 10^10-element array.
    payload = call_pickle(
        "numpy._core.multiarray", "_reconstruct", np.ndarray, (10**10,), b"b"
    )
    assert len(payload) < 100
    with connect(port) as sock:
        sock.sendall(protocol.frame(payload))
        expect_error(sock, "array header")

    # A plain array state that claims 10^10 float64 values but carries 8 bytes.
    state = pickle.dumps(np.zeros(1), protocol=4)
    lying = state.replace(b"K\x01\x85", b"\x8a\x05\x00\xe4\x0bT\x02\x85", 1)
    assert lying != state
    with connect(port) as sock:
        sock.sendall(protocol.frame(lying))
        expect_error(sock, "does not match its shape")

    grown_mib = (rss_kib(server.popen.pid) - before) / 1024
    finish_with_honest_clients(server, port)
    assert grown_mib < 8, f"server memory grew by {grown_mib:.1f} MiB"


# Bad updates -----------------------------------------------------------------


def bad_reply(round_number: int, variant: str) -> bytes:
    vector = np.zeros(22)
    data = {
        "round": round_number,
        "best_model_weights_vector": vector,
        "num_examples": 2,
        "metrics": {"loss": 0.1, "accuracy": 1.0},
    }
    if variant == "short vector":
        data["best_model_weights_vector"] = np.zeros(21)
    elif variant == "matrix":
        data["best_model_weights_vector"] = np.zeros((2, 11))
    elif variant == "per-layer list":
        data["best_model_weights_vector"] = [np.zeros((2, 4)), np.zeros(4)]
    elif variant == "integer dtype":
        data["best_model_weights_vector"] = np.zeros(22, dtype=np.int64)
    elif variant == "object dtype":
        data["best_model_weights_vector"] = np.array([None] * 22, dtype=object)
    elif variant == "NaN":
        vector[3] = np.nan
    elif variant == "Inf":
        vector[5] = -np.inf
    elif variant == "negative num_examples":
        data["num_examples"] = -4
    elif variant == "absurd num_examples":
        data["num_examples"] = 10**15
    elif variant == "wrong round":
        data["round"] = round_number + 7
    # Pickled by hand: the project's encoder would not write most of these.
    return pickle.dumps({"subject": "model", "data": data}, protocol=4)


BAD_REPLIES = {
    "short vector": "expected \\(22,\\)",
    "matrix": "must be 1-D",
    "per-layer list": "must be ndarray",
    "integer dtype": "not a float dtype",
    "object dtype": "not a float dtype",
    "NaN": "NaN or infinite",
    "Inf": "NaN or infinite",
    "negative num_examples": "must be in",
    "absurd num_examples": "must be in",
    "wrong round": "expected 1|expected [0-9]+",
}


def test_bad_updates_are_refused_and_leave_the_global_model_untouched(tmp_path):
    from common.model import build_xor_model, weights_to_vector
    from common.quiet_tf import keras

    out = tmp_path / "out"
    server, port = start_server(
        "--out",
        str(out),
        "--min-clients",
        "1",
        "--min-fit-clients",
        "1",
        "--generations",
        "1",
        "--seed",
        "4",
    )
    try:
        for variant, reason in BAD_REPLIES.items():
            with connect(port) as sock:
                protocol.send_message(
                    sock, "echo", {"client_id": "mallory", "num_examples": 2}, 10
                )
                task = protocol.recv_message(
                    sock,
                    protocol.SERVER_TO_CLIENT,
                    max_bytes=MAX,
                    io_timeout=TIMEOUT,
                    idle_timeout=TIMEOUT,
                )
                # Every refused attempt leaves round 1 to be tried again.
                assert task.data["round"] == 1
                sock.sendall(protocol.frame(bad_reply(task.data["round"], variant)))
                expect_error(sock, reason)
        server.wait_for_line(
            r"\[ROUND 1\] 0 of 1 client\(s\) replied", TIMEOUT, count=len(BAD_REPLIES)
        )
        server.popen.terminate()
        assert server.wait(TIMEOUT) == 143, server.output
    finally:
        server.stop()

    assert "[ROUND 1] accuracy" not in server.output
    saved = keras.models.load_model(out / "model.keras")
    initial = build_xor_model(seed=4)
    assert np.array_equal(
        weights_to_vector(saved.get_weights()), weights_to_vector(initial.get_weights())
    )


# Authentication and TLS ------------------------------------------------------


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("secrets")
    (folder / "secret").write_text("correct horse battery staple 0123456789\n")
    (folder / "wrong").write_text("incorrect donkey battery staple 987654321\n")
    return folder


def test_only_clients_that_know_the_secret_get_in(tmp_path, secrets_dir):
    secret = str(secrets_dir / "secret")
    server, port = start_server(
        "--out",
        str(tmp_path),
        "--rounds",
        "2",
        "--generations",
        "5",
        "--secret-file",
        secret,
    )
    key_bytes = security.load_secret(secrets_dir / "secret")

    # Wrong secret, and no secret: one clear line each, non-zero exit.
    expect_refused_client(
        port, "wrong or missing secret", "--secret-file", str(secrets_dir / "wrong")
    )
    expect_refused_client(port, "requires a shared secret")

    # An altered frame after an honest handshake is refused before decoding.
    with connect(port) as sock:
        channel = security.client_handshake(sock, key_bytes, 10)
        body = protocol.encode("echo", {"client_id": "eve", "num_examples": 2})
        tag = channel._tag(b"C", 0, body)
        altered = bytearray(body + tag)
        altered[len(body) // 2] ^= 0x01
        sock.sendall(protocol.frame(bytes(altered)))
        assert sock.recv(1) == b""
    server.wait_for_line(r"dropped .*failed authentication", TIMEOUT)

    # A frame recorded in one session is refused when replayed in another.
    with connect(port) as sock:
        channel = security.client_handshake(sock, key_bytes, 10)
        body = protocol.encode("echo", {"client_id": "eve", "num_examples": 2})
        recorded = protocol.frame(body + channel._tag(b"C", 0, body))
    with connect(port) as sock:
        security.client_handshake(sock, key_bytes, 10)
        sock.sendall(recorded)
        assert sock.recv(1) == b""
    server.wait_for_line(r"dropped .*failed authentication", TIMEOUT, count=2)

    finish_with_honest_clients(server, port, "--secret-file", secret)


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 signed by it, and another CA."""
    folder = tmp_path_factory.mktemp("tls")
    for ca in ("ca", "other-ca"):
        openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={ca}",
            "-keyout",
            str(folder / f"{ca}.key"),
            "-out",
            str(folder / f"{ca}.pem"),
        )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(folder / "server.key"),
        "-out",
        str(folder / "server.csr"),
    )
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        str(folder / "server.csr"),
        "-CA",
        str(folder / "ca.pem"),
        "-CAkey",
        str(folder / "ca.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(folder / "san.ext"),
        "-out",
        str(folder / "server.pem"),
    )
    return folder


def test_tls_clients_train_and_refuse_a_certificate_from_another_authority(
    tmp_path, tls_files
):
    server, port = start_server(
        "--out",
        str(tmp_path),
        "--rounds",
        "2",
        "--generations",
        "5",
        "--tls-cert",
        str(tls_files / "server.pem"),
        "--tls-key",
        str(tls_files / "server.key"),
    )
    expect_refused_client(
        port, "certificate does not verify", "--tls-ca", str(tls_files / "other-ca.pem")
    )
    finish_with_honest_clients(server, port, "--tls-ca", str(tls_files / "ca.pem"))


# Poisoned updates ------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean"])
def test_robust_aggregation_ignores_one_client_scaled_by_1000(tmp_path, aggregation):
    from common.quiet_tf import keras

    server, port = start_server(
        "--out",
        str(tmp_path),
        "--min-clients",
        "5",
        "--rounds",
        "1",
        "--generations",
        "1",
        "--aggregation",
        aggregation,
    )
    sockets = []
    try:
        for i in range(5):
            sock = connect(port)
            protocol.send_message(
                sock, "echo", {"client_id": f"c{i}", "num_examples": 2}, 10
            )
            sockets.append(sock)
        honest = []
        for i, sock in enumerate(sockets):
            task = protocol.recv_message(
                sock,
                protocol.SERVER_TO_CLIENT,
                max_bytes=MAX,
                io_timeout=TIMEOUT,
                idle_timeout=TIMEOUT,
            )
            start = np.concatenate([w.ravel() for w in task.data["weights"]])
            vector = start + 0.01 * (i + 1)
            if i == 4:
                vector = 1000.0 * vector
            else:
                honest.append(vector)
            protocol.send_message(
                sock,
                "model",
                {
                    "round": 1,
                    "best_model_weights_vector": vector,
                    "num_examples": 2,
                    "metrics": {"loss": 0.0, "accuracy": 1.0},
                },
                10,
            )
        assert server.wait(TIMEOUT) == 3, server.output
    finally:
        for sock in sockets:
            sock.close()
        server.stop()

    saved = keras.models.load_model(tmp_path / "model.keras")
    result = np.concatenate([w.ravel() for w in saved.get_weights()])
    honest_mean = np.mean(honest, axis=0)
    # The honest updates differ by 0.04 at most; the poisoned one by ~1000x.
    assert np.max(np.abs(result - honest_mean)) < 0.05


# Slow and silent peers -------------------------------------------------------


def test_silent_and_stalled_peers_are_dropped_and_the_round_goes_on(tmp_path):
    server, port = start_server(
        "--out",
        str(tmp_path),
        "--rounds",
        "2",
        "--generations",
        "5",
        "--io-timeout",
        "1",
    )
    silent = connect(port)
    stalled = connect(port)
    stalled.sendall(protocol.HEADER.pack(100) + b"\x80")
    try:
        server.wait_for_line(r"dropped .*timed out waiting for a message", TIMEOUT)
        server.wait_for_line(r"dropped .*timed out in a message", TIMEOUT)
        finish_with_honest_clients(server, port)
    finally:
        silent.close()
        stalled.close()


def test_connections_beyond_the_limit_are_refused_until_one_closes(tmp_path):
    server, port = start_server("--out", str(tmp_path), "--max-connections", "2")
    try:
        first, second = connect(port), connect(port)
        # Both hold a thread, waiting for their echo: a third is refused.
        with connect(port) as third:
            expect_error(third, r"server is full \(2 connections\)")
        server.wait_for_line(r"refused .*already 2 connections", TIMEOUT)

        # Once one leaves, a newcomer gets in and is greeted. Its thread logs
        # the drop a moment before it frees the slot, so a newcomer may still
        # be refused in between: try a bounded number of times.
        first.close()
        server.wait_for_line(r"dropped .*\(before echo\)", TIMEOUT)
        for _ in range(100):
            newcomer = connect(port)
            echo = {"client_id": "late", "num_examples": 2}
            protocol.send_message(newcomer, "echo", echo, 10)
            try:
                protocol.recv_message(
                    newcomer, protocol.SERVER_TO_CLIENT, max_bytes=MAX, io_timeout=0.5
                )
            except protocol.PeerError:
                newcomer.close()
                continue
            except protocol.MessageTimeout:
                break  # admitted: it waits for a round that never comes
        server.wait_for_line(r"late joined from", TIMEOUT)
        newcomer.close()
        second.close()
    finally:
        server.stop()
