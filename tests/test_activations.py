"""Every activation Keras 3 accepts, fused into the kernel, against numpy float64 formulas."""
import numpy as np
import pytest

import tvmconv
from tvmconv import reference


def _layer_and_input(activation, data_format="channels_last", dtype="float32", filters=6):
    rng = np.random.default_rng(7)
    shape = (2, 5, 6, 3) if data_format == "channels_last" else (2, 3, 5, 6)
    x = (2 * rng.standard_normal(shape)).astype(dtype)
    layer = tvmconv.Conv2D(filters, 3, padding="same", activation=activation, data_format=data_format, dtype=dtype,
                           bias_initializer=tvmconv.initializers.RandomNormal(stddev=1.0, seed=3))
    return layer, x


@pytest.mark.parametrize("name", sorted(reference.ACTIVATIONS))
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_activation_matches_formula(name, data_format):
    layer, x = _layer_and_input(name, data_format)
    y = layer(x)
    z = reference.conv2d(x, layer.kernel, layer.bias, padding="same", channels_last=data_format == "channels_last")
    expected = reference.ACTIVATIONS[name](z)  # on the last axis of the output array, as Keras
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-4 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("name", ["gelu", "selu", "softplus", "softmax", "sparsemax", "mish"])
def test_activation_in_float64(name):
    layer, x = _layer_and_input(name, dtype="float64")
    y = layer(x)
    z = reference.conv2d(x, layer.kernel, layer.bias, padding="same")
    np.testing.assert_allclose(y, reference.ACTIVATIONS[name](z), rtol=1e-9, atol=1e-9)


def test_glu_halves_the_last_axis():
    layer, x = _layer_and_input("glu", filters=4)
    assert layer(x).shape == (2, 5, 6, 2) == layer.compute_output_shape(x.shape)
    layer, x = _layer_and_input("glu", data_format="channels_first", filters=4)
    assert layer(x).shape == (2, 4, 5, 3) == layer.compute_output_shape(x.shape)  # the width halves
    with pytest.raises(ValueError, match="odd length 5"):
        layer(x[..., :5])


def test_user_callable_runs_after_the_kernel():
    layer, x = _layer_and_input(lambda t: np.square(t) - 1.0)
    y = layer(x)
    z = reference.conv2d(x, layer.kernel, layer.bias, padding="same")
    np.testing.assert_allclose(y, z ** 2 - 1.0, rtol=2e-4, atol=2e-4 * np.abs(z ** 2).max())


def test_threshold_is_accepted_but_fails_when_called_as_in_keras():
    layer = tvmconv.Conv2D(2, 1, activation="threshold")
    with pytest.raises(TypeError, match="threshold"):
        layer(np.ones((1, 2, 2, 1), np.float32))


def test_keras_function_objects_are_fused(keras):
    layer = tvmconv.Conv2D(2, 1, activation=keras.activations.relu)
    assert layer.activation == "relu"
