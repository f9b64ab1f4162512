"""Layer outputs against the float64 numpy reference over a grid of configurations."""
import threading

import numpy as np
import pytest

import tvmconv
from tvmconv import backward, build, reference, runtime

TOLERANCE = {"float32": 1e-4, "float64": 1e-10, "float16": 2e-2}

GRID = [
    # (batch, h, w, cin, filters, kernel, strides, padding, dilation, groups)
    (1, 8, 8, 4, 6, (3, 3), (1, 1), "valid", (1, 1), 1),
    (2, 9, 7, 3, 5, (3, 3), (1, 1), "same", (1, 1), 1),
    (1, 10, 11, 4, 8, (3, 2), (2, 2), "same", (1, 1), 1),      # odd total pad, non-square kernel
    (1, 8, 8, 4, 4, (2, 2), (2, 1), "same", (1, 1), 1),
    (2, 11, 9, 6, 6, (3, 3), (2, 3), "valid", (1, 1), 1),      # stride not dividing the input
    (1, 12, 12, 4, 4, (3, 3), (1, 1), "same", (2, 2), 1),
    (1, 12, 10, 2, 3, (3, 2), (1, 1), "valid", (2, 3), 1),
    (1, 8, 8, 8, 12, (3, 3), (1, 1), "same", (1, 1), 4),        # grouped
    (1, 9, 9, 6, 6, (3, 3), (2, 2), "same", (1, 1), 6),         # depthwise
    (1, 9, 9, 4, 8, (5, 5), (1, 1), "same", (1, 1), 4),         # depthwise, channel multiplier 2
    (1, 6, 6, 16, 32, (1, 1), (1, 1), "same", (1, 1), 1),       # pointwise
    (1, 15, 15, 3, 8, (7, 7), (2, 2), "same", (1, 1), 1),       # first-layer shape
]


def _run(config, data_format, dtype="float32", activation=None, use_bias=True, seed=0):
    n, h, w, c, f, k, s, p, d, g = config
    rng = np.random.default_rng(seed)
    shape = (n, h, w, c) if data_format == "channels_last" else (n, c, h, w)
    x = rng.standard_normal(shape).astype(dtype)
    layer = tvmconv.Conv2D(f, k, strides=s, padding=p, dilation_rate=d, groups=g, data_format=data_format,
                           activation=activation, use_bias=use_bias, dtype=dtype)
    layer.build(shape)
    weights = [rng.standard_normal(layer.kernel.shape).astype(dtype)]
    if use_bias:
        weights.append(rng.standard_normal(f).astype(dtype))
    layer.set_weights(weights)
    y = layer(x)
    ref = reference.conv2d(x, weights[0], weights[1] if use_bias else None, s, p, d, g,
                           channels_last=data_format == "channels_last")
    return layer, y, ref


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("config", GRID, ids=lambda c: "x".join(map(str, c[:5])) + f"-k{c[5]}s{c[6]}{c[7]}d{c[8]}g{c[9]}")
def test_matches_reference(config, data_format):
    layer, y, ref = _run(config, data_format)
    assert y.dtype == np.float32
    assert y.shape == ref.shape == layer.compute_output_shape(_input_shape(config, data_format))
    np.testing.assert_allclose(y, ref, rtol=TOLERANCE["float32"], atol=TOLERANCE["float32"] * np.abs(ref).max())


def _input_shape(config, data_format):
    n, h, w, c = config[:4]
    return (n, h, w, c) if data_format == "channels_last" else (n, c, h, w)


@pytest.mark.parametrize("dtype", ["float64", "float16"])
@pytest.mark.parametrize("config", [GRID[2], GRID[7], GRID[8]], ids=["stride-same", "grouped", "depthwise"])
def test_other_dtypes(config, dtype):
    layer, y, ref = _run(config, "channels_last", dtype=dtype)
    assert y.dtype == np.dtype(dtype)
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=TOLERANCE[dtype],
                               atol=TOLERANCE[dtype] * np.abs(ref).max())


