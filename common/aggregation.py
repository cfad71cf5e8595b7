"""Aggregators: combine the clients' weights vectors into new global weights.

Pure numpy, no I/O and no logging: vectors and example counts in, a vector
out. Every aggregator takes the updates in the order given; the server sorts
them by ``client_id`` first so that a run is reproducible.

- ``fedavg``: the mean weighted by ``num_examples`` (McMahan et al., 2017).
- ``median``: the coordinate-wise median, robust to a minority of poisoned
  updates.
- ``trimmed_mean``: the coordinate-wise mean after dropping the largest and
  smallest ``trim`` fraction of values.

``ServerOptimizer`` applies the aggregate to the global weights with a
server learning rate and momentum (FedAvgM); a learning rate of 1 and no
momentum is plain FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


def fedavg(vectors: Sequence[np.ndarray], num_examples: Sequence[int]) -> np.ndarray:
    """Average of the vectors weighted by each client's number of examples."""
    _check(vectors, num_examples)
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in vectors])
    counts = np.asarray(num_examples, dtype=np.float64)
    return (counts[:, None] * stacked).sum(axis=0) / counts.sum()


def median(vectors: Sequence[np.ndarray], num_examples: Sequence[int]) -> np.ndarray:
    """Coordinate-wise median; example counts are ignored, so a client cannot
    buy influence by claiming many examples."""
    _check(vectors, num_examples)
    return np.median(np.stack(vectors).astype(np.float64), axis=0)


def trimmed_mean(
    vectors: Sequence[np.ndarray], num_examples: Sequence[int], trim: float = 0.2
) -> np.ndarray:
    """Coordinate-wise mean of what is left after dropping ``trim`` of the
    values at each end (at least one each end when there are three or more)."""
    _check(vectors, num_examples)
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    stacked = np.sort(np.stack(vectors).astype(np.float64), axis=0)
    n = len(stacked)
    cut = int(np.floor(trim * n))
    if cut == 0 and n >= 3 and trim > 0:
        cut = 1
    return stacked[cut : n - cut].mean(axis=0)


AGGREGATORS = {"fedavg": fedavg, "median": median, "trimmed-mean": trimmed_mean}


def _check(vectors: Sequence[np.ndarray], num_examples: Sequence[int]) -> None:
    if len(vectors) == 0:
        raise ValueError("cannot aggregate zero updates")
    if len(vectors) != len(num_examples):
        raise ValueError(
            f"{len(vectors)} vectors but {len(num_examples)} example counts"
        )
    if any(n <= 0 for n in num_examples):
        raise ValueError("every num_examples must be positive")
    sizes = {np.shape(v) for v in vectors}
    if len(sizes) != 1:
        raise ValueError(f"vectors differ in shape: {sorted(sizes)}")


@dataclass
class ServerOptimizer:
    """Moves the global weights towards the aggregate of the clients.

    new = global + velocity, velocity = momentum * velocity
    + learning_rate * (aggregate - global).
    """

    # Step size on the averaged update; 1.0 lands exactly on the average.
    learning_rate: float = 1.0
    # Fraction of the previous step carried into this one; 0 disables it.
    momentum: float = 0.0
    velocity: np.ndarray | None = field(default=None, repr=False)

    def step(self, global_vector: np.ndarray, aggregate: np.ndarray) -> np.ndarray:
        update = self.learning_rate * (aggregate - global_vector)
        if self.momentum:
            if self.velocity is None:
                self.velocity = np.zeros_like(global_vector)
            self.velocity = self.momentum * self.velocity + update
            update = self.velocity
        return global_vector + update
