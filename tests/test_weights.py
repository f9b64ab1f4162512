"""Initializers, regularizers, constraints, config round trips and keras.json, against their formulas."""
import json
import math

import numpy as np
import pytest

import tvmconv
from tvmconv import constraints, initializers, regularizers

SHAPE = (3, 3, 32, 64)  # fan_in 288, fan_out 576
FAN_IN, FAN_OUT = 288, 576

UNIFORM_LIMITS = {
    "glorot_uniform": math.sqrt(6 / (FAN_IN + FAN_OUT)),
    "he_uniform": math.sqrt(6 / FAN_IN),
    "lecun_uniform": math.sqrt(3 / FAN_IN),
    "random_uniform": 0.05,
    "uniform": 0.05,
}
NORMAL_STDDEVS = {  # (stddev of the underlying normal, truncated at 2 stddev?)
    "glorot_normal": (math.sqrt(2 / (FAN_IN + FAN_OUT)) / 0.87962566, True),
    "he_normal": (math.sqrt(2 / FAN_IN) / 0.87962566, True),
    "lecun_normal": (math.sqrt(1 / FAN_IN) / 0.87962566, True),
    "variance_scaling": (math.sqrt(1 / FAN_IN) / 0.87962566, True),
    "truncated_normal": (0.05, True),
    "random_normal": (0.05, False),
    "normal": (0.05, False),
}
TRUNCATED_VARIANCE = 0.7737413  # variance of a unit normal truncated at ±2


@pytest.mark.parametrize("name", sorted(UNIFORM_LIMITS))
def test_uniform_initializers(name):
    layer = tvmconv.Conv2D(64, 3, kernel_initializer=name)
    layer.build((None, 8, 8, 32))
    w, limit = layer.kernel, UNIFORM_LIMITS[name]
    assert w.shape == SHAPE and w.dtype == np.float32
    assert np.abs(w).max() <= limit and np.abs(w).max() > 0.98 * limit
    assert abs(w.std() - limit / math.sqrt(3)) < 0.02 * limit and abs(w.mean()) < 0.02 * limit


@pytest.mark.parametrize("name", sorted(NORMAL_STDDEVS))
def test_normal_initializers(name):
    w = initializers.get(name)(SHAPE)
    stddev, truncated = NORMAL_STDDEVS[name]
    expected_std = stddev * math.sqrt(TRUNCATED_VARIANCE) if truncated else stddev
    assert abs(w.std() - expected_std) < 0.03 * expected_std and abs(w.mean()) < 0.03 * stddev
    if truncated:
        assert np.abs(w).max() <= 2 * stddev * (1 + 1e-6)
    else:
        assert np.abs(w).max() > 2.5 * stddev


def test_variance_scaling_options():
    w = initializers.VarianceScaling(scale=2.0, mode="fan_out", distribution="uniform", seed=1)(SHAPE)
    limit = math.sqrt(3 * 2.0 / FAN_OUT)
    assert np.abs(w).max() <= limit and abs(w.std() - limit / math.sqrt(3)) < 0.02 * limit
    w = initializers.VarianceScaling(mode="fan_avg", distribution="untruncated_normal")(SHAPE)
    assert abs(w.std() - math.sqrt(2 / (FAN_IN + FAN_OUT))) < 0.03 * math.sqrt(2 / (FAN_IN + FAN_OUT))
    with pytest.raises(ValueError, match="mode"):
        initializers.VarianceScaling(mode="fan")
    with pytest.raises(ValueError, match="scale"):
        initializers.VarianceScaling(scale=0)


def test_constant_ones_zeros_and_orthogonal():
    assert (initializers.get("ones")(SHAPE) == 1).all() and (initializers.get("zeros")((4,)) == 0).all()
    assert (initializers.constant(0.25)(SHAPE) == 0.25).all()
    w = initializers.get("orthogonal")(SHAPE).reshape(-1, SHAPE[-1]).astype(np.float64)
    np.testing.assert_allclose(np.linalg.svd(w, compute_uv=False), 1.0, atol=1e-5)
    wide = initializers.Orthogonal(gain=2.0)((1, 1, 4, 8)).reshape(4, 8).astype(np.float64)
    np.testing.assert_allclose(wide @ wide.T, 4 * np.eye(4), atol=1e-5)


def test_keras_rejections_are_kept():
    with pytest.raises(ValueError, match="kernel_initializer"):
        tvmconv.Conv2D(4, 3, kernel_initializer="constant")  # no value: Keras fails on the bare name too
    with pytest.raises(ValueError, match="2D"):
        tvmconv.Conv2D(4, 3, kernel_initializer="identity").build((None, 5, 5, 3))
    with pytest.raises(ValueError, match="3-D"):
        tvmconv.Conv2D(4, 3, kernel_initializer="stft").build((None, 5, 5, 3))


