"""Clients come and go, the server crashes or is stopped: real processes on
loopback.

Real clients (client1.py, client2.py) run where training must reach a
result; elsewhere ``FakeClient`` speaks the protocol from this process
without TensorFlow (it answers every model with the weights it received),
so that a test can start thirty of them or have one never reply. Tests wait
for log lines, never for a fixed time.
"""

from __future__ import annotations

import csv
import os
import random
import re
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from common import checkpoint, protocol
from common.launcher import Process, start_client, start_server

pytestmark = pytest.mark.slow

TIMEOUT = 240
# How far past its deadline a round may end on a busy machine.
MARGIN = 2.0
# Reconnect quickly and for long enough to outlast a server restart.
PATIENT = ("--retries", "10", "--retry-delay", "0.5")


def history(out: Path) -> list[dict[str, str]]:
    with open(out / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def stop_all(*processes: Process) -> None:
    for process in processes:
        process.stop()


class FakeClient:
    """One connection that speaks the protocol, without TensorFlow."""

    def __init__(self, port: int, client_id: str, greet: bool = True):
        self.client_id = client_id
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if greet:
            protocol.send_message(
                self.sock, "echo", {"client_id": client_id, "num_examples": 2}, 10
            )

    def receive(self, timeout: float = TIMEOUT) -> protocol.Message:
        return protocol.recv_message(
            self.sock,
            protocol.SERVER_TO_CLIENT,
            max_bytes=1 << 20,
            io_timeout=10,
            idle_timeout=timeout,
        )

    def reply(self, task: dict) -> None:
        """Answer with the global weights unchanged."""
        vector = np.concatenate([w.ravel() for w in task["weights"]])
        data = {
            "round": task["round"],
            "best_model_weights_vector": vector.astype(np.float64),
            "num_examples": 2,
            "metrics": {"loss": 0.5, "accuracy": 0.5},
        }
        protocol.send_message(self.sock, "model", data, 10)

    def serve_until_done(self, training_seconds: float = 0.0) -> protocol.Message:
        """Reply to every model, after ``training_seconds`` as if training;
        close and return the server's ``done``."""
        while True:
            message = self.receive()
            if message.subject == "done":
                self.close()
                return message
            time.sleep(training_seconds)
            self.reply(message.data)

    def close(self) -> None:
        self.sock.close()


def test_a_killed_client_is_a_failure_and_training_ends_once_it_is_back(tmp_path):
    """kill -9 of client2 in the middle of round 1: the server logs the
    failure, round 1 does not count (one reply, two needed), and once client2
    is started again round 1 runs again and training reaches the target."""
    # A new client's first round includes compiling its scorer (a second or
    # so), so the kill lands inside the round.
    server, port = start_server("--out", str(tmp_path))
    client1 = start_client("client1.py", port)
    client2 = start_client("client2.py", port)
    restarted = None
    try:
        # Kill client2 once it has the round's model and before it can reply.
        client2.wait_for_line(r"\[ROUND 1\] training", TIMEOUT)
        client2.popen.kill()
        server.wait_for_line(r"\[ROUND 1\] client2 failed", TIMEOUT)
        server.wait_for_line(r"\[ROUND 1\] 1 of 2 .* not counted", TIMEOUT)
        server.wait_for_line(r"waiting for 1 more client", TIMEOUT)

        # Started again, client2 takes part and training finishes.
        restarted = start_client("client2.py", port)
        assert server.wait(TIMEOUT) == 0, server.output
        assert client1.wait(60) == 0
        assert restarted.wait(60) == 0
    finally:
        stop_all(server, client1, client2, *([restarted] if restarted else []))

    assert "target accuracy reached" in server.output
    rows = history(tmp_path)
    assert [int(r["round"]) for r in rows] == list(range(1, len(rows) + 1))
    assert rows[0]["failures"] == "1"
    assert all(r["clients"] == "2" for r in rows)


def test_a_silent_client_ends_the_round_at_its_deadline_and_the_round_reruns(
    tmp_path,
):
    """With --min-fit-clients 2, a client that never replies makes round 1
    end at its deadline without counting; when it comes back and replies, the
    same round runs again. Then Ctrl-C stops the server with exit 130."""
    timeout = 3.0
    server, port = start_server(
        "--out",
        str(tmp_path),
        "--round-timeout",
        str(timeout),
        "--generations",
        "1",
    )
    steady = FakeClient(port, "steady")
    outcome: dict[str, protocol.Message] = {}
    thread = threading.Thread(
        target=lambda: outcome.update(done=steady.serve_until_done()), daemon=True
    )
    thread.start()
    silent = FakeClient(port, "silent")
    try:
        # The silent client takes the model and says nothing.
        task = silent.receive()
        received = time.monotonic()
        assert task.data["round"] == 1
        with pytest.raises(protocol.PeerError, match="round deadline"):
            silent.receive()
        waited = time.monotonic() - received
        assert waited <= timeout + MARGIN
        server.wait_for_line(r"\[ROUND 1\] silent failed", 10)
        server.wait_for_line(r"\[ROUND 1\] 1 of 2 .* not counted", 10)
        silent.close()

        # Back again and replying, it lets round 1 count.
        returned = FakeClient(port, "silent")
        returned.reply(returned.receive().data)
        server.wait_for_line(r"\[ROUND 1\] accuracy .* replies 2/2", 30)

        # Ctrl-C: done to the connected clients, a checkpoint, exit 130.
        returned.reply(returned.receive().data)
        server.popen.send_signal(signal.SIGINT)
        assert returned.serve_until_done().data["reason"] == "server stopped by SIGINT"
        assert server.wait(30) == 130, server.output
        thread.join(10)
    finally:
        stop_all(server)
        steady.close()

    assert outcome["done"].data["reason"] == "server stopped by SIGINT"
    rows = history(tmp_path)
    assert [r["round"] for r in rows][:1] == ["1"]
    assert rows[0]["failures"] == "1"
    saved = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)
    assert saved.round == len(rows)


