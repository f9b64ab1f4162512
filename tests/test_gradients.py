"""Conv2D.gradients: TVM's gradient kernels against central finite differences in float64 and against
Keras (JAX backend) through every activation with a derivative."""
import itertools

import numpy as np
import pytest

import tvmconv
from tvmconv import activations, backward

CONFIGS = {
    "same": dict(filters=6, kernel_size=3, padding="same", activation="tanh"),
    "stride2-same-groups": dict(filters=4, kernel_size=3, strides=2, padding="same", groups=2, activation="gelu"),
    "dilation-softmax": dict(filters=4, kernel_size=(3, 2), dilation_rate=2, activation="softmax"),
    "nchw-stride-glu": dict(filters=4, kernel_size=3, strides=2, data_format="channels_first", activation="glu"),
    "depthwise-log_softmax": dict(filters=4, kernel_size=3, padding="same", groups=4, activation="log_softmax"),
    "uneven-stride-sparsemax": dict(filters=5, kernel_size=2, strides=(2, 1), activation="sparsemax",
                                    use_bias=False),
    "stride3-valid-uncovered": dict(filters=3, kernel_size=2, strides=3, activation="relu"),
    "pointwise-stride2-groups": dict(filters=6, kernel_size=1, strides=2, padding="same", groups=2),
    "pointwise-fewer-filters-groups": dict(filters=2, kernel_size=1, groups=2, activation="sigmoid"),
    "pointwise-own-kernel-stride2": dict(filters=16, kernel_size=1, strides=2, activation="relu"),
    "pointwise-own-kernel": dict(filters=32, kernel_size=1, use_bias=False, activation="tanh"),
    "depthwise-stride2-valid": dict(filters=4, kernel_size=3, strides=2, groups=4),
    "valid-groups-even-kernel": dict(filters=6, kernel_size=(2, 4), groups=2, activation="elu"),
    "same-even-kernel-dilation-groups": dict(filters=4, kernel_size=2, dilation_rate=(2, 3), padding="same",
                                             groups=4, activation="silu"),
    "nchw-depthwise-multiplier-stride": dict(filters=8, kernel_size=3, strides=(1, 2), padding="same", groups=4,
                                             data_format="channels_first", use_bias=False),
}


def _input_shape(config):
    return (2, 4, 7, 9) if config.get("data_format") == "channels_first" else (2, 7, 8, 4)


def test_the_configurations_cover_every_weight_gradient_route():
    routes = {backward.weight_gradient_route(tvmconv.Conv2D(**config).workload(_input_shape(config)))
              for config in CONFIGS.values()}
    assert routes == {"depthwise", "pointwise", "matrix product", "samples as channels"}


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_match_finite_differences(name, rng):
    config = CONFIGS[name]
    layer = tvmconv.Conv2D(dtype="float64", **config)
    x = rng.standard_normal(_input_shape(config))
    layer.build(x.shape)
    dy = rng.standard_normal(layer(x).shape)
    grads = layer.gradients(x, dy)
    weights = layer.get_weights()
    eps = 1e-6

    def loss():
        return float(np.sum(layer(x) * dy))

    def numeric(array, index, restore):
        old = array[index]
        array[index] = old + eps
        restore()
        plus = loss()
        array[index] = old - eps
        restore()
        minus = loss()
        array[index] = old
        restore()
        return (plus - minus) / (2 * eps)

    for index in itertools.islice(np.ndindex(x.shape), 0, None, 7):
        assert grads["input"][index] == pytest.approx(numeric(x, index, lambda: None), abs=1e-7)
    if layer.activation in backward.FROM_OUTPUT:  # the derivative from the output: the same numbers
        from_output = layer.gradients(x, dy, output=layer(x), input_gradient=False)
        assert from_output["input"] is None
        np.testing.assert_allclose(from_output["kernel"], grads["kernel"], rtol=1e-9, atol=1e-12)
    for position, name_ in enumerate(["kernel", "bias"][:len(weights)]):
        for index in itertools.islice(np.ndindex(weights[position].shape), 0, None, 5):
            expected = numeric(weights[position], index, lambda: layer.set_weights(weights))
            assert grads[name_][index] == pytest.approx(expected, abs=1e-7), (name_, index)
    assert grads["bias"] is None if not layer.use_bias else grads["bias"].shape == (layer.filters,)


# Keras's own sparsemax is not sparsemax (README: known differences): the finite-difference test covers it.
DIFFERENTIABLE = sorted(activations.NAMES - set(activations.ALIASES) - activations.UNCALLABLE - {"sparsemax"})


