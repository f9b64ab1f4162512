"""Every invalid argument: a ValueError or TypeError naming it, raised before any TVM code runs."""
import numpy as np
import pytest

import tvmconv
from tvmconv import build, targets

CONSTRUCTION_ERRORS = [
    (dict(filters=0), ValueError, "filters"),
    (dict(filters=-3), ValueError, "filters"),
    (dict(filters=2.5), ValueError, "filters"),
    (dict(filters="4"), ValueError, "filters"),
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(kernel_size=(3, -1)), ValueError, "kernel_size"),
    (dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size"),
    (dict(kernel_size=np.int64(3)), ValueError, "kernel_size"),  # Keras rejects numpy scalars too
    (dict(kernel_size=(3.0, 3)), ValueError, "kernel_size"),
    (dict(strides=(0, 1)), ValueError, "strides"),
    (dict(strides=(1,)), ValueError, "strides"),
    (dict(dilation_rate=-1), ValueError, "dilation_rate"),
    (dict(strides=2, dilation_rate=(1, 2)), ValueError, "dilation_rate"),
    (dict(groups=0), ValueError, "groups"),
    (dict(groups=3), ValueError, "groups"),  # 4 filters
    (dict(padding="causal"), ValueError, "padding"),
    (dict(padding=(1, 1)), ValueError, "padding"),
    (dict(data_format="nhwc"), ValueError, "data_format"),
    (dict(activation="foo"), ValueError, "activation"),
    (dict(activation=3), ValueError, "activation"),
    (dict(kernel_initializer="foo"), ValueError, "kernel_initializer"),
    (dict(bias_initializer="l1_l2"), ValueError, "bias_initializer"),
    (dict(kernel_regularizer="l1_l2"), ValueError, "kernel_regularizer"),  # Keras's name is "l1l2"
    (dict(bias_regularizer="foo"), ValueError, "bias_regularizer"),
    (dict(activity_regularizer=1.5), ValueError, "activity_regularizer"),
    (dict(kernel_constraint="foo"), ValueError, "kernel_constraint"),
    (dict(bias_constraint="max"), ValueError, "bias_constraint"),
    (dict(use_bias="yes"), TypeError, "use_bias"),
    (dict(trainable=None), TypeError, "trainable"),
    (dict(dtype="int32"), ValueError, "dtype"),
    (dict(dtype="bfloat16"), ValueError, "dtype"),
    (dict(name=5), TypeError, "name"),
    (dict(input_shape=(8, 8)), ValueError, "input_shape"),
    (dict(input_shape=(8, 0, 3)), ValueError, "input_shape"),
    (dict(batch_input_shape=(8, 8, 3)), ValueError, "batch_input_shape"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(weights=np.ones(3)), TypeError, "weights"),
    (dict(target="llvm -mcpu=znver1"), ValueError, "presets"),
    (dict(target=5), TypeError, "target"),
    (dict(threads=0), ValueError, "threads"),
    (dict(target={"kind": "no-such-kind"}), ValueError, "target"),
]


@pytest.mark.parametrize("kwargs,error,argument", CONSTRUCTION_ERRORS, ids=lambda v: repr(v)[:40])
def test_construction_errors_name_the_argument(kwargs, error, argument):
    args = dict(filters=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(error) as info:
        tvmconv.Conv2D(**args)
    assert argument in str(info.value) or (argument == "groups" and "groups" in str(info.value))


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="kernel_sizes"):
        tvmconv.Conv2D(4, 3, kernel_sizes=3)


CALL_ERRORS = [
    (dict(), np.ones((5, 5, 3), np.float32), ValueError, "expected ndim=4"),
    (dict(), np.ones((1, 1, 5, 5, 3), np.float32), ValueError, "expected ndim=4"),
    (dict(), np.ones((1, 5, 5, 3), np.complex64), TypeError, "dtype=complex64"),
    (dict(), np.array([[[["a"]]]]), TypeError, "dtype"),
    (dict(groups=2), np.ones((1, 5, 5, 3), np.float32), ValueError, "divisible by the number of groups"),
    (dict(kernel_size=6), np.ones((1, 5, 5, 3), np.float32), ValueError, "zero or negative"),
    (dict(kernel_size=3, dilation_rate=3), np.ones((1, 6, 9, 3), np.float32), ValueError, "zero or negative"),
]