def test_a_killed_server_resumes_and_the_clients_rejoin_by_themselves(tmp_path):
    """kill -9 of the server after round 2, then --resume on the same port and
    --out: the clients reconnect on their own, the run finishes, history has
    rounds 1..4 once each, and the result is the unbroken run's."""
    args = ("--out", str(tmp_path), "--seed", "5", "--generations", "2")
    args += ("--rounds", "4")
    server, port = start_server(*args)
    clients = [
        start_client(name, port, *PATIENT) for name in ("client1.py", "client2.py")
    ]
    resumed = None
    try:
        server.wait_for_line(r"\[ROUND 2\] accuracy", TIMEOUT)
        server.popen.kill()
        server.wait(30)

        resumed, _ = start_server(*args, "--resume", "--port", str(port))
        resumed.wait_for_line(r"resumed from the checkpoint of round [23]", 30)
        assert resumed.wait(TIMEOUT) == 3, resumed.output
        assert [c.wait(60) for c in clients] == [0, 0]
    finally:
        stop_all(server, *clients, *([resumed] if resumed else []))

    for client in clients:
        assert "lost the server" in client.output
    rows = history(tmp_path)
    assert [int(r["round"]) for r in rows] == [1, 2, 3, 4]

    # The same seed without the crash gives the same result.
    from common.config import GAConfig, ServerConfig
    from common.simulation import simulate

    unbroken = simulate(
        ServerConfig(
            seed=5, rounds=4, target_accuracy=1.0, ga=GAConfig(num_generations=2)
        )
    )
    assert unbroken.loss == pytest.approx(float(rows[-1]["loss"]), rel=1e-9)


def test_sigterm_sends_done_to_training_clients_and_stops_promptly(tmp_path):
    """SIGTERM while clients train: they stop, receive done and exit 0; the
    server writes its checkpoint and exits 143 within a few seconds."""
    server, port = start_server(
        "--out", str(tmp_path), "--generations", "1000", "--target-loss", "0"
    )
    clients = [start_client(name, port) for name in ("client1.py", "client2.py")]
    try:
        server.wait_for_line(r"\[ROUND 1\] accuracy", TIMEOUT)
        for client in clients:
            client.wait_for_line(r"\[ROUND 2\] training", 30)
        signalled = time.monotonic()
        server.popen.send_signal(signal.SIGTERM)
        assert server.wait(30) == 143, server.output
        stopped = time.monotonic() - signalled
        assert [c.wait(30) for c in clients] == [0, 0]
    finally:
        stop_all(server, *clients)

    assert stopped <= 10, stopped
    for client in clients:
        assert "server stopped by SIGTERM" in client.output
    saved = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)
    assert saved.round == len(history(tmp_path)) >= 1


