"""Aggregators on small cases computed by hand."""

import numpy as np
import pytest

from common.aggregation import ServerOptimizer, fedavg, median, trimmed_mean


def test_fedavg_weights_by_num_examples():
    vectors = [np.array([1.0, 2.0]), np.array([4.0, 8.0])]
    # (1*1 + 2*4) / 3 = 3, (1*2 + 2*8) / 3 = 6
    assert np.array_equal(fedavg(vectors, [1, 2]), [3.0, 6.0])


def test_fedavg_of_equal_counts_is_the_mean():
    vectors = [np.array([0.0, -2.0, 5.0]), np.array([2.0, 2.0, 1.0])]
    assert np.array_equal(fedavg(vectors, [7, 7]), [1.0, 0.0, 3.0])


def test_fedavg_of_one_update_is_that_update():
    vector = np.array([0.25, -0.5])
    assert np.array_equal(fedavg([vector], [3]), vector)


def test_median_ignores_one_outlier():
    vectors = [np.array([1.0]), np.array([2.0]), np.array([1000.0])]
    assert median(vectors, [1, 1, 1])[0] == 2.0


def test_trimmed_mean_drops_each_end():
    vectors = [np.array([v]) for v in (-100.0, 1.0, 2.0, 3.0, 100.0)]
    assert trimmed_mean(vectors, [1] * 5, trim=0.2)[0] == 2.0


@pytest.mark.parametrize(
    "vectors, counts, message",
    [
        ([], [], "zero updates"),
        ([np.zeros(2)], [1, 2], "example counts"),
        ([np.zeros(2)], [0], "positive"),
        ([np.zeros(2), np.zeros(3)], [1, 1], "differ in shape"),
    ],
)
def test_fedavg_refuses_inconsistent_input(vectors, counts, message):
    with pytest.raises(ValueError, match=message):
        fedavg(vectors, counts)


def test_server_optimizer_defaults_land_on_the_aggregate():
    optimizer = ServerOptimizer()
    assert np.array_equal(optimizer.step(np.zeros(2), np.array([1.0, -1.0])), [1, -1])


def test_server_optimizer_momentum_accumulates():
    optimizer = ServerOptimizer(learning_rate=0.5, momentum=0.5)
    # First step: 0.5 * (2 - 0) = 1. Second: 0.5 * 1 + 0.5 * (2 - 1) = 1.
    first = optimizer.step(np.zeros(1), np.array([2.0]))
    second = optimizer.step(first, np.array([2.0]))
    assert first[0] == 1.0 and second[0] == 2.0
