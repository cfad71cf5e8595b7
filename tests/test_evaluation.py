"""Federated evaluation by hand, the stopping rule, the round line, the summary
table and history.png."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from common.evaluation import Measurement, Monitor, federated_mean
from common.report import round_line, summary_table
from common.server import RoundRecord


def test_federated_metrics_are_means_weighted_by_examples():
    counts = [2, 6]
    metrics = [
        {"initial_loss": 1.0, "initial_accuracy": 0.5, "loss": 9.0},
        {"initial_loss": 3.0, "initial_accuracy": 1.0, "loss": 9.0},
    ]
    loss, accuracy = federated_mean(counts, metrics)
    # (2 * 1.0 + 6 * 3.0) / 8 and (2 * 0.5 + 6 * 1.0) / 8.
    assert loss == pytest.approx(2.5)
    assert accuracy == pytest.approx(0.875)


def test_replies_without_received_metrics_are_left_out():
    metrics = [
        {"loss": 1.0, "accuracy": 1.0},
        {"initial_loss": 2.0, "initial_accuracy": 0.25},
    ]
    assert federated_mean([5, 3], metrics) == (2.0, 0.25)
    assert federated_mean([5], [{"loss": 1.0, "accuracy": 1.0}]) is None


def measure(round_number: int, accuracy: float, loss: float) -> Measurement:
    return Measurement(round_number, accuracy, loss, np.full(2, float(round_number)))


def test_the_monitor_stops_at_the_target_and_keeps_that_model():
    monitor = Monitor(target_accuracy=0.9)
    monitor.update(measure(1, 0.5, 1.0))
    assert not monitor.reached
    monitor.update(measure(2, 0.95, 0.3))
    assert monitor.reached
    assert monitor.final().round == 2


def test_patience_stops_after_rounds_without_improvement_and_keeps_the_best():
    monitor = Monitor(target_accuracy=1.0, patience=2)
    monitor.update(measure(1, 0.6, 1.0))
    # Same accuracy, lower loss: an improvement.
    monitor.update(measure(2, 0.6, 0.8))
    monitor.update(measure(3, 0.5, 0.7))
    assert not monitor.stalled
    monitor.update(measure(4, 0.6, 0.9))
    assert monitor.stalled
    assert monitor.final().round == 2
    assert monitor.final().vector.tolist() == [2.0, 2.0]


def test_without_patience_the_monitor_never_stalls():
    monitor = Monitor(target_accuracy=1.0)
    for round_number in range(1, 20):
        monitor.update(measure(round_number, 0.5, 1.0))
    assert not monitor.stalled


def record(round_number: int, server: bool = True) -> RoundRecord:
    return RoundRecord(
        round=round_number,
        accuracy=0.75 if server else None,
        loss=0.5 if server else None,
        clients=3,
        failures=1,
        seconds=1.25,
        federated_accuracy=0.5,
        federated_loss=0.8,
    )


def test_the_round_line_names_what_the_stopping_rule_watches():
    assert round_line(record(1), 4) == (
        "accuracy 0.750 loss 0.5000, federated 0.500 loss 0.8000, "
        "replies 3/4, failures 1, 1.2s"
    )
    assert round_line(record(1, server=False), 4).startswith(
        "accuracy 0.500 loss 0.8000 (federated), replies 3/4"
    )


def test_the_summary_table_has_a_row_per_round_and_elides_long_runs():
    short = summary_table([record(n) for n in range(1, 4)])
    assert short.splitlines()[0].split() == [
        "round", "replies", "failures", "accuracy", "loss", "fed", "acc", "fed",
        "loss", "seconds",
    ]  # fmt: skip
    assert len(short.splitlines()) == 2 + 3 + 2
    long = summary_table([record(n) for n in range(1, 51)])
    assert "..." in long
    assert long.splitlines()[-2].startswith("50 round(s)")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_history_png_is_a_png_with_the_rounds_on_its_x_axis(tmp_path):
    from common.plotting import plot_history

    history = [
        {"round": n, "accuracy": a, "loss": 1 - a, "federated_accuracy": a - 0.1,
         "federated_loss": 1.1 - a}
        for n, a in [(1, 0.3), (2, 0.6), (3, 0.9)]
    ]  # fmt: skip
    clients = [
        {"round": n, "client_id": c, "fitness": -1.0 / n}
        for n in (1, 2, 3)
        for c in ("alice", "bob")
    ]
    path = tmp_path / "history.png"
    figure = plot_history(path, history, clients, target_accuracy=0.9)
    width, height = png_size(path)
    assert width >= 600 and height >= 600
    axes = figure.axes
    assert len(axes) == 3
    assert axes[-1].get_xlabel() == "round"
    ticks = [t for t in axes[-1].get_xticks() if 1 <= t <= 3]
    assert ticks == [1, 2, 3]
    labels = {t.get_text() for ax in axes for t in ax.texts}
    assert {"server", "federated", "alice", "bob", "target 0.9"} <= labels
