"""Start the server and clients as processes on this machine, and watch them.

``make demo``, the end-to-end tests and the benchmarks all run the real
scripts this way: ``start_server`` launches ``server.py --port 0`` and waits
for its ``listening on HOST:PORT`` line to learn the port, ``start_client``
launches a client script against it, and ``Process.wait_for_line`` waits for
a log line instead of sleeping.

Each process's merged output is read by one thread into a list of lines
guarded by a condition; nothing else is shared.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on (\S+):(\d+)")


class Process:
    """A child process whose output lines are collected as they come."""

    def __init__(self, args: Sequence[str], echo: bool = False, cwd: Path = ROOT):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.args = list(args)
        self.popen = subprocess.Popen(
            self.args,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.echo = echo
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if self.echo:
                sys.stdout.write(line)
                sys.stdout.flush()
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_line(
        self, pattern: str | re.Pattern, timeout: float, count: int = 1
    ) -> re.Match:
        """The ``count``-th output line matching ``pattern``; TimeoutError when
        it has not come after ``timeout`` seconds or the process has ended."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        found = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        found += 1
                        if found == count:
                            return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                finished = not self._reader.is_alive()
                if remaining <= 0 or finished:
                    raise TimeoutError(
                        f"no line matching {regex.pattern!r} from {self.args[1:3]}; "
                        f"output so far:\n{self.output_unlocked()}"
                    )
                self._changed.wait(timeout=min(remaining, 1.0))

    def output_unlocked(self) -> str:
        return "\n".join(self.lines[-40:])

    def wait(self, timeout: float) -> int:
        """Exit status, waiting up to ``timeout`` seconds; the output is
        complete afterwards."""
        code = self.popen.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def stop(self) -> None:
        """Kill the process if it still runs."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)
        self._reader.join(timeout=5)


def python_script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / name), *args]


def start_server(
    *args: str, echo: bool = False, timeout: float = 60.0
) -> tuple[Process, int]:
    """Start ``server.py --port 0 ARGS`` and return it with its port."""
    process = Process(python_script("server.py", "--port", "0", *args), echo=echo)
    try:
        match = process.wait_for_line(LISTENING, timeout)
    except TimeoutError:
        process.stop()
        raise
    return process, int(match.group(2))


def start_client(script: str, port: int, *args: str, echo: bool = False) -> Process:
    """Start a client script against the server on ``port``."""
    return Process(python_script(script, "--port", str(port), *args), echo=echo)


def wait_for_federation(
    server: Process, clients: list[Process], timeout: float
) -> tuple[int, list[int]]:
    """The exit status of the server (waiting up to ``timeout`` seconds) and
    then of each client (a minute each: they end once the server says done).
    Every process is stopped afterwards, whatever happened."""
    try:
        server_code = server.wait(timeout)
        return server_code, [client.wait(60) for client in clients]
    finally:
        for process in (server, *clients):
            process.stop()