def test_float16_accumulates_in_float32():
    """A sum of 2048 float16 products is exact to float16 rounding only with a float32 accumulator."""
    layer = tvmconv.Conv2D(1, 1, use_bias=False, dtype="float16", kernel_initializer="ones")
    x = np.full((1, 1, 1, 2048), 1.0 + 2 ** -10, np.float16)  # float16 accumulation would stall at 2048
    y = layer(x)
    assert y[0, 0, 0, 0] == np.float16(2048 * (1.0 + 2 ** -10))


@pytest.mark.parametrize("activation", [None, "relu", "softmax"])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_without_bias(data_format, activation):
    layer, y, ref = _run(GRID[1], data_format, activation=activation, use_bias=False)
    assert len(layer.get_weights()) == 1
    ref = reference.ACTIVATIONS[activation or "linear"](ref)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_same_padding_puts_the_odd_pixel_at_the_end():
    """One-hot input, 2x2 kernel of ones, stride 1 'same': total pad 1 goes bottom/right (Keras/TF rule)."""
    x = np.zeros((1, 3, 3, 1), np.float32)
    x[0, 2, 2, 0] = 1.0
    layer = tvmconv.Conv2D(1, 2, padding="same", kernel_initializer="ones", use_bias=False)
    y = layer(x)[0, :, :, 0]
    expected = np.zeros((3, 3))
    expected[1:, 1:] = 1.0  # windows starting at rows/cols 1..2 cover the pixel (2, 2)
    np.testing.assert_array_equal(y, expected)


def test_mixed_float16_policy():
    layer = tvmconv.Conv2D(4, 3, dtype="mixed_float16")
    x = np.random.default_rng(0).standard_normal((1, 6, 6, 3)).astype(np.float32)
    y = layer(x)
    assert layer.dtype == "float32" and layer.kernel.dtype == np.float32 and y.dtype == np.float16
    ref = reference.conv2d(x.astype(np.float16), layer.kernel.astype(np.float16), layer.bias.astype(np.float16))
    np.testing.assert_allclose(y, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())


def test_nan_and_inf_propagate():
    layer = tvmconv.Conv2D(2, 1, use_bias=False, kernel_initializer="ones")
    x = np.zeros((1, 2, 2, 1), np.float32)
    x[0, 0, 0, 0], x[0, 1, 1, 0] = np.nan, np.inf
    y = layer(x)
    assert np.isnan(y[0, 0, 0]).all() and np.isposinf(y[0, 1, 1]).all() and (y[0, 0, 1] == 0).all()


def test_other_batch_and_spatial_sizes_compile_new_kernels():
    layer = tvmconv.Conv2D(4, 3, padding="same")
    rng = np.random.default_rng(0)
    for shape in [(1, 8, 8, 3), (3, 8, 8, 3), (2, 5, 9, 3)]:
        x = rng.standard_normal(shape).astype(np.float32)
        y = layer(x)
        np.testing.assert_allclose(y, reference.conv2d(x, layer.kernel, layer.bias, padding="same"),
                                   rtol=1e-4, atol=1e-5)
    assert layer.compiled_kernel((1, 8, 8, 3)).workload.batch == 1
    assert layer.compiled_kernel((3, 8, 8, 3)).workload.batch == 3


