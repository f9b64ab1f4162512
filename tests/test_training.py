"""Keras-style training: one step against Keras (JAX backend) for each optimizer, loss, regularizer and
constraint; fit learning a known kernel; frozen layers."""
import numpy as np
import pytest

import tvmconv
from tvmconv import training


def _pair(keras, rng, optimizer_args, loss, **layer_args):
    """The same two-layer model in tvmconv and in Keras, with the same weights."""
    config = [dict(filters=6, kernel_size=3, padding="same", activation="relu", **layer_args),
              dict(filters=3, kernel_size=3, strides=2, activation="tanh")]
    ours, theirs = tvmconv.Sequential(), keras.Sequential([keras.Input((9, 8, 4))])
    for c in config:
        ours.add(tvmconv.Conv2D(**c))
        theirs.add(keras.layers.Conv2D(**{k: _to_keras(keras, v) for k, v in c.items()}))
    x = rng.standard_normal((5, 9, 8, 4)).astype(np.float32)
    ours(x)
    for mine, other in zip(ours.layers, theirs.layers, strict=True):
        weights = [rng.standard_normal(w.shape).astype(np.float32) * 0.3 for w in mine.get_weights()]
        mine.set_weights(weights)
        other.set_weights(weights)
    name, kwargs = optimizer_args
    ours.compile(optimizer=getattr(training, name)(**kwargs), loss=loss)
    theirs.compile(optimizer=getattr(keras.optimizers, name)(**kwargs), loss=loss)
    y = rng.standard_normal(theirs.compute_output_shape(x.shape)).astype(np.float32)
    return ours, theirs, x, y


def _to_keras(keras, value):
    if isinstance(value, tvmconv.regularizers.Regularizer):
        return keras.regularizers.get({"class_name": type(value).__name__, "config": value.get_config()})
    if isinstance(value, tvmconv.constraints.Constraint):
        return keras.constraints.get({"class_name": type(value).__name__, "config": value.get_config()})
    return value


