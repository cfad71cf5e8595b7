"""Local training: evolve a Keras model's weights with PyGAD on private data.

A client calls ``train_locally`` once per round. It seeds a ``KerasGA``
population around the global weights (the global weights themselves stay in
as one solution), runs ``pygad.GA`` and returns the best weights vector.

The fitness scores the whole population in one call: ``PopulationScorer``
maps ``model.stateless_call`` over the population with ``tf.vectorized_map``
inside one ``tf.function``, so a generation costs one batched forward pass
instead of one ``model.predict`` per solution. Its predictions equal the
model's own for each solution.

Nothing here is shared between threads; a scorer belongs to one model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

# isort: off
# quiet_tf must load TensorFlow before pygad.kerasga does, or it is too late to
# keep TensorFlow's start-up lines off the console.
from common.quiet_tf import keras, tf
import pygad
import pygad.kerasga

# isort: on

from common.config import GAConfig
from common.model import accuracy, cross_entropy, weights_to_vector


@dataclass(frozen=True)
class LocalResult:
    """What one client's round of local training produced."""

    best_vector: np.ndarray
    # Loss and accuracy of the best solution on the client's own data.
    loss: float
    accuracy: float
    # Loss and accuracy of the received global weights on the same data.
    initial_loss: float
    initial_accuracy: float
    fitness: float
    seconds: float

    def metrics(self) -> dict[str, float]:
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "fitness": self.fitness,
            "initial_loss": self.initial_loss,
            "initial_accuracy": self.initial_accuracy,
            "seconds": self.seconds,
        }


class PopulationScorer:
    """Predictions and losses for a whole population of weight vectors at once.

    Works for any Keras model built on the TensorFlow backend: the vector is
    cut into the model's variables (trainable and not) in ``model.weights``
    order, and ``model.stateless_call`` runs with them, so layers such as
    BatchNormalization see their moving statistics from the vector too.
    """

    def __init__(self, model: keras.Model, inputs: np.ndarray, labels: np.ndarray):
        self.model = model
        self.inputs = tf.constant(inputs, dtype=tf.float32)
        self.labels = np.asarray(labels, dtype=np.float64)
        variables = list(model.weights)
        self._shapes = [tuple(int(d) for d in v.shape) for v in variables]
        self._sizes = [int(np.prod(s)) for s in self._shapes]
        self.num_genes = sum(self._sizes)

        # Where each of stateless_call's two variable lists sits in the vector.
        position = {id(v): i for i, v in enumerate(variables)}
        self._trainable = [position[id(v)] for v in model.trainable_variables]
        self._non_trainable = [position[id(v)] for v in model.non_trainable_variables]

        self._labels = tf.constant(labels, dtype=tf.float32)
        # XLA compiles one program per batch size; batches are padded to the
        # largest size seen, so that a GA run compiles once.
        self._rows = 0
        self._compile(jit=True)

    def _compile(self, jit: bool) -> None:
        spec = [tf.TensorSpec(shape=(None, self.num_genes), dtype=tf.float32)]
        self._jit = jit
        # Concrete functions: calling them skips tf.function's argument
        # binding, which costs more than the forward pass of a small model.
        self._predict = tf.function(
            self._predict_population, input_signature=spec, jit_compile=jit
        ).get_concrete_function()
        self._losses = tf.function(
            self._loss_population, input_signature=spec, jit_compile=jit
        ).get_concrete_function()

    def _predict_population(self, population: tf.Tensor) -> tf.Tensor:
        def predict_one(vector: tf.Tensor) -> tf.Tensor:
            pieces = tf.split(vector, self._sizes)
            tensors = [
                tf.reshape(p, s) for p, s in zip(pieces, self._shapes, strict=True)
            ]
            outputs, _ = self.model.stateless_call(
                [tensors[i] for i in self._trainable],
                [tensors[i] for i in self._non_trainable],
                self.inputs,
                training=False,
            )
            return outputs

        return tf.vectorized_map(predict_one, population)

    def _loss_population(self, population: tf.Tensor) -> tf.Tensor:
        probs = tf.clip_by_value(self._predict_population(population), 1e-7, 1 - 1e-7)
        per_row = -tf.reduce_sum(self._labels * tf.math.log(probs), axis=-1)
        return tf.reduce_mean(per_row, axis=-1)

    def _run(self, name: str, population: np.ndarray) -> np.ndarray:
        population = np.atleast_2d(np.asarray(population, dtype=np.float32))
        rows = len(population)
        self._rows = max(self._rows, rows)
        padded = np.zeros((self._rows, self.num_genes), dtype=np.float32)
        padded[:rows] = population
        try:
            return getattr(self, name)(tf.constant(padded)).numpy()[:rows]
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
            if not self._jit:
                raise
            # Some layers have no XLA kernel; the plain graph is slower but
            # runs everything.
            self._compile(jit=False)
            return getattr(self, name)(tf.constant(padded)).numpy()[:rows]

    def predict(self, population: np.ndarray) -> np.ndarray:
        """Model outputs for each solution: shape (solutions, rows, outputs)."""
        return self._run("_predict", population)

    def losses(self, population: np.ndarray) -> np.ndarray:
        """Categorical cross-entropy of each solution on the data."""
        return self._run("_losses", population).astype(np.float64)

    def evaluate(self, vector: np.ndarray) -> tuple[float, float]:
        """Loss and accuracy of one weights vector on the data."""
        probs = self.predict(vector)[0].astype(np.float64)
        return cross_entropy(probs, self.labels), accuracy(probs, self.labels)