@pytest.mark.parametrize("kwargs,x,error,match", CALL_ERRORS, ids=lambda v: repr(v)[:30])
def test_call_errors(kwargs, x, error, match, monkeypatch):
    args = dict(filters=4, kernel_size=3)
    args.update(kwargs)
    layer = tvmconv.Conv2D(**args)
    monkeypatch.setattr(build, "get_kernel", _must_not_compile)
    with pytest.raises(error, match=match):
        layer(x)


def _must_not_compile(*args, **kwargs):
    raise AssertionError("a bad input reached the compiler")


def test_channel_count_is_locked_after_the_first_call():
    layer = tvmconv.Conv2D(4, 3)
    layer(np.ones((1, 5, 5, 3), np.float32))
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 3"):
        layer(np.ones((1, 5, 5, 2), np.float32))
    channels_first = tvmconv.Conv2D(4, 3, data_format="channels_first")
    channels_first.build((None, 3, 8, 8))
    with pytest.raises(ValueError, match="expected axis 1 of input shape to have value 3"):
        channels_first(np.ones((1, 4, 8, 8), np.float32))


def test_set_weights_checks_count_and_shapes():
    layer = tvmconv.Conv2D(4, 3)
    with pytest.raises(ValueError, match="expecting 0 weights"):
        layer.set_weights([np.ones((3, 3, 3, 4))])
    layer.build((None, 8, 8, 3))
    with pytest.raises(ValueError, match="length 1, but the layer was expecting 2"):
        layer.set_weights([np.ones((3, 3, 3, 4))])
    with pytest.raises(ValueError, match=r"\(3, 3, 3, 4\) is not compatible with provided weight shape \(3, 3, 3, 5\)"):
        layer.set_weights([np.ones((3, 3, 3, 5)), np.ones(4)])
    with pytest.raises(ValueError, match=r"\(4,\) is not compatible"):
        layer.set_weights([np.ones((3, 3, 3, 4)), np.ones(5)])


def test_weights_argument_is_checked_when_the_layer_builds():
    layer = tvmconv.Conv2D(4, 3, weights=[np.ones((3, 3, 2, 4)), np.zeros(4)])
    with pytest.raises(ValueError, match="not compatible"):
        layer(np.ones((1, 5, 5, 3), np.float32))
    with pytest.raises(ValueError, match="expecting 2 weights"):
        tvmconv.Conv2D(4, 3, input_shape=(5, 5, 3), weights=[np.ones((3, 3, 3, 4))])


def test_count_params_before_build():
    with pytest.raises(ValueError, match="isn't built"):
        tvmconv.Conv2D(4, 3).count_params()


def test_kernels_for_another_cpu_are_refused_before_they_run():
    """A target whose instructions this host lacks would die with "Illegal instruction": refuse it."""
    if targets.architecture(targets.resolve(None)) == "x86_64":
        # An x86 CPU this host is not: Intel's AMX and AMD's SSE4a are never both present.
        lacking = [cpu for cpu in ("sapphirerapids", "znver4") if not targets.runnable_here(
            targets.resolve({"kind": "llvm", "mcpu": cpu}))]
        assert lacking
        layer = tvmconv.Conv2D(4, 3, target={"kind": "llvm", "mcpu": lacking[0]})
        with pytest.raises(ValueError, match="Illegal instruction"):
            layer(np.ones((1, 5, 5, 3), np.float32))
    arm = tvmconv.Conv2D(4, 3, target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"})
    with pytest.raises(ValueError, match="cannot run on this host"):
        arm(np.ones((1, 5, 5, 3), np.float32))
