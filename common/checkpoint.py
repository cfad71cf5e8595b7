"""Checkpoints: the server's state after a completed round, written atomically.

A checkpoint is one ``checkpoint.npz`` file in the run's ``--out`` folder,
rewritten after every completed round. It holds what the server needs to
continue the run as if it had never stopped:

- ``round``, the global ``accuracy`` after it and the ``history`` rows;
- the global weights vector (float64, bit for bit) and the server
  optimizer's momentum ``velocity`` (absent when momentum is off);
- the ``rng`` state: the run's seed, from which the initial weights and
  every client's GA seed are derived without any running generator, and
  numpy's global generator state for completeness;
- the ``settings`` the run started with, so that ``--resume`` can refuse
  settings that would change the result.

``write_atomically`` writes a temporary file next to the target, flushes
and fsyncs it, renames it over the target and fsyncs the folder: a crash at
any instant leaves either the old file or the new one, never a torn one.
The file is an ``.npz`` read with ``allow_pickle=False``; the scalars and
the history travel as one JSON string inside it, so loading it runs no code.

Nothing here holds state or takes a lock; only the server's main thread
writes checkpoints.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

CHECKPOINT_NAME = "checkpoint.npz"
# Bumped when the layout changes; older files are then refused with a message.
FORMAT_VERSION = 1
# Settings that change the result of a round: a resumed run must keep them.
RESULT_SETTINGS = (
    "seed",
    "aggregation",
    "server_learning_rate",
    "server_momentum",
    "ga",
)


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, or does not fit this run."""


@dataclass
class Checkpoint:
    """The server's state after round ``round``."""

    # Last completed round; the resumed run starts at round + 1.
    round: int
    # Global weights after that round, float64.
    global_vector: np.ndarray
    # Global accuracy on the truth table after that round.
    accuracy: float
    # One dict per completed round, the rows of history.csv.
    history: list[dict[str, Any]]
    # The server's settings when the checkpoint was written (plain values).
    settings: dict[str, Any]
    # ServerOptimizer momentum, or None when momentum is off or unused yet.
    velocity: np.ndarray | None = None
    # {"seed": int, "numpy": [name, keys, pos, has_gauss, cached_gaussian]}.
    rng: dict[str, Any] = field(default_factory=dict)
    # One dict per reply in a completed round, the rows of clients.csv.
    clients: list[dict[str, Any]] = field(default_factory=list)


def checkpoint_path(out: Path) -> Path:
    return Path(out) / CHECKPOINT_NAME


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` with what ``write`` writes, so that a crash at any
    moment leaves either the previous file or the complete new one."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")

    # Write the whole content to a temporary file and force it to disk.
    with open(temporary, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())

    # Swap it in, then make the rename itself durable.
    os.replace(temporary, path)
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        # Some platforms cannot open a folder; the rename is still atomic.
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def save(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically."""
    meta = {
        "format": FORMAT_VERSION,
        "round": checkpoint.round,
        "accuracy": checkpoint.accuracy,
        "history": checkpoint.history,
        "settings": checkpoint.settings,
        "rng": checkpoint.rng,
        "clients": checkpoint.clients,
    }
    arrays = {
        "meta": np.array(json.dumps(meta)),
        "global_vector": np.asarray(checkpoint.global_vector, dtype=np.float64),
    }
    if checkpoint.velocity is not None:
        arrays["velocity"] = np.asarray(checkpoint.velocity, dtype=np.float64)
    write_atomically(path, lambda handle: np.savez(handle, **arrays))


def load(path: Path) -> Checkpoint:
    """Read a checkpoint; CheckpointError says what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")

    # Read every array now, without pickle, so the file can be closed.
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        meta = json.loads(str(arrays["meta"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); "
            "start a new run with another --out"
        ) from None

    # Check the layout before trusting any field.
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {meta.get('format')!r}, "
            f"this server reads format {FORMAT_VERSION}"
        )
    return Checkpoint(
        round=int(meta["round"]),
        global_vector=arrays["global_vector"],
        accuracy=float(meta["accuracy"]),
        history=list(meta["history"]),
        settings=dict(meta["settings"]),
        velocity=arrays.get("velocity"),
        rng=dict(meta.get("rng", {})),
        clients=list(meta.get("clients", [])),
    )


def settings_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The result-changing settings that differ, as ``name: saved -> current``
    lines; empty when the run can resume with ``current``."""
    return [
        f"{name}: {saved.get(name)!r} -> {current.get(name)!r}"
        for name in RESULT_SETTINGS
        if _plain(saved.get(name)) != _plain(current.get(name))
    ]


def _plain(value: Any) -> Any:
    # JSON turns tuples into lists; compare both sides the same way.
    return json.loads(json.dumps(value))


def numpy_rng_state() -> list[Any]:
    """numpy's global generator state as JSON-friendly values."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(position), int(has_gauss), float(cached)]


def restore_numpy_rng(state: list[Any]) -> None:
    name, keys, position, has_gauss, cached = state
    np.random.set_state(
        (name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached)
    )
