"""Sequential, functional Model and R's composition rule for all three kinds of `object`."""
import numpy as np
import pytest

import tvmconv
from tvmconv import layer_conv_2d, reference


def _x(shape=(3, 9, 9, 2), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_object_none_returns_the_layer():
    layer = layer_conv_2d(filters=4, kernel_size=3, padding="same", activation="relu")
    assert isinstance(layer, tvmconv.Conv2D) and layer.padding == "same"
    layer = layer_conv_2d(None, 4, 3)
    assert layer.filters == 4


def test_object_sequential_appends_and_returns_the_model():
    model = tvmconv.Sequential()
    returned = layer_conv_2d(model, 4, 3, padding="same", activation="relu",
                             input_shape=(9, 9, 2))
    assert returned is model
    layer_conv_2d(model, 6, (3, 3), strides=2)
    assert [l.filters for l in model.layers] == [4, 6]
    x = _x()
    y = model(x)
    a, b = model.layers
    expected = reference.conv2d(np.maximum(reference.conv2d(x, a.kernel, a.bias, padding="same"), 0),
                                b.kernel, b.bias, strides=(2, 2))
    assert y.shape == (3, 4, 4, 6)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.predict(x, batch_size=2), y, rtol=1e-6)


def test_object_symbolic_tensor_returns_the_output_tensor():
    inputs = tvmconv.layer_input(shape=(9, 9, 2))
    hidden = layer_conv_2d(inputs, 4, 3, padding="same", activation="relu")
    assert isinstance(hidden, tvmconv.keras.symbolic.KerasTensor) and hidden.shape == (None, 9, 9, 4)
    outputs = layer_conv_2d(hidden, 6, 3, strides=2)
    assert outputs.shape == (None, 4, 4, 6)
    model = tvmconv.Model(inputs, outputs)
    x = _x()
    a, b = model.layers
    expected = reference.conv2d(np.maximum(reference.conv2d(x, a.kernel, a.bias, padding="same"), 0),
                                b.kernel, b.bias, strides=(2, 2))
    np.testing.assert_allclose(model(x), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.predict(x, batch_size=1), expected, rtol=1e-4, atol=1e-4)


def test_functional_branches_and_shared_input():
    inputs = tvmconv.layer_input(shape=(8, 8, 3))
    left = layer_conv_2d(inputs, 2, 1)
    right = layer_conv_2d(layer_conv_2d(inputs, 4, 3, padding="same"), 2, 3, padding="same")
    model = tvmconv.Model(inputs, [left, right])
    x = _x((2, 8, 8, 3))
    out_left, out_right = model(x)
    predicted_left, predicted_right = model.predict(x, batch_size=1)
    np.testing.assert_array_equal(predicted_left, out_left)
    np.testing.assert_array_equal(predicted_right, out_right)
    l0, r0, r1 = model.layers
    np.testing.assert_allclose(out_left, reference.conv2d(x, l0.kernel, l0.bias), rtol=1e-4, atol=1e-5)
    mid = reference.conv2d(x, r0.kernel, r0.bias, padding="same")
    np.testing.assert_allclose(out_right, reference.conv2d(mid, r1.kernel, r1.bias, padding="same"),
                               rtol=1e-4, atol=1e-4)


def test_object_array_runs_the_layer():
    x = _x((1, 5, 5, 2))
    y = layer_conv_2d(x, 3, 3, kernel_initializer="ones", bias_initializer="zeros")
    np.testing.assert_allclose(y, reference.conv2d(x, np.ones((3, 3, 2, 3)), None), rtol=1e-5)


def test_bad_object_and_bad_shapes():
    with pytest.raises(TypeError, match="object"):
        layer_conv_2d(tvmconv.Conv2D(2, 1), 4, 3)
    inputs = tvmconv.layer_input(shape=(4, 4, 3))
    with pytest.raises(ValueError, match="zero or negative"):
        layer_conv_2d(inputs, 4, 5)
    model = tvmconv.Sequential([tvmconv.Conv2D(4, 3, input_shape=(4, 4, 3))])
    with pytest.raises(ValueError, match="zero or negative"):
        layer_conv_2d(model, 4, 3)  # 2x2 left after the first layer
    assert len(model.layers) == 1
    with pytest.raises(TypeError, match="Only tvmconv layers"):
        model.add("dense")
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 3"):
        model(np.ones((1, 4, 4, 5), np.float32))


def test_sequential_input_shape_batch_size_and_summary():
    model = tvmconv.Sequential(name="net")
    layer_conv_2d(model, 8, 3, padding="same", input_shape=(16, 16, 3), batch_size=4)
    layer_conv_2d(model, 4, 1)
    assert model.batch_input_shape == (4, 16, 16, 3)
    assert all(layer.built for layer in model.layers)  # built from the declared input, as Keras
    lines = []
    model.summary(print_fn=lines.append)
    text = lines[0]
    assert 'Model: "net"' in text and "(4, 16, 16, 8)" in text and "(4, 16, 16, 4)" in text
    assert "224" in text and "36" in text and "Total params: 260" in text
    assert model.count_params() == 260
    with pytest.warns(UserWarning, match="incompatible shape"):
        assert model(np.ones((1, 8, 8, 3), np.float32)).shape == (1, 8, 8, 4)


def test_sequential_batch_input_shape_and_layer_input_first():
    model = tvmconv.Sequential([tvmconv.Conv2D(2, 3, batch_input_shape=(None, 6, 6, 1))])
    assert model.layers[0].built and model.batch_input_shape == (None, 6, 6, 1)
    model = tvmconv.Sequential([tvmconv.layer_input(shape=(6, 6, 1)), tvmconv.Conv2D(2, 3)])
    assert model.layers[0].built
    unbuilt = tvmconv.Sequential([tvmconv.Conv2D(2, 3)])
    lines = []
    unbuilt.summary(print_fn=lines.append)
    assert "unbuilt" in lines[0]


def test_model_weights_round_trip():
    model = tvmconv.Sequential([tvmconv.Conv2D(4, 3, input_shape=(6, 6, 2)), tvmconv.Conv2D(2, 1, use_bias=False)])
    weights = model.get_weights()
    assert [w.shape for w in weights] == [(3, 3, 2, 4), (4,), (1, 1, 4, 2)]
    new = [np.full_like(w, 0.1) for w in weights]
    model.set_weights(new)
    np.testing.assert_array_equal(model.get_weights()[2], new[2])
    with pytest.raises(ValueError, match="expecting 3 weights"):
        model.set_weights(new[:2])
    with pytest.raises(ValueError, match="batch_size"):
        model.predict(np.ones((1, 6, 6, 2), np.float32), batch_size=0)


def test_empty_batch_gives_an_empty_output():
    model = tvmconv.Sequential([tvmconv.Conv2D(4, 3, input_shape=(6, 6, 2)), tvmconv.Conv2D(2, 1)])
    assert model.predict(np.zeros((0, 6, 6, 2), np.float32)).shape == (0, 4, 4, 2)
