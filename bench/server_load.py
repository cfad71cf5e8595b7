"""The server's cost per round with many concurrent protocol clients.

Each fake client is a thread with its own loopback connection: it says echo,
and answers every ``model`` at once with the weights it received, so the
measured round time is the server's own work (encoding, sending, reading,
checking, aggregating, evaluating, writing the history) with no training in
it.
"""

from __future__ import annotations

import csv
import re
import socket
import statistics
import threading
from pathlib import Path

import numpy as np

from common import protocol
from common.launcher import start_server

ROUNDS = 3
TIMEOUT = 300.0


def fake_client(port: int, client_id: str, failures: list[str]) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            protocol.send_message(
                sock, "echo", {"client_id": client_id, "num_examples": 1}, TIMEOUT
            )
            while True:
                message = protocol.recv_message(
                    sock,
                    protocol.SERVER_TO_CLIENT,
                    max_bytes=1 << 20,
                    io_timeout=TIMEOUT,
                    idle_timeout=TIMEOUT,
                )
                if message.subject == "done":
                    return
                vector = np.concatenate([w.ravel() for w in message.data["weights"]])
                reply = {
                    "round": message.data["round"],
                    "best_model_weights_vector": vector.astype(np.float64),
                    "num_examples": 1,
                    "metrics": {"loss": 0.0},
                }
                protocol.send_message(sock, "model", reply, TIMEOUT)
    except (OSError, protocol.ProtocolError) as exc:
        failures.append(f"{client_id}: {exc}")


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))


def measure(count: int, out: Path) -> tuple[float, float]:
    """Median seconds per round and resident KiB per connected client."""
    server, port = start_server(
        "--out",
        str(out),
        "--min-clients",
        str(count),
        "--rounds",
        str(ROUNDS),
        "--generations",
        "1",
    )
    try:
        server.wait_for_line(r"waiting for", TIMEOUT)
        before = rss_kib(server.popen.pid)
        failures: list[str] = []
        threads = [
            threading.Thread(target=fake_client, args=(port, f"c{i:04d}", failures))
            for i in range(count)
        ]
        for thread in threads:
            thread.start()
        server.wait_for_line(r" joined from ", TIMEOUT, count=count)
        per_client = (rss_kib(server.popen.pid) - before) / count
        server.wait(TIMEOUT)
        for thread in threads:
            thread.join(TIMEOUT)
        if failures:
            raise RuntimeError(f"{len(failures)} fake clients failed: {failures[:3]}")
    finally:
        server.stop()
    with open(out / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert all(int(r["clients"]) == count for r in rows), rows
    return statistics.median(float(r["seconds"]) for r in rows), per_client


def measure_server_rounds(counts: tuple[int, ...], out: Path) -> dict:
    seconds, kib = {}, {}
    for count in counts:
        seconds[str(count)], kib[str(count)] = measure(count, out / str(count))
    return {"seconds": seconds, "kib_per_client": kib}
