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
