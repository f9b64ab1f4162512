"""Every array a Keras user holds is an input: read-only numpy arrays, JAX arrays, torch tensors (with or without
requires_grad), anything with __array__ or __dlpack__, to a layer's call, gradients and set_weights and to a
model's predict, evaluate and fit; each against float64 numpy."""
import numpy as np
import pytest

import tvmconv
from tvmconv import reference, runtime
from tvmconv.keras.arrays import to_array
from tvmconv.training import SGD

SHAPE = (2, 5, 5, 3)


class ArrayOnly:
    """Anything with __array__ (and nothing else)."""

    def __init__(self, array):
        self._array = array

    def __array__(self, dtype=None, copy=None):
        return self._array if dtype is None else self._array.astype(dtype)


class DLPackOnly:
    """A DLPack producer that is no known array type, over read-only memory."""

    def __init__(self, array, device=(1, 0)):
        self._array, self._device = array, device

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._device


def read_only(array):
    array = array.copy()
    array.setflags(write=False)
    return array


def memory_mapped(array, folder):
    np.save(folder / "array.npy", array)
    return np.load(folder / "array.npy", mmap_mode="r")


KINDS = {
    "np.load(mmap_mode='r')": memory_mapped,
    "np.frombuffer": lambda a, _: np.frombuffer(a.tobytes(), a.dtype).reshape(a.shape),
    "setflags(write=False)": lambda a, _: read_only(a),
    "a strided read-only view": lambda a, _: read_only(np.repeat(a, 2, axis=-1))[..., ::2],
    "jax": lambda a, _: pytest.importorskip("jax.numpy", reason="JAX is a test extra").asarray(a),
    "torch": lambda a, _: pytest.importorskip("torch", reason="PyTorch is in the bench extra").from_numpy(a.copy()),
    "torch, requires_grad": lambda a, _: pytest.importorskip("torch", reason="PyTorch is in the bench extra").tensor(
        a, requires_grad=True),
    "__array__ only": lambda a, _: ArrayOnly(a),
    "__dlpack__ only": lambda a, _: DLPackOnly(read_only(a)),
}


@pytest.fixture(params=KINDS)
def kind(request, tmp_path):
    """Turns a float32 numpy array into this kind of array (each call in its own folder, for memory maps)."""
    count = iter(range(100))

    def convert(array):
        folder = tmp_path / str(next(count))
        folder.mkdir()
        return KINDS[request.param](np.asarray(array, np.float32), folder)
    return convert


def forward(x, kernel, bias):
    """relu(conv(x, kernel) + bias) in float64."""
    return np.maximum(reference.conv2d(x, kernel, bias), 0)


def reference_gradients(x, kernel, bias, dy):
    """dL/dx, dL/dkernel, dL/dbias of L = sum(relu(conv(x, kernel) + bias) * dy) in float64: exact sums over unit
    arrays, the convolution being linear in x and in its kernel."""
    dz = dy * (reference.conv2d(x, kernel, bias) > 0)

    def gradient(shape, conv):
        out = np.zeros(shape)
        for index in np.ndindex(shape):
            unit = np.zeros(shape)
            unit[index] = 1
            out[index] = np.sum(conv(unit) * dz)
        return out
    return (gradient(x.shape, lambda unit: reference.conv2d(unit, kernel, None)),
            gradient(kernel.shape, lambda unit: reference.conv2d(x, unit, None)), dz.sum(axis=(0, 1, 2)))


@pytest.fixture
def values(rng):
    """x, kernel, bias and an output gradient, as float32 numpy arrays."""
    return (rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal((3, 3, 3, 4)).astype(np.float32),
            rng.standard_normal(4).astype(np.float32), rng.standard_normal((2, 3, 3, 4)).astype(np.float32))


def test_a_layer_takes_it_as_input_weights_and_output_gradient(kind, values):
    x, kernel, bias, dy = values
    layer = tvmconv.Conv2D(4, 3, activation="relu")
    layer.build(SHAPE)
    layer.set_weights([kind(kernel), kind(bias)])
    np.testing.assert_array_equal(layer.get_weights()[0], kernel)
    np.testing.assert_array_equal(layer.get_weights()[1], bias)
    np.testing.assert_allclose(layer(kind(x)), forward(x, kernel, bias), rtol=1e-5, atol=1e-5)
    grads = layer.gradients(kind(x), kind(dy), output=kind(layer(x)))
    for got, want in zip((grads["input"], grads["kernel"], grads["bias"]), reference_gradients(x, kernel, bias, dy),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_model_predicts_evaluates_and_fits_on_it(kind, values):
    x, kernel, bias, _ = values
    target = np.random.default_rng(3).standard_normal((2, 3, 3, 4)).astype(np.float32)
    model = tvmconv.Sequential([tvmconv.Conv2D(4, 3, activation="relu", input_shape=SHAPE[1:])])
    model.layers[0].set_weights([kernel, bias])
    np.testing.assert_allclose(model.predict(kind(x), batch_size=1), forward(x, kernel, bias), rtol=1e-5, atol=1e-5)
    learning_rate = 0.1
    model.compile(optimizer=SGD(learning_rate=learning_rate), loss="mse")
    error = forward(x, kernel, bias) - target
    assert model.evaluate(kind(x), kind(target)) == pytest.approx(np.mean(error ** 2), rel=1e-5)
    # One full-batch SGD step: the kernel moves by the learning rate times mse's gradient.
    model.fit(kind(x), kind(target), epochs=1, batch_size=2, shuffle=False, verbose=0,
              validation_data=(kind(x), kind(target)))
    _, kernel_gradient, bias_gradient = reference_gradients(x, kernel, bias, 2 * error / error.size)
    np.testing.assert_allclose(model.layers[0].get_weights()[0], kernel - learning_rate * kernel_gradient,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.layers[0].get_weights()[1], bias - learning_rate * bias_gradient,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("name", "address"), [
    ("np.load(mmap_mode='r')", lambda a: a.ctypes.data), ("np.frombuffer", lambda a: a.ctypes.data),
    ("jax", lambda a: a.unsafe_buffer_pointer()), ("torch, requires_grad", lambda t: t.data_ptr())])
def test_contiguous_inputs_are_read_in_place(name, address, tmp_path):
    array = KINDS[name](np.arange(24, dtype=np.float32).reshape(2, 3, 4), tmp_path)
    assert runtime.input_tensor(to_array(array, "x")).data_ptr() == address(array)


def test_a_bundle_reads_a_read_only_input_in_place(values, tmp_path):
    x, kernel, bias, _ = values
    layer = tvmconv.Conv2D(4, 3, activation="relu", weights=[kernel, bias], input_shape=SHAPE[1:])
    tvmconv.export(layer, SHAPE, str(tmp_path / "bundle"))
    x = memory_mapped(x, tmp_path)
    np.testing.assert_allclose(runtime.load(str(tmp_path / "bundle"))(x), forward(x, kernel, bias), rtol=1e-5,
                               atol=1e-5)


def test_an_array_on_another_device_gets_a_clear_error(values):
    layer = tvmconv.Conv2D(4, 3)
    on_gpu = DLPackOnly(values[0], device=(2, 0))  # kDLCUDA
    with pytest.raises(ValueError, match=r"Input 0 of layer '.*' is a DLPackOnly on DLPack device \(2, 0\)"
                                         r".*CPU memory"):
        layer(on_gpu)
    layer.build(SHAPE)
    with pytest.raises(ValueError, match=r"`weights\[1\]` is a DLPackOnly .*\.cpu\(\)"):
        layer.set_weights([values[1], DLPackOnly(values[2], device=(2, 0))])