def test_accepts_dlpack_and_array_likes():
    layer = tvmconv.Conv2D(2, 2)
    x = np.arange(2 * 4 * 4 * 2, dtype=np.float32).reshape(2, 4, 4, 2)
    expected = layer(x)
    np.testing.assert_array_equal(layer(x.tolist()), expected)          # a nested list
    np.testing.assert_array_equal(layer(x[:, :, :, :]), expected)        # a view
    np.testing.assert_array_equal(layer(x.astype(np.float64)), expected)  # cast to the compute dtype
    np.testing.assert_array_equal(layer(np.asfortranarray(x)), expected)  # non-contiguous memory

    class DLPackOnly:  # a producer known only through the DLPack protocol
        def __init__(self, array):
            self._array = array

        def __dlpack__(self, **kwargs):
            return self._array.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self._array.__dlpack_device__()

    np.testing.assert_array_equal(layer(DLPackOnly(x)), expected)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_input_at_any_alignment_is_read_in_place(data_format):
    """numpy aligns large arrays to 16 bytes, not TVM's 64: kernels read such inputs without a copy."""
    layer = tvmconv.Conv2D(16, 3, padding="same", data_format=data_format)
    shape = (1, 9, 9, 8) if data_format == "channels_last" else (1, 8, 9, 9)
    storage = np.random.default_rng(0).standard_normal(int(np.prod(shape)) + 1).astype(np.float32)
    x = storage[1:].reshape(shape)  # 4 bytes past an aligned start
    assert x.ctypes.data % 64 != 0
    y = layer(x)
    kernel, bias = layer.get_weights()
    expected = reference.conv2d(x, kernel, bias, padding="same", channels_last=data_format == "channels_last")
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    assert runtime.input_argument(x) is x  # handed to the kernel as it is: tvm_ffi reads the same memory
    read_only = x.copy()
    read_only.setflags(write=False)  # numpy exports it only through DLPack 1.0: a tensor over the same memory
    assert runtime.input_argument(read_only).data_ptr() == read_only.ctypes.data


def test_outputs_are_reused_only_when_dropped():
    layer = tvmconv.Conv2D(8, 3)
    x = np.random.default_rng(0).standard_normal((1, 6, 6, 2)).astype(np.float32)
    kept = layer(x)
    again = layer(2 * x)
    assert again is not kept  # the caller still holds `kept`
    np.testing.assert_allclose(again, 2 * kept, rtol=1e-5, atol=1e-6)
    view = kept[0]
    del kept
    third = layer(3 * x)
    assert not np.shares_memory(third, view)  # a view keeps its array out of the pool
    address = third.ctypes.data
    del third
    assert layer(x).ctypes.data == address  # dropped: its memory serves the next call


def test_a_shape_called_before_follows_every_change_of_the_layer():
    """The second call of a shape takes the layer's shortcut to its forward step: weights, activation and
    activity regularizer changed after it, and inputs of another dtype, still give Keras's answer."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
    layer = tvmconv.Conv2D(4, 3, padding="same")

    def expected():
        return reference.conv2d(x.astype(np.float64), *(w.astype(np.float64) for w in layer.get_weights()),
                                padding="same")
    for _ in range(2):
        np.testing.assert_allclose(layer(x), expected(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer(x.astype(np.float64)), expected(), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="must be a real numeric array.*complex"):
        layer(x.astype(np.complex64))
    layer.set_weights([2 * w for w in layer.get_weights()])
    np.testing.assert_allclose(layer(x), expected(), rtol=1e-5, atol=1e-5)
    layer.activation = "relu"  # a named activation, compiled into the kernel
    np.testing.assert_allclose(layer(x), np.maximum(expected(), 0), rtol=1e-5, atol=1e-5)
    layer.activation = lambda t: t * t  # a Python one, applied after the kernel
    np.testing.assert_allclose(layer(x), expected() ** 2, rtol=1e-4, atol=1e-5)
    layer.activation, layer.activity_regularizer = "linear", tvmconv.keras.regularizers.L1(0.5)
    y = layer(x)
    np.testing.assert_allclose(layer.losses, [0.5 * np.abs(expected()).sum() / 2], rtol=1e-5)
    np.testing.assert_allclose(y, expected(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("handle", ["tensor", "array"])
def test_the_output_pool_keeps_each_array_with_its_handle(handle):
    """The pool hands back each array with what its runner writes through, made once: a CPU tensor over
    it, or the array itself (CUDA and RPC runners copy their result into it). Either way an array is
    reused only when nobody holds it, its handle or a view of it."""
    output_for = runtime.output_tensor if handle == "tensor" else (lambda array: array)
    made = []
    pool = runtime.OutputPool()

    def take():
        return pool.take((2, 3), "float32", lambda array: made.append(array.shape) or output_for(array))
    y, out = take()
    if handle == "tensor":
        assert out.data_ptr() == y.ctypes.data and out.shape == y.shape
    else:
        assert out is y
    address = y.ctypes.data
    del y, out
    y, out = take()
    assert y.ctypes.data == address and len(made) == 1  # dropped: reused, its handle not made again
    other, other_out = take()
    assert other.ctypes.data != address and len(made) == 2  # `y` is held
    view = other[0]
    del other, other_out
    third, _ = take()  # `y` held, `other` held through a view
    assert not np.shares_memory(third, view) and third.ctypes.data != address and len(made) == 3


def test_a_layer_called_from_many_threads_gives_each_call_its_own_output():
    """Each thread draws outputs from its own pool (no lock per call): no two calls running at once write
    the same array, and what a thread dropped serves only that thread's next call."""
    layer = tvmconv.Conv2D(6, 3, padding="same")
    inputs = [np.random.default_rng(i).standard_normal((1, 12, 12, 4)).astype(np.float32) for i in range(8)]
    layer.build(inputs[0].shape)
    kernel, bias = layer.get_weights()
    expected = [reference.conv2d(x, kernel, bias, padding="same") for x in inputs]
    wrong = []

    def work(i):
        for _ in range(50):
            y = layer(inputs[i])
            if not np.allclose(y, expected[i], rtol=1e-4, atol=1e-5):
                wrong.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not wrong
    pool, held = runtime.OutputPool(), []
    y, _ = pool.take((2, 3), "float32", runtime.output_tensor)
    address = y.ctypes.data
    del y, _
    worker = threading.Thread(target=lambda: held.append(pool.take((2, 3), "float32", runtime.output_tensor)[0]))
    worker.start()
    worker.join()
    assert held[0].ctypes.data != address  # another thread's idle array is not handed over
    assert pool.take((2, 3), "float32", runtime.output_tensor)[0].ctypes.data == address