def server_resources(pid: int) -> tuple[int, int]:
    """Threads and open file descriptors of a process (Linux /proc)."""
    return (
        len(os.listdir(f"/proc/{pid}/task")),
        len(os.listdir(f"/proc/{pid}/fd")),
    )


def settled_resources(pid: int, before: tuple[int, int]) -> tuple[int, int]:
    """Threads and descriptors once back to ``before``, or after 10 seconds:
    a connection thread ends within a poll of its client leaving."""
    deadline = time.monotonic() + 10
    while True:
        now = server_resources(pid)
        settled = now[0] <= before[0] and now[1] <= before[1]
        if settled or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def churn(port: int, number: int, stop: threading.Event) -> None:
    """One churning client: connect, misbehave or take part, drop, repeat."""
    rng = random.Random(number)
    while not stop.is_set():
        behaviour = rng.choice(["reply", "reply", "leave", "vanish", "mute", "rude"])
        try:
            client = FakeClient(port, f"churn{number}", greet=behaviour != "rude")
            if behaviour == "reply":
                # Take part in a round or two, then leave.
                for _ in range(rng.randint(1, 2)):
                    client.reply(client.receive(timeout=10).data)
            elif behaviour == "vanish":
                # Take the model and drop the connection mid-round.
                client.receive(timeout=10)
            elif behaviour == "mute":
                # Take the model and never answer; the deadline drops it.
                client.receive(timeout=10)
                client.receive(timeout=10)
            elif behaviour == "rude":
                # Half a frame header, then gone.
                client.sock.sendall(b"\x00\x00")
            client.close()
        except (OSError, protocol.ProtocolError):
            pass
        stop.wait(rng.uniform(0.0, 0.5))


def test_thirty_churning_clients_leak_nothing_and_every_round_keeps_its_deadline(
    tmp_path,
):
    """Thirty clients connect, take part, vanish mid-round, never answer or
    send garbage, over several rounds, beside one steady client: every round
    ends by its deadline, and afterwards the server has as many threads and
    open files as before."""
    timeout = 2.0
    server, port = start_server(
        "--out",
        str(tmp_path),
        "--min-clients",
        "1",
        "--min-fit-clients",
        "1",
        "--round-timeout",
        str(timeout),
        "--generations",
        "1",
    )
    steady = FakeClient(port, "steady")
    outcome: dict[str, protocol.Message] = {}
    thread = threading.Thread(
        target=lambda: outcome.update(done=steady.serve_until_done(0.1)),
        daemon=True,
    )
    thread.start()
    stop = threading.Event()
    churners = [
        threading.Thread(target=churn, args=(port, n, stop), daemon=True)
        for n in range(30)
    ]
    try:
        # Resources with one client connected, after a first round.
        server.wait_for_line(r"\[ROUND 1\] accuracy", 60)
        before = server_resources(server.popen.pid)

        # Churn for several rounds, then let the server settle for one more.
        for churner in churners:
            churner.start()
        server.wait_for_line(r"\[ROUND 6\] accuracy", 60)
        during = server_resources(server.popen.pid)
        stop.set()
        for churner in churners:
            churner.join(15)
        latest = max(map(int, re.findall(r"\[ROUND (\d+)\] acc", server.output)))
        server.wait_for_line(rf"\[ROUND {latest + 2}\] accuracy", 60)
        after = settled_resources(server.popen.pid, before)
        server.popen.send_signal(signal.SIGTERM)
        assert server.wait(60) == 143, server.output
        thread.join(10)
    finally:
        stop.set()
        stop_all(server)
        steady.close()

    assert "Traceback" not in server.output
    joins = len(re.findall(r"churn\d+ joined", server.output))
    assert joins >= 30
    assert after[0] <= before[0] and after[1] <= before[1], (
        f"server threads and fds before {before}, during {during}, after {after}, "
        f"after {joins} joins"
    )
    rows = history(tmp_path)
    assert [int(r["round"]) for r in rows] == list(range(1, len(rows) + 1))
    assert all(float(r["seconds"]) <= timeout + MARGIN for r in rows), rows
    assert sum(int(r["failures"]) for r in rows) > 0
    assert outcome["done"].data["reason"] == "server stopped by SIGTERM"
