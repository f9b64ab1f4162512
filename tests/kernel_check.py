"""The one check of a compiled forward kernel against the float64 reference, shared by the tests of the
schedules and of tuning."""
import numpy as np

from tvmconv import build, reference, runtime, targets
from tvmconv.compute import ConvWorkload

HOST = targets.resolve(None)


def check_kernel(wl: ConvWorkload, knobs=None, seed=0, record=None):
    """The kernel of `knobs` (or of a tuning `record`) for this host against the float64 reference; returns
    the compiled kernel."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(wl.input_shape)
    kernel = rng.standard_normal(wl.weights_shape)
    bias = rng.standard_normal(wl.filters) if wl.use_bias else None
    compiled = build.get_kernel(wl, HOST, knobs, record=record)
    assert compiled.knobs == knobs and compiled.tuning == record
    y = runtime.aligned_empty(wl.output_shape, wl.dtype)
    y[...] = np.nan  # every output must be written
    weights = [compiled.pack(kernel.astype(wl.dtype))] + (
        [bias.astype(wl.dtype)] if wl.use_bias else [])
    compiled.kernel(x.astype(wl.dtype), compiled.kernel.weights(weights), y)  # x at numpy's alignment
    expected = reference.conv2d(x, kernel, bias, wl.strides, wl.padding, wl.dilation, wl.groups, wl.channels_last)
    expected = reference.ACTIVATIONS[wl.activation](expected)
    tolerance = 1e-10 if wl.dtype == "float64" else 1e-4
    np.testing.assert_allclose(y, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())
    return compiled