def test_a_winograd_layer_runs_computes_its_gradients_and_exports(tmp_path):
    """A float32 channels-last 3x3 stride-1 layer of 16 channels takes Winograd F(4, 3) (its dx kernels too,
    the same shape of convolution; 11 rows: its last tiles overhang the output): forward, gradients and an
    exported bundle against float64 numpy."""
    rng = np.random.default_rng(0)
    layer = tvmconv.Conv2D(16, 3, padding="same", activation="relu")
    x = rng.standard_normal((2, 11, 12, 16)).astype(np.float32)
    y = layer(x)
    assert layer.compiled_kernel(x.shape).knobs.winograd == 4
    phases, _ = backward.input_gradient_phases(layer.workload(x.shape))
    assert [build.get_kernel(phase.workload, layer.target).knobs.winograd for phase in phases] == [4]
    kernel, bias = (w.astype(np.float64) for w in layer.get_weights())
    z = reference.conv2d(x, kernel, bias, padding="same")
    np.testing.assert_allclose(y, np.maximum(z, 0), rtol=1e-4, atol=1e-5 * np.abs(z).max())
    dy = rng.standard_normal(y.shape).astype(np.float32)
    grads = layer.gradients(x, dy)
    dz = dy * (z > 0)
    # Stride 1, "same", an odd window: dx is dz correlated with the flipped, transposed window; dW sums x's
    # shifted windows against dz.
    dx = reference.conv2d(dz, kernel[::-1, ::-1].transpose(0, 1, 3, 2), None, padding="same")
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    dw = np.stack([np.stack([np.einsum("nhwc,nhwf->cf", padded[:, i:i + 11, j:j + 12], dz) for j in range(3)])
                   for i in range(3)])
    for got, expected in ((grads["input"], dx), (grads["kernel"], dw), (grads["bias"], dz.sum(axis=(0, 1, 2)))):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    tvmconv.export(layer, x.shape, str(tmp_path / "bundle"))
    np.testing.assert_allclose(runtime.load(str(tmp_path / "bundle"))(x), y, rtol=1e-5, atol=1e-6 * np.abs(y).max())