@pytest.mark.parametrize("activation", DIFFERENTIABLE)
def test_gradients_match_keras(keras, activation, rng):
    import jax
    import jax.numpy as jnp
    config = dict(filters=8, kernel_size=3, strides=2, padding="same", groups=2, activation=activation)
    x = rng.standard_normal((2, 9, 8, 4)).astype(np.float32)
    layer = tvmconv.Conv2D(**config)
    layer.build(x.shape)
    kernel, bias = layer.get_weights()
    reference = keras.layers.Conv2D(**config)
    reference.build(x.shape)
    reference.set_weights([kernel, bias])
    # (Keras's compute_output_shape ignores that glu halves the last axis: take ours.)
    dy = rng.standard_normal(layer.compute_output_shape(x.shape)).astype(np.float32)

    def loss(x_, kernel_, bias_):
        y, _ = reference.stateless_call([kernel_, bias_], [], x_)
        return jnp.sum(y * dy)

    expected = jax.grad(loss, argnums=(0, 1, 2))(x, kernel, bias)
    # From the recomputed pre-activation, and (for most activations) from the output, as training does.
    ways = {"z": layer.gradients(x, dy)}
    if activation in backward.FROM_OUTPUT:
        ways["y"] = layer.gradients(x, dy, output=layer(x))
    for way, grads in ways.items():
        for got, want, name in zip((grads["input"], grads["kernel"], grads["bias"]), expected,
                                   ("input", "kernel", "bias"), strict=True):
            np.testing.assert_allclose(got, np.asarray(want), rtol=2e-4, atol=2e-4, err_msg=f"{name} from {way}")


def test_gradients_refuse_what_they_cannot_do(rng):
    layer = tvmconv.Conv2D(4, 3)
    x = rng.standard_normal((1, 6, 6, 2)).astype(np.float32)
    with pytest.raises(ValueError, match=r"output shape \(1, 4, 4, 4\).*Received shape \(1, 4, 4, 3\)"):
        layer.gradients(x, np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(NotImplementedError, match="named activation"):
        tvmconv.Conv2D(4, 3, activation=lambda v: v).gradients(x, np.zeros((1, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"`output` must be the layer's output.*Received shape \(1, 4, 4, 3\)"):
        tvmconv.Conv2D(4, 3, activation="relu").gradients(x, np.zeros((1, 4, 4, 4), np.float32),
                                                          output=np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(NotImplementedError, match="not over RPC"):
        tvmconv.Conv2D(4, 3, target="aarch64", remote="127.0.0.1:1").gradients(x, np.zeros((1, 4, 4, 4), np.float32))


def test_avx2_gradient_kernels_give_the_same_numbers(rng):
    """The AVX2 builds (8 lanes, 16 registers: Zen 1's code, runnable on any AVX2 CPU) of the phase, grouped,
    depthwise and pointwise kernels, against the float64 host build that the finite-difference test checks."""
    x = rng.standard_normal((2, 9, 8, 8)).astype(np.float32)
    for config in (dict(filters=8, kernel_size=3, strides=2, padding="same", groups=8, activation="relu"),
                   dict(filters=16, kernel_size=3, strides=2, groups=2, activation="tanh"),
                   dict(filters=16, kernel_size=1, strides=2)):
        avx2 = tvmconv.Conv2D(target="x86-avx2", **config)
        y = avx2(x)
        exact = tvmconv.Conv2D(dtype="float64", **config)
        exact.build(x.shape)
        exact.set_weights([w.astype(np.float64) for w in avx2.get_weights()])
        dy = rng.standard_normal(y.shape).astype(np.float32)
        got, want = avx2.gradients(x, dy, output=y), exact.gradients(x.astype(np.float64), dy.astype(np.float64))
        for name in ("input", "kernel", "bias"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=f"{config} {name}")


def test_gradient_options_are_checked(rng):
    layer = tvmconv.Conv2D(4, 3, activation="relu")
    x = rng.standard_normal((1, 6, 6, 2)).astype(np.float32)
    dy = np.zeros((1, 4, 4, 4), np.float32)
    with pytest.raises(ValueError, match=r"`output` must be .* a real array .*dtype=<U1"):
        layer.gradients(x, dy, output=np.full((1, 4, 4, 4), "a"))
    with pytest.raises(TypeError, match="`input_gradient` argument must be a bool"):
        layer.gradients(x, dy, input_gradient="no")
