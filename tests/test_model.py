"""Model JSON from the network: the allow-list and the weights layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.model import (
    ModelRefused,
    build_xor_model,
    model_from_json,
    vector_to_weights,
    weight_shapes,
    weights_to_vector,
)
from common.quiet_tf import keras


def test_the_xor_model_has_the_documented_architecture():
    model = build_xor_model(seed=0)
    assert weight_shapes(model) == [(2, 4), (4,), (4, 2), (2,)]
    assert [layer.activation.__name__ for layer in model.layers] == [
        "sigmoid",
        "softmax",
    ]


def test_vector_and_weights_round_trip():
    model = build_xor_model(seed=0)
    weights = model.get_weights()
    back = vector_to_weights(weights_to_vector(weights), weight_shapes(model))
    for a, b in zip(weights, back, strict=True):
        assert np.array_equal(a, b)


def test_a_vector_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match=r"expected \(22,\)"):
        vector_to_weights(np.zeros(21), weight_shapes(build_xor_model(seed=0)))


def test_the_xor_model_json_is_accepted_and_rebuilt():
    model = build_xor_model(seed=0)
    rebuilt = model_from_json(model.to_json())
    assert weight_shapes(rebuilt) == weight_shapes(model)


def lambda_model_json() -> str:
    model = keras.Sequential(
        [keras.Input(shape=(2,)), keras.layers.Lambda(lambda x: x * 2)]
    )
    return model.to_json()


def test_a_lambda_layer_is_refused():
    with pytest.raises(ModelRefused, match="'Lambda'"):
        model_from_json(lambda_model_json())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["config"]["layers"][1].update(class_name="Evil"), "'Evil'"),
        (lambda c: c["config"]["layers"][1].update(module="os"), "module 'os'"),
        (
            lambda c: c["config"]["layers"][1]["config"].update(activation="exec"),
            "activation 'exec'",
        ),
    ],
)
def test_unknown_classes_modules_and_activations_are_refused(edit, message):
    config = json.loads(build_xor_model(seed=0).to_json())
    edit(config)
    with pytest.raises(ModelRefused, match=message):
        model_from_json(json.dumps(config))


def test_json_that_does_not_parse_is_refused():
    with pytest.raises(ModelRefused, match="does not parse"):
        model_from_json("{not json")
