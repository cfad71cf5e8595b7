"""How well the global model does, round by round, and when to stop.

Two measurements of the global model:

- the server's own, on held-out examples it holds (``--eval-data``; the truth
  table for the built-in XOR model), of the model after the round's
  aggregation;
- the federated one: every client reports the loss and accuracy of the
  global model it received at the start of the round (``initial_loss`` and
  ``initial_accuracy`` in its reply's metrics) on its own examples, and
  ``federated_mean`` weights them by the clients' numbers of examples. It
  therefore describes the model before the round's aggregation.

``Monitor`` applies the stopping rule to whichever measurement the server
uses (its own when it has eval data, the federated one otherwise): stop when
the accuracy reaches the target, or after ``patience`` rounds without
improvement. It keeps the best measured model, which is the one the server
saves at the end.

XXX: the federated evaluation trusts what the clients report. A client that
claims a high accuracy can end a run early, or hold the best-model choice;
robust aggregation does not guard against it. When that matters, give the
server eval data of its own: the stopping rule then ignores the reports.

Pure numpy, no I/O and no logging; the server's main thread owns a Monitor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# The reply metrics that describe the received global model.
RECEIVED_LOSS = "initial_loss"
RECEIVED_ACCURACY = "initial_accuracy"


@dataclass(frozen=True)
class Measurement:
    """Loss and accuracy of one global model, and which model it was."""

    # The round whose history row holds the measurement.
    round: int
    accuracy: float
    loss: float
    # The global weights measured.
    vector: np.ndarray

    def beats(self, other: Measurement | None) -> bool:
        """Better than ``other``: a higher accuracy, or the same accuracy
        with a lower loss."""
        if other is None:
            return True
        if self.accuracy != other.accuracy:
            return self.accuracy > other.accuracy
        return self.loss < other.loss


def federated_mean(
    num_examples: Sequence[int], metrics: Sequence[Mapping[str, float]]
) -> tuple[float, float] | None:
    """Loss and accuracy of the received model over all the clients'
    examples: the means of their reports weighted by their numbers of
    examples. Clients that report neither are left out; None when none
    reports."""
    counts, losses, accuracies = [], [], []
    for count, reported in zip(num_examples, metrics, strict=True):
        if RECEIVED_LOSS in reported and RECEIVED_ACCURACY in reported:
            counts.append(count)
            losses.append(reported[RECEIVED_LOSS])
            accuracies.append(reported[RECEIVED_ACCURACY])
    if not counts:
        return None
    weights = np.asarray(counts, dtype=np.float64)
    return (
        float(np.average(losses, weights=weights)),
        float(np.average(accuracies, weights=weights)),
    )


class Monitor:
    """The stopping rule: target accuracy, or patience without improvement."""

    def __init__(self, target_accuracy: float, patience: int | None = None):
        self.target_accuracy = target_accuracy
        self.patience = patience
        self.best: Measurement | None = None
        self.latest: Measurement | None = None
        # Measurements since the best one.
        self.since_best = 0

    def update(self, measurement: Measurement | None) -> None:
        """Take one round's measurement (None: nothing was measured)."""
        if measurement is None:
            self.since_best += 1
            return
        self.latest = measurement
        if measurement.beats(self.best):
            self.best = measurement
            self.since_best = 0
        else:
            self.since_best += 1

    @property
    def reached(self) -> bool:
        """The latest measurement reached the target accuracy."""
        return self.latest is not None and self.latest.accuracy >= self.target_accuracy

    @property
    def stalled(self) -> bool:
        """``patience`` rounds have passed without improvement."""
        return self.patience is not None and self.since_best >= self.patience

    def final(self) -> Measurement | None:
        """The model to keep: the one that reached the target, else the best
        measured."""
        return self.latest if self.reached else self.best