def test_seeds_repeat_and_none_varies():
    a = initializers.GlorotUniform(seed=5)(SHAPE)
    np.testing.assert_array_equal(a, initializers.GlorotUniform(seed=5)(SHAPE))
    assert not np.array_equal(a, initializers.GlorotUniform(seed=6)(SHAPE))
    assert not np.array_equal(initializers.GlorotUniform()(SHAPE), initializers.GlorotUniform()(SHAPE))


def test_callable_initializer_and_bias_initializer():
    layer = tvmconv.Conv2D(4, 2, kernel_initializer=lambda shape, dtype=None: np.full(shape, 0.5),
                           bias_initializer=initializers.Constant(2.0))
    y = layer(np.ones((1, 2, 2, 3), np.float32))
    np.testing.assert_allclose(y, 0.5 * 12 + 2.0)


def test_regularizer_values_in_losses():
    rng = np.random.default_rng(0)
    kernel, bias = rng.standard_normal((3, 3, 2, 4)), rng.standard_normal(4)
    layer = tvmconv.Conv2D(4, 3, kernel_regularizer="l1", bias_regularizer=regularizers.l2(0.5),
                           activity_regularizer=regularizers.l1_l2(l1=0.1, l2=0.2))
    layer.build((None, 5, 5, 2))
    layer.set_weights([kernel, bias])
    assert layer.losses == pytest.approx([0.01 * np.abs(kernel).sum(), 0.5 * np.square(bias).sum()], rel=1e-6)
    x = rng.standard_normal((2, 5, 5, 2)).astype(np.float32)
    y = layer(x).astype(np.float64)
    activity = (0.1 * np.abs(y).sum() + 0.2 * np.square(y).sum()) / 2  # divided by the batch size
    assert layer.losses[2] == pytest.approx(activity, rel=1e-6)


def test_orthogonal_regularizer_formula_and_rank_check():
    w = np.random.default_rng(1).standard_normal((4, 6))
    rows = w / np.linalg.norm(w, axis=1, keepdims=True)
    gram = rows @ rows.T
    expected = 0.01 * 0.5 * np.abs(gram - np.diag(np.diag(gram))).sum() / (4 * 3 / 2)
    assert regularizers.get("orthogonal_regularizer", "x")(w) == pytest.approx(expected)
    layer = tvmconv.Conv2D(4, 3, kernel_regularizer="orthogonal_regularizer")
    layer.build((None, 5, 5, 2))
    with pytest.raises(ValueError, match="rank 2"):
        _ = layer.losses  # a 4-D conv kernel, as in Keras


@pytest.mark.parametrize("mode", ["rows", "columns"])
def test_orthogonal_regularizer_gradient_matches_finite_differences(mode):
    w = np.random.default_rng(3).standard_normal((4, 6))
    w[2] = 0.0  # a zero row or column: its norm is clamped, as Keras's l2_normalize does
    regularizer = regularizers.OrthogonalRegularizer(0.3, mode=mode)
    grad, eps = regularizer.gradient(w), 1e-6
    for index in np.ndindex(w.shape):
        if mode == "rows" and index[0] == 2:
            continue  # |u_i·u_j| has a kink at the zero row: no derivative to compare with
        plus, minus = w.copy(), w.copy()
        plus[index] += eps
        minus[index] -= eps
        assert grad[index] == pytest.approx((regularizer(plus) - regularizer(minus)) / (2 * eps), abs=1e-7), index
    with pytest.raises(ValueError, match="rank 2"):
        regularizer.gradient(np.zeros((3, 3, 2, 2)))


def test_constraint_formulas():
    w = np.random.default_rng(2).standard_normal((3, 3, 4, 5)).astype(np.float32)
    norms = np.sqrt((w.astype(np.float64) ** 2).sum(axis=(0, 1, 2), keepdims=True))
    np.testing.assert_allclose(constraints.max_norm(1.0, axis=[0, 1, 2])(w), w * np.minimum(norms, 1.0) / (norms + 1e-7),
                               rtol=1e-6)
    np.testing.assert_allclose(constraints.MaxNorm(1.0, axis=[0, 1, 2])(np.ones((3, 3, 4, 1), np.float32)), 1 / 6,
                               rtol=1e-6)
    np.testing.assert_allclose(constraints.get("unit_norm", "c")(w), w / (norms[..., :1, :] * 0 + np.sqrt(
        (w.astype(np.float64) ** 2).sum(axis=0, keepdims=True)) + 1e-7), rtol=1e-6)
    mm = constraints.MinMaxNorm(min_value=2.0, max_value=3.0, rate=0.5, axis=[0, 1, 2])(w)
    desired = 0.5 * np.clip(norms, 2.0, 3.0) + 0.5 * norms
    np.testing.assert_allclose(mm, w * desired / (norms + 1e-7), rtol=1e-6)
    np.testing.assert_array_equal(constraints.NonNeg()(w), np.where(w >= 0, w, 0))