OPTIMIZERS = {
    "sgd": ("SGD", dict(learning_rate=0.05)),
    "sgd-nesterov": ("SGD", dict(learning_rate=0.05, momentum=0.9, nesterov=True)),
    "adam": ("Adam", dict(learning_rate=0.01)),
    "rmsprop-centered-momentum": ("RMSprop", dict(learning_rate=0.01, momentum=0.5, centered=True)),
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("loss", ["mse", "mae", "huber"])
def test_steps_match_keras(keras, rng, optimizer, loss):
    ours, theirs, x, y = _pair(keras, rng, OPTIMIZERS[optimizer], loss)
    for _ in range(3):  # several steps: the optimizers' slots must evolve as Keras's do
        mine, other = ours.train_on_batch(x, y), float(np.asarray(theirs.train_on_batch(x, y)))
        assert mine == pytest.approx(other, rel=1e-4)
    for got, want in zip(ours.get_weights(), theirs.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_callable_loss_is_differentiated_with_jax(keras, rng):
    import jax.numpy as jnp
    ours, _, x, y = _pair(keras, rng, OPTIMIZERS["sgd"], "mse")
    twin, _, _, _ = _pair(keras, np.random.default_rng(1234), OPTIMIZERS["sgd"], "mse")
    twin.compile(optimizer=training.SGD(learning_rate=0.05), loss=lambda t, p: jnp.square(p - t))
    for w_ours, layer in zip([mine.get_weights() for mine in ours.layers], twin.layers, strict=True):
        layer.set_weights(w_ours)
    assert twin.train_on_batch(x, y) == pytest.approx(ours.train_on_batch(x, y), rel=1e-5)
    for got, want in zip(twin.get_weights(), ours.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_regularizers_and_constraints_match_keras(keras, rng):
    ours, theirs, x, y = _pair(keras, rng, OPTIMIZERS["sgd"], "mse",
                               kernel_regularizer=tvmconv.regularizers.L2(0.05),
                               bias_regularizer=tvmconv.regularizers.L1(0.02),
                               activity_regularizer=tvmconv.regularizers.L2(0.01),
                               kernel_constraint=tvmconv.constraints.MaxNorm(0.8, axis=[0, 1, 2]),
                               bias_constraint=tvmconv.constraints.NonNeg())
    for _ in range(2):
        mine, other = ours.train_on_batch(x, y), float(np.asarray(theirs.train_on_batch(x, y)))
        assert mine == pytest.approx(other, rel=1e-4)
    for got, want in zip(ours.get_weights(), theirs.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.all(ours.layers[0].bias >= 0)
    assert np.all(np.sqrt(np.sum(ours.layers[0].kernel ** 2, axis=(0, 1, 2))) <= 0.8 + 1e-5)


def test_callable_regularizer_is_differentiated_with_jax(keras, rng):
    import jax.numpy as jnp
    ours, _, x, y = _pair(keras, rng, OPTIMIZERS["sgd"], "mse", kernel_regularizer=tvmconv.regularizers.L2(0.05))
    twin, _, _, _ = _pair(keras, np.random.default_rng(99), OPTIMIZERS["sgd"], "mse",
                          kernel_regularizer=lambda w: 0.05 * jnp.sum(jnp.square(w)))
    for weights, layer in zip([mine.get_weights() for mine in ours.layers], twin.layers, strict=True):
        layer.set_weights(weights)
    assert twin.train_on_batch(x, y) == pytest.approx(ours.train_on_batch(x, y), rel=1e-5)
    for got, want in zip(twin.get_weights(), ours.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    plain_numpy, _, _, _ = _pair(keras, rng, OPTIMIZERS["sgd"], "mse",
                                 kernel_regularizer=lambda w: 0.05 * float(np.sum(np.square(w))))
    with pytest.raises(ValueError, match="could not differentiate the callable regularizer"):
        plain_numpy.train_on_batch(x, y)


def test_fit_learns_a_known_kernel(rng):
    teacher = tvmconv.Conv2D(4, 3, padding="same", kernel_initializer=tvmconv.initializers.GlorotUniform(seed=1))
    x = rng.standard_normal((64, 8, 8, 3)).astype(np.float32)
    y = teacher(x)
    student = tvmconv.Sequential([tvmconv.Conv2D(4, 3, padding="same", input_shape=(8, 8, 3))])
    student.compile(optimizer=training.Adam(learning_rate=0.05), loss="mse")
    before = student.evaluate(x, y)
    history = student.fit(x, y, epochs=15, batch_size=16, validation_data=(x[:8], y[:8]), verbose=0)
    assert len(history.history["loss"]) == 15 and len(history.history["val_loss"]) == 15
    assert student.evaluate(x, y) < before / 10
    np.testing.assert_allclose(student.layers[0].kernel, teacher.kernel, atol=0.05)


def test_frozen_layer_keeps_its_weights(rng):
    model = tvmconv.Sequential()
    tvmconv.layer_conv_2d(model, 4, 3, padding="same", input_shape=(6, 6, 2), trainable=False)
    tvmconv.layer_conv_2d(model, 2, 1)
    model.compile(optimizer="sgd", loss="mse")
    frozen, trained = [w.copy() for w in model.layers[0].get_weights()], model.layers[1].kernel.copy()
    x = rng.standard_normal((4, 6, 6, 2)).astype(np.float32)
    model.train_on_batch(x, rng.standard_normal((4, 6, 6, 2)).astype(np.float32))
    for before, after in zip(frozen, model.layers[0].get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    assert not np.array_equal(trained, model.layers[1].kernel)


def test_training_arguments_are_checked(rng):
    model = tvmconv.Sequential([tvmconv.Conv2D(2, 1, input_shape=(3, 3, 1))])
    x = np.zeros((2, 3, 3, 1), np.float32)
    with pytest.raises(RuntimeError, match="compile"):
        model.fit(x, x[..., :1])
    with pytest.raises(ValueError, match="`optimizer`"):
        model.compile(optimizer="adagrad-ish", loss="mse")
    with pytest.raises(ValueError, match="`loss`"):
        model.compile(optimizer="sgd", loss="cross-entropy-ish")
    with pytest.raises(ValueError, match="`learning_rate`"):
        training.SGD(learning_rate=-1)
    with pytest.raises(ValueError, match="`momentum`"):
        training.SGD(momentum=1.5)
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="same number of samples"):
        model.fit(x, np.zeros((3, 3, 3, 2), np.float32))
    with pytest.raises(ValueError, match="`epochs`"):
        model.fit(x, np.zeros((2, 3, 3, 2), np.float32), epochs=0)


def _two_output_pair(keras, rng):
    """input → conv "trunk" (relu) → conv "left" (tanh) and conv "right", in tvmconv and in Keras."""
    configs = {"trunk": dict(filters=4, kernel_size=3, padding="same", activation="relu"),
               "left": dict(filters=3, kernel_size=3, strides=2, activation="tanh"),
               "right": dict(filters=2, kernel_size=1)}
    models = []
    for conv, input_, model in ((tvmconv.Conv2D, tvmconv.layer_input, tvmconv.Model),
                                (keras.layers.Conv2D, keras.Input, keras.Model)):
        inputs = input_((7, 8, 3))
        layers = {name: conv(name=name, **config) for name, config in configs.items()}
        trunk = layers["trunk"](inputs)
        models.append(model(inputs, [layers["left"](trunk), layers["right"](trunk)]))
    ours, theirs = models
    for name in configs:
        weights = [rng.standard_normal(w.shape).astype(np.float32) * 0.3
                   for w in theirs.get_layer(name).get_weights()]
        next(layer for layer in ours.layers if layer.name == name).set_weights(weights)
        theirs.get_layer(name).set_weights(weights)
    x = rng.standard_normal((4, 7, 8, 3)).astype(np.float32)
    ys = [rng.standard_normal(shape).astype(np.float32) for shape in ((4, 3, 3, 3), (4, 7, 8, 2))]
    return ours, theirs, x, ys


def test_two_outputs_with_weighted_losses_match_keras(keras, rng):
    ours, theirs, x, ys = _two_output_pair(keras, rng)
    ours.compile(optimizer=training.Adam(learning_rate=0.01), loss={"left": "mse", "right": "mae"},
                 loss_weights=[1.0, 0.5])
    theirs.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01), loss=["mse", "mae"], loss_weights=[1.0, 0.5])
    for _ in range(2):
        mine, other = ours.train_on_batch(x, ys), theirs.train_on_batch(x, ys)
        np.testing.assert_allclose(mine, np.asarray(other, np.float64), rtol=1e-4)  # [total, left, right]
    for name in ("trunk", "left", "right"):
        got = next(layer for layer in ours.layers if layer.name == name).get_weights()
        for mine, other in zip(got, theirs.get_layer(name).get_weights(), strict=True):
            np.testing.assert_allclose(mine, other, rtol=1e-4, atol=1e-5)
    history = ours.fit(x, ys, epochs=2, batch_size=2, validation_data=(x, ys), verbose=0)
    assert sorted(history.history) == ["left_loss", "loss", "right_loss", "val_left_loss", "val_loss",
                                       "val_right_loss"]
    total, left, right = ours.evaluate(x, ys)
    assert total == pytest.approx(left + 0.5 * right, rel=1e-6)


def test_output_losses_are_checked(keras, rng):
    ours, _, x, ys = _two_output_pair(keras, rng)
    with pytest.raises(ValueError, match="`loss`"):
        ours.compile(optimizer="sgd", loss=["mse", "cross-entropy-ish"])
    ours.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="one target per output: the model has 2 outputs"):
        ours.train_on_batch(x, ys[0])
    ours.compile(optimizer="sgd", loss=["mse"])
    with pytest.raises(ValueError, match=r"`loss` must have one entry per output \(2"):
        ours.train_on_batch(x, ys)
    ours.compile(optimizer="sgd", loss={"left": "mse", "middle": "mae"})
    with pytest.raises(ValueError, match="`loss` keys must be the output layers' names"):
        ours.train_on_batch(x, ys)
    ours.compile(optimizer="sgd", loss="mse", loss_weights=[1.0, float("nan")])
    with pytest.raises(ValueError, match="`loss_weights` must be a finite number"):
        ours.train_on_batch(x, ys)
