"""The models, and the bridge between Keras weights and GA genes.

The genetic algorithm evolves one flat vector of genes per solution; Keras
keeps a list of arrays, one per variable, in ``model.weights`` order. The
vector is those arrays flattened and concatenated in that same order, so
``vector_to_weights(weights_to_vector(w), shapes)`` gives ``w`` back.

A model travels between server and client as Keras JSON (architecture only)
plus a list of arrays. JSON from the network is checked against an allow-list
of classes before Keras sees it: a ``Lambda`` layer, or any class not named
here, would let a server run code on its clients.

The model is the built-in XOR model or a user's saved ``.keras`` file
(``load_model_file``), which passes the same allow-list first.

Importing this module imports Keras (seconds); callers that only parse
arguments or speak the protocol should not import it.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from common.quiet_tf import keras

# Classes a model from the network may use: what a dense, convolutional or
# normalised feed-forward network needs, and nothing that carries code.
ALLOWED_CLASSES = frozenset(
    {
        # Containers and plumbing.
        "Sequential",
        "Functional",
        "InputLayer",
        "DTypePolicy",
        "FloatDTypePolicy",
        "__keras_tensor__",
        # Layers.
        "Dense",
        "Activation",
        "Flatten",
        "Reshape",
        "Dropout",
        "Conv1D",
        "Conv2D",
        "MaxPooling1D",
        "MaxPooling2D",
        "AveragePooling1D",
        "AveragePooling2D",
        "GlobalAveragePooling1D",
        "GlobalAveragePooling2D",
        "BatchNormalization",
        "LayerNormalization",
        # Initializers, regularizers and constraints that Keras writes itself.
        "GlorotUniform",
        "GlorotNormal",
        "HeUniform",
        "HeNormal",
        "LecunUniform",
        "LecunNormal",
        "RandomUniform",
        "RandomNormal",
        "TruncatedNormal",
        "Zeros",
        "Ones",
        "Constant",
        "L1",
        "L2",
        "L1L2",
    }
)

ALLOWED_ACTIVATIONS = frozenset(
    {
        "linear",
        "relu",
        "sigmoid",
        "softmax",
        "tanh",
        "elu",
        "selu",
        "gelu",
        "softplus",
        "softsign",
        "swish",
        "silu",
        "leaky_relu",
        "relu6",
        "hard_sigmoid",
        "log_softmax",
    }
)


class ModelRefused(ValueError):
    """A model description from a peer uses something outside the allow-list."""


def build_xor_model(seed: int | None = None) -> keras.Model:
    """Return 2 inputs -> Dense(4, sigmoid) -> Dense(2, softmax), weights drawn
    from ``seed`` when given."""
    if seed is not None:
        keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input(shape=(2,)),
            keras.layers.Dense(4, activation="sigmoid"),
            keras.layers.Dense(2, activation="softmax"),
        ],
        name="xor",
    )


def weight_shapes(model: keras.Model) -> list[tuple[int, ...]]:
    """The shape of every variable, in ``model.weights`` order."""
    return [tuple(int(d) for d in v.shape) for v in model.weights]


def weights_to_vector(weights: list[np.ndarray]) -> np.ndarray:
    """Flatten a list of arrays into one float64 gene vector."""
    if not weights:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(w, dtype=np.float64).ravel() for w in weights])


def vector_to_weights(
    vector: np.ndarray, shapes: list[tuple[int, ...]]
) -> list[np.ndarray]:
    """Cut a gene vector back into float32 arrays of the given shapes."""
    sizes = [int(np.prod(s)) for s in shapes]
    if vector.ndim != 1 or vector.size != sum(sizes):
        raise ValueError(
            f"weights vector has shape {vector.shape}, expected ({sum(sizes)},)"
        )
    bounds = np.cumsum([0] + sizes)
    return [
        np.asarray(vector[a:b], dtype=np.float32).reshape(shape)
        for a, b, shape in zip(bounds[:-1], bounds[1:], shapes, strict=True)
    ]


def check_model_config(config: Any) -> None:
    """Raise ModelRefused unless every class and activation in a Keras model
    config is on the allow-list."""
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        class_name = node.get("class_name")
        if class_name is not None and class_name not in ALLOWED_CLASSES:
            raise ModelRefused(f"model uses class {class_name!r}, not allowed")
        module = node.get("module")
        if module is not None and module.split(".")[0] != "keras":
            raise ModelRefused(f"model refers to module {module!r}, not allowed")
        activation = node.get("activation")
        if isinstance(activation, str) and activation not in ALLOWED_ACTIVATIONS:
            raise ModelRefused(f"model uses activation {activation!r}, not allowed")
        if activation is not None and not isinstance(activation, str):
            raise ModelRefused("model activations must be given by name")
        stack.extend(node.values())


def model_from_json(text: str) -> keras.Model:
    """Rebuild a model from Keras JSON after checking it against the
    allow-list; raise ModelRefused otherwise."""
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise ModelRefused(f"model JSON does not parse: {exc}") from None
    check_model_config(config)
    with keras.saving.custom_object_scope({}):
        try:
            return keras.models.model_from_json(text)
        except Exception as exc:  # Keras raises many types for a bad config.
            raise ModelRefused(f"Keras cannot build the model: {exc}") from None


def evaluate(
    model: keras.Model, inputs: np.ndarray, labels: np.ndarray
) -> tuple[float, float]:
    """Categorical cross-entropy and accuracy of ``model`` on one-hot labels."""
    probs = np.asarray(model(inputs, training=False), dtype=np.float64)
    return cross_entropy(probs, labels), accuracy(probs, labels)


def cross_entropy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean categorical cross-entropy of probabilities against one-hot labels."""
    clipped = np.clip(probs, 1e-7, 1.0 - 1e-7)
    return float(np.mean(-np.sum(labels * np.log(clipped), axis=-1)))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose most probable class is the labelled one."""
    return float(np.mean(np.argmax(probs, axis=-1) == np.argmax(labels, axis=-1)))


def io_shapes(model: keras.Model) -> tuple[tuple[int, ...], int]:
    """The shape of one input row and the output width of a model with one
    input and one flat output; ModelRefused for any other model."""
    inputs, outputs = list(model.inputs or []), list(model.outputs or [])
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelRefused(
            f"model has {len(inputs)} input(s) and {len(outputs)} output(s); "
            "one of each is needed to train on a data file"
        )
    input_shape = tuple(inputs[0].shape[1:])
    output_shape = tuple(outputs[0].shape[1:])
    if None in input_shape or len(output_shape) != 1 or output_shape[0] is None:
        raise ModelRefused(
            f"model takes rows of shape {input_shape} and gives {output_shape}; "
            "a fixed input shape and one vector of class scores are needed"
        )
    return tuple(int(d) for d in input_shape), int(output_shape[0])


def load_model_file(path: Path) -> keras.Model:
    """A user's saved Keras model, checked against the allow-list before
    Keras builds it; ModelRefused with one line naming the file otherwise.

    Clients rebuild the model from its JSON with the same allow-list, so a
    model the server accepts here is one every client accepts too.
    """
    # A .keras file is a zip holding config.json: check it before loading.
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        reason = getattr(exc, "strerror", None) or "not a Keras .keras file"
        raise ModelRefused(f"{path}: {reason}") from None
    try:
        check_model_config(config)
    except ModelRefused as exc:
        raise ModelRefused(f"{path}: {exc}") from None

    # safe_mode refuses code in the file; compile=False skips the optimizer.
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
        model_from_json(model.to_json())
        io_shapes(model)
    except ModelRefused as exc:
        raise ModelRefused(f"{path}: {exc}") from None
    except Exception as exc:  # Keras raises many types for a bad file.
        raise ModelRefused(f"{path}: Keras cannot load it: {exc}") from None
    return model


def output_activation(model: keras.Model) -> str | None:
    """The name of the last layer's activation, when it has one."""
    activation = getattr(model.layers[-1], "activation", None) if model.layers else None
    return getattr(activation, "__name__", None)