def test_get_config_round_trip():
    layer = tvmconv.Conv2D(6, (3, 2), strides=(2, 1), padding="SAME", data_format="channels_first", groups=2,
                           activation="gelu", use_bias=False, kernel_initializer=initializers.HeNormal(seed=3),
                           kernel_regularizer=regularizers.L1L2(0.1, 0.2), kernel_constraint=constraints.MaxNorm(2.0),
                           dtype="float64", name="my_conv", trainable=False)
    config = layer.get_config()
    assert set(config) == {"activation", "activity_regularizer", "bias_constraint", "bias_initializer",
                           "bias_regularizer", "data_format", "dilation_rate", "dtype", "filters", "groups",
                           "kernel_constraint", "kernel_initializer", "kernel_regularizer", "kernel_size", "name",
                           "padding", "strides", "trainable", "use_bias"}
    assert config["padding"] == "same" and config["kernel_initializer"]["config"]["seed"] == 3
    clone = tvmconv.Conv2D.from_config(json.loads(json.dumps(config)))
    assert json.loads(json.dumps(clone.get_config())) == json.loads(json.dumps(config))
    x = np.random.default_rng(0).standard_normal((1, 4, 7, 5))
    layer.build(x.shape)
    clone.build(x.shape)
    np.testing.assert_array_equal(layer.kernel, clone.kernel)  # same seeded initializer
    np.testing.assert_array_equal(layer(x), clone(x))


def test_keras_json_controls_data_format_and_floatx(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert tvmconv.Conv2D(2, 1).data_format == "channels_last"  # no file: channels_last
    (tmp_path / "keras.json").write_text(json.dumps({"image_data_format": "channels_first", "floatx": "float64"}))
    layer = tvmconv.Conv2D(2, 1)
    assert layer.data_format == "channels_first" and layer.dtype == "float64"
    assert layer(np.ones((1, 3, 4, 4))).shape == (1, 2, 4, 4)
    (tmp_path / "keras.json").write_text("{not json")
    assert tvmconv.Conv2D(2, 1).data_format == "channels_last"


def test_names_weights_and_counts():
    a, b = tvmconv.Conv2D(5, 3), tvmconv.Conv2D(5, 3, name="mine")
    assert b.name == "mine" and a.name.startswith("conv2d")
    c = tvmconv.Conv2D(5, 3)
    suffix = lambda n: 0 if n == "conv2d" else int(n.rsplit("_", 1)[1])
    assert suffix(c.name) == suffix(a.name) + 1
    a.build((None, 8, 8, 4))
    assert a.count_params() == 185 and [w.shape for w in a.get_weights()] == [(3, 3, 4, 5), (5,)]
    grouped = tvmconv.Conv2D(6, 3, groups=2, use_bias=False, trainable=False)
    grouped.build((None, 8, 8, 4))
    assert [w.shape for w in grouped.weights] == [(3, 3, 2, 6)]
    assert grouped.trainable_weights == [] and len(grouped.non_trainable_weights) == 1


def test_input_shape_builds_and_weights_apply():
    kernel, bias = np.full((1, 1, 3, 2), 0.5, np.float32), np.array([1.0, -1.0], np.float32)
    layer = tvmconv.Conv2D(2, 1, input_shape=(4, 4, 3), weights=[kernel, bias])
    assert layer.built and layer.batch_input_shape == (None, 4, 4, 3)
    np.testing.assert_allclose(layer(np.ones((1, 4, 4, 3), np.float32))[0, 0, 0], [2.5, 0.5])
    assert tvmconv.Conv2D(2, 1, input_shape=(4, 4, 3), batch_size=8).batch_input_shape == (8, 4, 4, 3)


def test_weights_change_only_through_set_weights():
    layer = tvmconv.Conv2D(2, 1, kernel_initializer="ones")
    x = np.ones((1, 2, 2, 3), np.float32)
    np.testing.assert_allclose(layer(x), 3.0)
    with pytest.raises(ValueError, match="read-only"):
        layer.kernel[...] = 0.0
    kernel = layer.get_weights()[0]
    kernel[...] = 2.0  # get_weights returns copies
    np.testing.assert_allclose(layer(x), 3.0)
    layer.set_weights([kernel, np.array([1.0, -1.0])])
    np.testing.assert_allclose(layer(x)[0, 0, 0], [7.0, 5.0])
