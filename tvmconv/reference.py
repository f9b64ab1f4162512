"""Independent float64 numpy references (no TVM): convolution with Keras's padding rule, and Keras's activations.

Used by `tvmconv demo` and the tests to check compiled kernels."""
import math

import numpy as np


def conv2d(x, kernel, bias, strides=(1, 1), padding="valid", dilation=(1, 1), groups=1, channels_last=True):
    """Direct sum over kernel taps in float64. x is NHWC or NCHW; kernel is (kh, kw, cin_g, filters)."""
    x = np.asarray(x, np.float64)
    if not channels_last:
        x = x.transpose(0, 2, 3, 1)
    kernel = np.asarray(kernel, np.float64)
    kh, kw, cin_g, filters = kernel.shape
    n, h, w, c = x.shape
    (sh, sw), (dh, dw) = strides, dilation
    if padding == "same":
        pads = []
        for size, k, s, d in ((h, kh, sh, dh), (w, kw, sw, dw)):
            out = math.ceil(size / s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    oh = (x.shape[1] - (kh - 1) * dh - 1) // sh + 1
    ow = (x.shape[2] - (kw - 1) * dw - 1) // sw + 1
    fg = filters // groups
    y = np.zeros((n, oh, ow, filters))
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                patch = x[:, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw,
                          g * cin_g:(g + 1) * cin_g]
                y[..., g * fg:(g + 1) * fg] += patch @ kernel[i, j, :, g * fg:(g + 1) * fg]
    if bias is not None:
        y += np.asarray(bias, np.float64)
    return y if channels_last else y.transpose(0, 3, 1, 2)


def _softplus(x):
    return np.logaddexp(x, 0.0)


def _sigmoid(x):
    return 0.5 * (1 + np.tanh(x / 2))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _sparsemax(x):
    z = np.sort(x, axis=-1)[..., ::-1]
    k = np.arange(1, x.shape[-1] + 1)
    cumulative = np.cumsum(z, axis=-1)
    support = (1 + k * z) > cumulative
    size = support.sum(-1, keepdims=True)
    tau = (np.take_along_axis(cumulative, size - 1, -1) - 1) / size
    return np.maximum(x - tau, 0)


_erf = np.vectorize(math.erf)
SELU_ALPHA, SELU_SCALE = 1.6732632423543772, 1.0507009873554805

ACTIVATIONS = {
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, 0),
    "relu6": lambda x: np.clip(x, 0, 6),
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "exponential": np.exp,
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))),
    "celu": lambda x: np.maximum(x, 0) + np.minimum(np.expm1(np.minimum(x, 0)), 0),
    "selu": lambda x: SELU_SCALE * np.where(x > 0, x, SELU_ALPHA * np.expm1(np.minimum(x, 0))),
    "gelu": lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
    "hard_sigmoid": lambda x: np.clip(x + 3, 0, 6) / 6,
    "hard_silu": lambda x: x * np.clip(x + 3, 0, 6) / 6,
    "hard_swish": lambda x: x * np.clip(x + 3, 0, 6) / 6,
    "hard_tanh": lambda x: np.clip(x, -1, 1),
    "hard_shrink": lambda x: np.where(np.abs(x) > 0.5, x, 0),
    "soft_shrink": lambda x: np.sign(x) * np.maximum(np.abs(x) - 0.5, 0),
    "leaky_relu": lambda x: np.where(x >= 0, x, 0.2 * x),
    "log_sigmoid": lambda x: -_softplus(-x),
    "mish": lambda x: x * np.tanh(_softplus(x)),
    "silu": lambda x: x * _sigmoid(x),
    "swish": lambda x: x * _sigmoid(x),
    "softplus": _softplus,
    "softsign": lambda x: x / (1 + np.abs(x)),
    "sparse_plus": lambda x: np.where(x <= -1, 0, np.where(x >= 1, x, (x + 1) ** 2 / 4)),
    "sparse_sigmoid": lambda x: np.clip((x + 1) / 2, 0, 1),
    "squareplus": lambda x: (x + np.sqrt(x * x + 4)) / 2,
    "tanh_shrink": lambda x: x - np.tanh(x),
    "softmax": _softmax,
    "log_softmax": lambda x: np.log(_softmax(x)),
    "sparsemax": _sparsemax,
    "glu": lambda x: x[..., : x.shape[-1] // 2] * _sigmoid(x[..., x.shape[-1] // 2:]),
}