def initial_population(
    model: keras.Model, global_weights: list[np.ndarray], settings: GAConfig
) -> np.ndarray:
    """A KerasGA population around the global weights, drawn from
    ``settings.seed``; row 0 is the global weights themselves."""
    model.set_weights(global_weights)

    # KerasGA draws from numpy's global generator: seed it for this round.
    np.random.seed(settings.seed)
    keras_ga = pygad.kerasga.KerasGA(model=model, num_solutions=settings.num_solutions)
    population = np.array(keras_ga.population_weights, dtype=np.float64)

    # KerasGA perturbs by up to 1.0; scale the perturbation to init_range.
    centre = weights_to_vector(global_weights)
    return centre + settings.init_range * (population - centre)


def train_locally(
    scorer: PopulationScorer,
    global_weights: list[np.ndarray],
    settings: GAConfig,
    on_generation: Any = None,
) -> LocalResult:
    """Run one round of the GA from the global weights on the scorer's data.

    ``on_generation(generation, best_fitness)`` is called after every
    generation when given (for progress display); when it returns "stop"
    the GA ends early and the best solution so far is returned.
    """
    started = time.perf_counter()
    population = initial_population(scorer.model, global_weights, settings)
    initial_loss, initial_accuracy = scorer.evaluate(population[0])

    def fitness(ga: pygad.GA, solutions: np.ndarray, indices: Any) -> list[float]:
        # PyGAD maximises; the fitness is the negated cross-entropy.
        return list(-scorer.losses(solutions))

    def report(ga: pygad.GA) -> str | None:
        return on_generation(
            ga.generations_completed, float(np.max(ga.last_generation_fitness))
        )

    ga = pygad.GA(
        num_generations=settings.num_generations,
        num_parents_mating=settings.num_parents_mating,
        fitness_func=fitness,
        fitness_batch_size=settings.num_solutions,
        initial_population=population,
        keep_elitism=settings.keep_elitism,
        mutation_percent_genes=settings.mutation_percent_genes,
        random_mutation_min_val=-settings.mutation_range,
        random_mutation_max_val=settings.mutation_range,
        on_generation=report if on_generation else None,
        random_seed=settings.seed,
        # Fitness is the negated loss: stop once the loss is <= target_loss.
        stop_criteria=(
            f"reach_{-settings.target_loss}" if settings.target_loss > 0 else None
        ),
        suppress_warnings=True,
    )
    ga.run()
    best_vector, best_fitness, _ = ga.best_solution(ga.last_generation_fitness)
    best_vector = np.asarray(best_vector, dtype=np.float64)
    loss, acc = scorer.evaluate(best_vector)
    return LocalResult(
        best_vector=best_vector,
        loss=loss,
        accuracy=acc,
        initial_loss=initial_loss,
        initial_accuracy=initial_accuracy,
        fitness=float(best_fitness),
        seconds=time.perf_counter() - started,
    )
