"""Checkpoints: exact round trips, and a crash mid-write keeps the last one."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from common import checkpoint
from common.launcher import ROOT


def make_checkpoint(round_number: int, velocity: bool = False) -> checkpoint.Checkpoint:
    rng = np.random.default_rng(round_number)
    return checkpoint.Checkpoint(
        round=round_number,
        global_vector=rng.normal(size=17),
        accuracy=0.25 * round_number,
        history=[
            {"round": r, "accuracy": 0.5, "loss": 0.7, "clients": 2, "failures": 0}
            for r in range(1, round_number + 1)
        ],
        settings={"seed": 3, "aggregation": "fedavg", "ga": {"num_generations": 2}},
        velocity=rng.normal(size=17) if velocity else None,
        rng={"seed": 3, "numpy": checkpoint.numpy_rng_state()},
    )


@pytest.mark.parametrize("velocity", [False, True])
def test_a_checkpoint_round_trips_bit_for_bit(tmp_path, velocity):
    saved = make_checkpoint(2, velocity)
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    checkpoint.save(path, saved)
    loaded = checkpoint.load(path)
    assert loaded.round == 2
    assert loaded.global_vector.tobytes() == saved.global_vector.tobytes()
    assert loaded.history == saved.history
    assert loaded.settings == saved.settings
    assert loaded.rng == saved.rng
    if velocity:
        assert np.array_equal(loaded.velocity, saved.velocity)
    else:
        assert loaded.velocity is None
    assert not (tmp_path / (checkpoint.CHECKPOINT_NAME + ".tmp")).exists()


CRASH_BEFORE_RENAME = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from common import checkpoint

    # The process dies after the new checkpoint is written and synced, just
    # before the rename that would publish it.
    os.replace = lambda *args: os._exit(9)
    state = checkpoint.Checkpoint(
        round=3, global_vector=np.ones(17), accuracy=1.0, history=[], settings={}
    )
    checkpoint.save(sys.argv[1], state)
    """
)


def test_a_crash_between_write_and_rename_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    previous = make_checkpoint(2)
    checkpoint.save(path, previous)

    # A real process crashes in the middle of saving round 3.
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_BEFORE_RENAME, str(path)],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert crashed.returncode == 9, crashed.stderr
    assert (tmp_path / (checkpoint.CHECKPOINT_NAME + ".tmp")).exists()

    # The last good checkpoint is still the one that loads.
    loaded = checkpoint.load(path)
    assert loaded.round == 2
    assert np.array_equal(loaded.global_vector, previous.global_vector)

    # The next save goes through despite the leftover temporary file.
    checkpoint.save(path, make_checkpoint(3))
    assert checkpoint.load(path).round == 3


def test_a_torn_or_missing_checkpoint_is_refused_with_a_message(tmp_path):
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.load(path)
    checkpoint.save(path, make_checkpoint(2))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        checkpoint.load(path)


def test_only_settings_that_change_the_result_block_a_resume():
    saved = {"seed": 1, "rounds": 5, "ga": {"num_generations": 2}, "port": 0}
    assert checkpoint.settings_mismatch(saved, {**saved, "rounds": 9, "port": 7}) == []
    changed = {**saved, "seed": 2, "ga": {"num_generations": 3}}
    assert [
        line.split(":")[0] for line in checkpoint.settings_mismatch(saved, changed)
    ] == [
        "seed",
        "ga",
    ]


def test_resume_needs_out_and_refuses_a_checkpoint_of_other_settings(tmp_path):
    from common.config import ServerConfig, as_dict, parse_server_args
    from common.server import EXIT_BAD_SETTINGS, serve

    with pytest.raises(SystemExit) as exited:
        parse_server_args(["--resume"])
    assert exited.value.code == 2

    # A checkpoint written by a run with --seed 0, resumed with --seed 1.
    written = ServerConfig(out=tmp_path, seed=0)
    state = make_checkpoint(2)
    state.settings = as_dict(written)
    checkpoint.save(checkpoint.checkpoint_path(tmp_path), state)
    resumed = ServerConfig(out=tmp_path, seed=1, port=0, resume=True)
    assert serve(resumed) == EXIT_BAD_SETTINGS
    assert checkpoint.load(checkpoint.checkpoint_path(tmp_path)).round == 2
