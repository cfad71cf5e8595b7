"""The batched population fitness and one round of local training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pygad.kerasga
import pytest

from common.config import GAConfig
from common.data import CLIENT1_INPUTS, CLIENT1_LABELS, XOR_INPUTS, XOR_LABELS
from common.model import build_xor_model, weights_to_vector
from common.quiet_tf import keras
from common.training import PopulationScorer, initial_population, train_locally

SMALL = GAConfig(num_generations=20, num_solutions=6, num_parents_mating=2, seed=7)


def per_solution_predictions(model, population, inputs):
    return np.stack([pygad.kerasga.predict(model, s, inputs) for s in population])


def test_weights_vector_matches_kerasga_layout():
    model = build_xor_model(seed=1)
    ours = weights_to_vector(model.get_weights())
    assert np.array_equal(ours, pygad.kerasga.model_weights_as_vector(model))


def test_batched_predictions_equal_per_solution_predictions_on_xor():
    model = build_xor_model(seed=1)
    population = initial_population(model, model.get_weights(), SMALL)
    scorer = PopulationScorer(model, XOR_INPUTS, XOR_LABELS)
    expected = per_solution_predictions(model, population, XOR_INPUTS)
    np.testing.assert_allclose(scorer.predict(population), expected, atol=1e-6)


def conv_bn_model() -> keras.Model:
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input(shape=(6, 6, 1)),
            keras.layers.Conv2D(3, 3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def test_batched_predictions_equal_per_solution_for_conv_and_batchnorm():
    model = conv_bn_model()
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(5, 6, 6, 1)).astype(np.float32)
    labels = np.eye(3, dtype=np.float32)[rng.integers(0, 3, size=5)]
    centre = weights_to_vector(model.get_weights())
    # Keep the BatchNormalization variance positive: perturb, then take abs
    # of every gene (the layer's weights are all near 1 or 0 at init).
    population = np.abs(centre + rng.normal(scale=0.3, size=(8, centre.size)))

    scorer = PopulationScorer(model, inputs, labels)
    expected = per_solution_predictions(model, population, inputs)
    np.testing.assert_allclose(scorer.predict(population), expected, atol=1e-5)


def test_losses_are_the_cross_entropy_of_the_predictions():
    model = build_xor_model(seed=2)
    scorer = PopulationScorer(model, XOR_INPUTS, XOR_LABELS)
    vector = weights_to_vector(model.get_weights())
    probs = np.asarray(model(XOR_INPUTS), dtype=np.float64)
    expected = np.mean(-np.sum(XOR_LABELS * np.log(probs), axis=1))
    assert scorer.losses(vector[None, :])[0] == pytest.approx(expected, rel=1e-5)


def test_initial_population_keeps_the_global_weights_and_follows_the_seed():
    model = build_xor_model(seed=1)
    weights = model.get_weights()
    first = initial_population(model, weights, SMALL)
    again = initial_population(model, weights, SMALL)
    other = initial_population(model, weights, dataclasses.replace(SMALL, seed=8))
    assert np.array_equal(first[0], weights_to_vector(weights))
    assert first.shape == (SMALL.num_solutions, first.shape[1])
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_local_training_improves_local_loss_and_is_reproducible():
    model = build_xor_model(seed=1)
    scorer = PopulationScorer(model, CLIENT1_INPUTS, CLIENT1_LABELS)
    result = train_locally(scorer, model.get_weights(), SMALL)
    again = train_locally(scorer, model.get_weights(), SMALL)
    assert result.loss < result.initial_loss
    assert result.accuracy == 1.0
    assert np.array_equal(result.best_vector, again.best_vector)
    assert result.fitness == pytest.approx(-result.loss, rel=1e-5)
