"""The training gradients of Conv2D, declared next to the forward compute they differentiate.

With z = conv(x, W) + b, y = act(z) and dy = dL/dy (Keras's Conv2D gradients):
  dz — dy · act'(z), a TE compute (`activation_backward`) from the pre-activation z: exact for every
       activation; the last-axis ones take the Jacobian product along the output's last axis;
  dx — the transposed convolution, split by stride phase into stride-1 forward convolutions of dz with
       the weights' taps flipped and transposed per group (`input_gradient_phases`);
  dW — the correlation of x with dz, laid out as one forward convolution (grouped like the layer) whose
       output holds dW (`weight_gradient_workload`), or for depthwise layers and channels-last 1x1 ones a
       TE compute of its own (`depthwise_weight_gradient`, `pointwise_weight_gradient`); db = Σ dz.
dx and dW (but those two) thus run the forward compute (tvmconv.compute) with its schedules, and tune
like any forward workload. The kernels that are not convolutions are workloads of their own
(`GradientKernel`: the same interface as a ConvWorkload) and tune in MetaSchedule's generated space.
Arrays are in the workload's data format and compute dtype; z and dz have the conv's output shape
(for glu: twice dy's last axis).
"""
import dataclasses
import functools
import json
import math
from typing import ClassVar

import numpy as np
from tvm import te, tirx

from .compute import (
    SELU_ALPHA,
    SELU_SCALE,
    WORKLOAD_ATTR,
    ConvWorkload,
    _softmax,
    _sparsemax,
    const,
    hard_sigmoid,
    read_unaligned,
    softplus,
    where,
)


def _between(x, low, high):
    """1 where low < x < high, else 0."""
    return where(tirx.all(x > const(x, low), x < const(x, high)), const(x, 1), const(x, 0))


def _derivatives():
    """act'(z) for Keras's elementwise activations, with their default parameters."""
    sigmoid = tirx.sigmoid

    def elu_like(x, alpha, scale=1.0):  # d/dx of scale * (x if x > 0 else alpha * (e^x - 1))
        return const(x, scale) * where(x > const(x, 0), const(x, 1), const(x, alpha) * tirx.exp(te.min(x, const(x, 0))))

    def hard_sigmoid_slope(x):
        return _between(x, -3, 3) / const(x, 6)

    return {
        "linear": lambda x: const(x, 1),
        "relu": lambda x: where(x > const(x, 0), const(x, 1), const(x, 0)),
        "relu6": lambda x: _between(x, 0, 6),
        "sigmoid": lambda x: sigmoid(x) * (const(x, 1) - sigmoid(x)),
        "tanh": lambda x: const(x, 1) - tirx.tanh(x) * tirx.tanh(x),
        "exponential": tirx.exp,
        "elu": lambda x: elu_like(x, 1.0),
        "celu": lambda x: elu_like(x, 1.0),
        "selu": lambda x: elu_like(x, SELU_ALPHA, SELU_SCALE),
        "gelu": lambda x: (const(x, 0.5) * (const(x, 1) + tirx.erf(x * const(x, 1 / math.sqrt(2))))
                           + x * tirx.exp(const(x, -0.5) * x * x) * const(x, 1 / math.sqrt(2 * math.pi))),
        "hard_sigmoid": hard_sigmoid_slope,
        "hard_silu": lambda x: hard_sigmoid(x) + x * hard_sigmoid_slope(x),
        "hard_tanh": lambda x: _between(x, -1, 1),
        "hard_shrink": lambda x: where(tirx.abs(x) > const(x, 0.5), const(x, 1), const(x, 0)),
        "soft_shrink": lambda x: where(tirx.abs(x) > const(x, 0.5), const(x, 1), const(x, 0)),
        "leaky_relu": lambda x: where(x >= const(x, 0), const(x, 1), const(x, 0.2)),
        "log_sigmoid": lambda x: sigmoid(-x),
        "mish": lambda x: (tirx.tanh(softplus(x))
                           + x * (const(x, 1) - tirx.tanh(softplus(x)) * tirx.tanh(softplus(x))) * sigmoid(x)),
        "silu": lambda x: sigmoid(x) * (const(x, 1) + x * (const(x, 1) - sigmoid(x))),
        "softplus": sigmoid,
        "softsign": lambda x: const(x, 1) / ((tirx.abs(x) + const(x, 1)) * (tirx.abs(x) + const(x, 1))),
        "sparse_plus": lambda x: where(x <= const(x, -1), const(x, 0),
                                       where(x >= const(x, 1), const(x, 1), (x + const(x, 1)) / const(x, 2))),
        "sparse_sigmoid": lambda x: _between(x, -1, 1) / const(x, 2),
        "squareplus": lambda x: (const(x, 1) + x / tirx.sqrt(x * x + const(x, 4))) / const(x, 2),
        "tanh_shrink": lambda x: tirx.tanh(x) * tirx.tanh(x),
    }


DERIVATIVES = _derivatives()


def _output_derivatives():
    """act'(z) written with y = act(z) instead, for the activations whose output says it exactly (up to
    rounding near 0): training has y from the forward pass and need not recompute z."""

    def elu_like(y):  # elu and celu (alpha = 1): 1 above 0, else e^z = y + 1
        return where(y > const(y, 0), const(y, 1), y + const(y, 1))

    return {
        "linear": lambda y: const(y, 1),
        "relu": lambda y: where(y > const(y, 0), const(y, 1), const(y, 0)),
        "relu6": lambda y: _between(y, 0, 6),
        "sigmoid": lambda y: y * (const(y, 1) - y),
        "tanh": lambda y: const(y, 1) - y * y,
        "exponential": lambda y: y,
        "elu": elu_like,
        "celu": elu_like,
        "selu": lambda y: where(y > const(y, 0), const(y, SELU_SCALE), y + const(y, SELU_SCALE * SELU_ALPHA)),
        "hard_sigmoid": lambda y: _between(y, 0, 1) / const(y, 6),
        "hard_tanh": lambda y: _between(y, -1, 1),
        "hard_shrink": lambda y: where(tirx.abs(y) > const(y, 0), const(y, 1), const(y, 0)),
        "soft_shrink": lambda y: where(tirx.abs(y) > const(y, 0), const(y, 1), const(y, 0)),
        "leaky_relu": lambda y: where(y >= const(y, 0), const(y, 1), const(y, 0.2)),
        "softsign": lambda y: (const(y, 1) - tirx.abs(y)) * (const(y, 1) - tirx.abs(y)),
        "sparse_sigmoid": lambda y: _between(y, 0, 1) / const(y, 2),
    }


OUTPUT_DERIVATIVES = _output_derivatives()
# softmax's Jacobian is written with y, log_softmax's with exp(y), sparsemax's with y's support.
FROM_OUTPUT = set(OUTPUT_DERIVATIVES) | {"softmax", "log_softmax", "sparsemax"}


def _last_axis_backward(activation: str, z, dy, y=None):
    """dz for the activations taken along the last axis: the Jacobian-vector product. `y` (the output,
    for all but glu) is computed from z when not given."""
    *lead, length = z.shape
    if activation == "glu":  # y = a * sigmoid(b), z = [a, b]
        half = length // 2

        def grad(*i):
            *rest, j = i
            a_part = dy[i] * tirx.sigmoid(z[(*rest, j + half)])
            b_index = j - half
            s = tirx.sigmoid(z[i])
            b_part = dy[(*rest, b_index)] * z[(*rest, b_index)] * s * (tirx.const(1, z.dtype) - s)
            return tirx.if_then_else(j < half, a_part, b_part)
        return te.compute(z.shape, grad, name="dz")
    if y is None:
        y = _sparsemax(z) if activation == "sparsemax" else _softmax(z, log=activation == "log_softmax")
    k = te.reduce_axis((0, length), "k")
    if activation == "softmax":  # dz = y * (dy - Σ dy·y)
        dot = te.compute(lead, lambda *i: te.sum(dy[(*i, k)] * y[(*i, k)], axis=k), name="dy_dot_y")
        return te.compute(z.shape, lambda *i: y[i] * (dy[i] - dot[i[:-1]]), name="dz")
    if activation == "log_softmax":  # dz = dy - softmax(z) * Σ dy, softmax(z) = exp(y)
        total = te.compute(lead, lambda *i: te.sum(dy[(*i, k)], axis=k), name="dy_sum")
        return te.compute(z.shape, lambda *i: dy[i] - tirx.exp(y[i]) * total[i[:-1]], name="dz")
    # sparsemax: on the support S, dz = dy - mean over S of dy; 0 elsewhere
    zero, one = tirx.const(0, z.dtype), tirx.const(1, z.dtype)
    k2 = te.reduce_axis((0, length), "k2")
    size = te.compute(lead, lambda *i: te.sum(tirx.Select(y[(*i, k)] > zero, one, zero), axis=k), name="support")
    total = te.compute(lead, lambda *i: te.sum(tirx.Select(y[(*i, k2)] > zero, dy[(*i, k2)], zero), axis=k2),
                       name="support_dy")
    return te.compute(z.shape, lambda *i: tirx.Select(y[i] > zero, dy[i] - total[i[:-1]] / size[i[:-1]], zero),
                      name="dz")


def activation_backward(wl: ConvWorkload, from_output: bool = False):
    """PrimFunc (z, dy) -> dz, or (y, dy) -> dz with `from_output` (for activations in FROM_OUTPUT); z, y
    and dz in the conv's output shape, dy in the layer's output shape."""
    if from_output and wl.activation not in FROM_OUTPUT:
        raise ValueError(f"{wl.activation}'s derivative needs the pre-activation, not the output")
    name, table = ("y", OUTPUT_DERIVATIVES) if from_output else ("z", DERIVATIVES)
    saved = te.placeholder(wl.conv_output_shape, wl.dtype, name=name)
    dy = te.placeholder(wl.output_shape, wl.dtype, name="dy")
    if wl.activation in table:
        derivative = table[wl.activation]
        dz = te.compute(saved.shape, lambda *i: dy(*i) * derivative(saved(*i)), name="dz")
    else:
        dz = _last_axis_backward(wl.activation, saved, dy, y=saved if from_output else None)
    return read_unaligned(te.create_prim_func([saved, dy, dz]), (name, "dy"))


def depthwise_weight_gradient(wl: ConvWorkload):
    """PrimFunc (x, dz) -> dW for one input channel per group (depthwise, with any multiplier): dW[i, j, 0, f]
    = Σ_{n, oh, ow} x_pad[n, oh·s + i·d, ow·s + j·d, f // m] · dz[n, oh, ow, f], m = filters per group, x and
    dz channels-last. A correlation with nothing to reduce across channels, which no forward convolution
    lays out without copying x and dz whole: on depthwise layers those copies cost more than the FLOPs."""
    kh, kw = wl.kernel_size
    (sh, sw), (dh, dw) = wl.strides, wl.dilation
    top, left, _, _ = wl.pads
    multiplier, acc = wl.filters // wl.groups, wl.accum_dtype
    x = te.placeholder((wl.batch, wl.in_height, wl.in_width, wl.in_channels), wl.dtype, name="x")
    dz = te.placeholder((wl.batch, wl.out_height, wl.out_width, wl.filters), wl.dtype, name="dz")
    n, oh, ow = (te.reduce_axis((0, extent), name) for extent, name in
                 ((wl.batch, "n"), (wl.out_height, "oh"), (wl.out_width, "ow")))

    def correlate(i, j, _, f):
        h, w = oh * sh + i * dh - top, ow * sw + j * dw - left
        inside = tirx.all(h >= 0, h < wl.in_height, w >= 0, w < wl.in_width)
        value = tirx.if_then_else(inside, x[n, h, w, f // multiplier], tirx.const(0, wl.dtype))
        return te.sum(value.astype(acc) * dz[n, oh, ow, f].astype(acc), axis=[n, oh, ow])

    dw_acc = te.compute((kh, kw, 1, wl.filters), correlate, name="dW")
    dw_out = dw_acc if acc == wl.dtype else te.compute(dw_acc.shape, lambda *i: dw_acc(*i).astype(wl.dtype),
                                                       name="dW_cast")
    return read_unaligned(te.create_prim_func([x, dz, dw_out]), ("x", "dz"))


def pointwise_weight_gradient(wl: ConvWorkload):
    """PrimFunc (x_read, dz) -> dW for a 1x1 convolution, one group, channels-last: dW[0, 0, c, f] =
    Σ_{n, oh, ow} x_read[n, oh, ow, c] · dz[n, oh, ow, f], where x_read holds the pixels the layer reads
    (x itself at stride 1, else `pointwise_pixels(wl, x)`). A matrix product over the pixels that reads
    x and dz where they are. As a forward convolution, one of them would be transposed and the other
    packed as its weights at every step: at ResNet-50's 14x14x1024 -> 256 and batch 8 those copies took
    longer than the product."""
    acc = wl.accum_dtype
    x = te.placeholder((wl.batch, wl.out_height, wl.out_width, wl.in_channels), wl.dtype, name="x")
    dz = te.placeholder(wl.output_shape, wl.dtype, name="dz")
    n, oh, ow = (te.reduce_axis((0, extent), name) for extent, name in
                 ((wl.batch, "n"), (wl.out_height, "oh"), (wl.out_width, "ow")))
    dw_acc = te.compute((1, 1, wl.in_channels, wl.filters),
                        lambda _i, _j, c, f: te.sum(x[n, oh, ow, c].astype(acc) * dz[n, oh, ow, f].astype(acc),
                                                    axis=[n, oh, ow]), name="dW")
    dw_out = dw_acc if acc == wl.dtype else te.compute(dw_acc.shape, lambda *i: dw_acc(*i).astype(wl.dtype),
                                                       name="dW_cast")
    return read_unaligned(te.create_prim_func([x, dz, dw_out]), ("x", "dz"))


def pointwise_pixels(wl: ConvWorkload, x: np.ndarray) -> np.ndarray:
    """The pixels of a channels-last x that a strided 1x1 kernel reads, copied together: read in place
    with stride 2 (a new page every pixel), they made ResNet-50's 28x28x512 -> 1024 dW 1.6x slower
    than the copy and a stride-1 product together."""
    if wl.strides == (1, 1):
        return x
    (sh, sw) = wl.strides
    return np.ascontiguousarray(x[:, ::sh, ::sw][:, :wl.out_height, :wl.out_width])


# The PrimFunc attribute naming a gradient kernel's `part`: tuning logs hold records of these kernels too.
GRADIENT_ATTR = "tvmconv.gradient"


@dataclasses.dataclass(frozen=True)
class GradientKernel:
    """A kernel of the training gradients that is not a forward convolution, for the layer's `workload`.
    It has a ConvWorkload's interface (key, label, flops, prim_func, stand_ins: see tvmconv.compute), so
    it builds, tunes and keeps records like one. Each kind declares its compute; `part` is its name in
    tuning logs and cache files (stored data: never renamed)."""
    workload: ConvWorkload
    part: ClassVar[str]
    description: ClassVar[str]

    @property
    def key(self) -> str:
        return f"{self.workload.key}-grad-{self.part}"

    @property
    def label(self) -> str:
        return f"{self.workload.label} {self.description}"

    @property
    def flops(self) -> int:
        """For the copies and elementwise kernels: the elements they write (their "GFLOP/s" in tuning reports
        are billions of elements a second)."""
        return math.prod(self.workload.conv_output_shape)

    def compute(self):
        raise NotImplementedError

    def prim_func(self, weight_block: int = 0, flat_tile: int = 0, winograd: int = 0):
        return _gradient_prim_func(self)

    def stand_ins(self) -> list[tuple["GradientKernel", None]]:
        return [(self, None)]


@functools.lru_cache(maxsize=256)
def _gradient_prim_func(kernel: GradientKernel):
    """The kernel's PrimFunc, naming what it computes in its attributes (as conv2d_forward does)."""
    return kernel.compute().with_attr({WORKLOAD_ATTR: json.dumps(kernel.workload.fields()),
                                       GRADIENT_ATTR: kernel.part})


class ActivationGradient(GradientKernel):
    """dz from the pre-activation z (`activation_backward`)."""
    part, description = "activation", "dz"

    def compute(self):
        return activation_backward(self.workload)


class ActivationGradientFromOutput(ActivationGradient):
    """dz from the output y, for the activations in FROM_OUTPUT."""
    part, description = "activation-from-output", "dz (from y)"

    def compute(self):
        return activation_backward(self.workload, from_output=True)


class DepthwiseWeightGradient(GradientKernel):
    part, description = "depthwise-kernel", "dW (depthwise)"

    @property
    def flops(self) -> int:  # dW's multiply-adds, as many as the forward convolution's
        return self.workload.flops

    def compute(self):
        return depthwise_weight_gradient(self.workload)


class PointwiseWeightGradient(GradientKernel):
    part, description = "pointwise-kernel", "dW (pointwise)"

    @property
    def flops(self) -> int:
        return self.workload.flops

    def compute(self):
        return pointwise_weight_gradient(self.workload)


class WeightGradientImage(GradientKernel):
    """dW's regrouped input for the "samples as channels" route (`weight_gradient_image`)."""
    part, description = "kernel-gradient-image", "dW image"

    @property
    def flops(self) -> int:
        return math.prod(weight_gradient_workload(self.workload).input_shape)

    def compute(self):
        return weight_gradient_image(self.workload)


# Every kind, by its name in the logs (records read them back from a PrimFunc's attributes).
GRADIENT_KERNELS = {kind.part: kind for kind in (ActivationGradient, ActivationGradientFromOutput,
                                                 DepthwiseWeightGradient, PointwiseWeightGradient, WeightGradientImage)}


def activation_gradient(wl: ConvWorkload, from_output: bool) -> ActivationGradient:
    return (ActivationGradientFromOutput if from_output else ActivationGradient)(wl)


def training_kernels(wl: ConvWorkload) -> list[GradientKernel]:
    """The kernels of `wl`'s gradients (in a training step, which passes the layer's output) that are not
    forward convolutions."""
    found = []
    if wl.activation != "linear":
        found.append(activation_gradient(wl, wl.activation in FROM_OUTPUT))
    route = weight_gradient_route(wl)
    if route == "depthwise":
        found.append(DepthwiseWeightGradient(wl))
    elif route == "pointwise":
        found.append(PointwiseWeightGradient(wl))
    elif route == "samples as channels":
        found.append(WeightGradientImage(wl))
    return found


# ---------------------------------------------------------------- gradients that are forward convolutions


@dataclasses.dataclass(frozen=True)
class AxisPhase:
    """The dx rows (or columns) `first`, `first + stride`, ... (`count` of them) that the weights' taps
    `taps` reach (`tap_count` of them), and the zeros dz needs `before` and `after` along that axis
    (negative: rows dropped)."""
    taps: slice
    tap_count: int
    first: int
    count: int
    before: int
    after: int


def _axis_phases(length: int, out_length: int, taps_in_window: int, stride: int, dilation: int,
                 pad: int) -> list[AxisPhase]:
    """Padded row p = stride·m + q gathers dz[m - t]·W[q + stride·t] (dilation 1 with strides: Keras refuses
    both), a stride-1 correlation of dz with the taps q, q + stride, ... flipped; with stride 1 the one
    phase is the whole window, dilated. Phases whose taps or rows are empty are left out: dx is 0 there."""
    phases = []
    for q in range(stride):
        taps = len(range(q, taps_in_window, stride))
        first_m = -((q - pad) // stride)  # ceil((pad - q) / stride): the first m whose row is inside x
        count = (pad + length - 1 - q) // stride - first_m + 1
        if taps == 0 or count <= 0:
            continue
        extent = (taps - 1) * dilation + 1
        before = extent - 1 - first_m
        phases.append(AxisPhase(slice(q, taps_in_window, stride), taps, stride * first_m + q - pad, count, before,
                                count + extent - 1 - out_length - before))
    return phases


@dataclasses.dataclass(frozen=True)
class InputGradientPhase:
    """One of the (up to) stride² interleaved parts of dx: the forward convolution `workload` (stride 1)
    of dz, zero-padded or cropped as `rows`/`cols` say, with the taps they name, flipped and transposed
    per group. A phase that needs exactly "same" padding reads dz in place."""
    workload: ConvWorkload
    rows: AxisPhase
    cols: AxisPhase
    strides: tuple[int, int]  # the layer's: the spacing of this phase's rows and columns in dx

    def weights(self, weights, groups: int):
        """The layer's weights (Keras's layout) as this phase's convolution reads them."""
        return transposed_weights(weights[self.rows.taps, self.cols.taps], groups)

    def output_gradient(self, dz):
        """dz as this phase's forward convolution reads it."""
        if self.workload.padding == "same":
            return dz
        h_axis = 1 if self.workload.channels_last else 2
        index, widths = [slice(None)] * 4, [(0, 0)] * 4
        for axis, phase in ((h_axis, self.rows), (h_axis + 1, self.cols)):
            index[axis] = slice(max(-phase.before, 0), dz.shape[axis] - max(-phase.after, 0))
            widths[axis] = (max(phase.before, 0), max(phase.after, 0))
        return np.pad(dz[tuple(index)], widths)

    def place(self, dx, part) -> None:
        """Write this phase's output into its rows and columns of dx."""
        (sh, sw), rows, cols = self.strides, self.rows, self.cols
        spatial = (slice(rows.first, rows.first + sh * (rows.count - 1) + 1, sh),
                   slice(cols.first, cols.first + sw * (cols.count - 1) + 1, sw))
        dx[(slice(None), *spatial) if self.workload.channels_last else (slice(None), slice(None), *spatial)] = part


def input_gradient_phases(wl: ConvWorkload) -> tuple[list[InputGradientPhase], bool]:
    """dx as forward convolutions of dz (the transposed convolution split by stride phase), and whether
    they write every element of dx (else the rest is 0: taps that a stride skips, or padding rows)."""
    if wl.strides != (1, 1) and wl.dilation != (1, 1):
        raise ValueError(f"strides {wl.strides} with dilation {wl.dilation}: Keras allows one of them only")
    top, left, _, _ = wl.pads
    row_phases = _axis_phases(wl.in_height, wl.out_height, wl.kernel_size[0], wl.strides[0], wl.dilation[0], top)
    col_phases = _axis_phases(wl.in_width, wl.out_width, wl.kernel_size[1], wl.strides[1], wl.dilation[1], left)
    phases = []
    for rows in row_phases:
        for cols in col_phases:
            size = (rows.tap_count, cols.tap_count)
            extents = [(k - 1) * d + 1 for k, d in zip(size, wl.dilation, strict=True)]
            same = all(p.count == n and p.before == (e - 1) // 2
                       for p, n, e in zip((rows, cols), (wl.out_height, wl.out_width), extents, strict=True))
            height, width = ((wl.out_height, wl.out_width) if same else
                             (rows.count + extents[0] - 1, cols.count + extents[1] - 1))
            phases.append(InputGradientPhase(
                dataclasses.replace(wl, in_height=height, in_width=width, in_channels=wl.filters,
                                    filters=wl.in_channels, kernel_size=size, strides=(1, 1),
                                    padding="same" if same else "valid", use_bias=False, activation="linear"),
                rows, cols, wl.strides))
    covered = sum(r.count for r in row_phases) == wl.in_height and sum(c.count for c in col_phases) == wl.in_width
    return phases, covered


def transposed_weights(weights, groups: int):
    """Keras's (kh, kw, cin/groups, filters) weights flipped in space, with (cin, filters) swapped per group."""
    kh, kw, cg, filters = weights.shape
    fg = filters // groups
    flipped = weights[::-1, ::-1].reshape(kh, kw, cg, groups, fg)
    return flipped.transpose(0, 1, 4, 3, 2).reshape(kh, kw, fg, groups * cg)


def weight_gradient_route(wl: ConvWorkload) -> str:
    """How dW is computed, cg = input channels per group, G = groups, S = samples:
      "depthwise" (cg = 1): its own kernel, `depthwise_weight_gradient`;
      "pointwise" (1x1, one group, channels-last, filters a multiple of 16, the widest vector): its own
          kernel, `pointwise_weight_gradient`;
    else as one forward convolution (`weight_gradient_workload`, laid out by `weight_gradient_operands`):
      "matrix product" (1x1): per group, the smaller of x and dz transposed as the image (its channels
          as pixels), the other as the 1x1 weights, their (sample, pixel) pairs as the input channels;
      "samples as channels" (k x k): the padded input with its cg channels as the batch and each
          group's samples as input channels, convolved with dz as (OH x OW) weights, the stride and
          dilation swapped."""
    if wl.group_in_channels == 1:
        return "depthwise"
    if wl.kernel_size == (1, 1):
        pointwise = wl.groups == 1 and wl.channels_last and wl.filters % 16 == 0
        return "pointwise" if pointwise else "matrix product"
    return "samples as channels"


def _pointwise_dz_is_image(wl: ConvWorkload) -> bool:
    return wl.filters < wl.in_channels  # transpose the smaller operand


def weight_gradient_workload(wl: ConvWorkload) -> ConvWorkload | None:
    """The forward workload whose output holds dW, as `weight_gradient_route` says (None: a kernel of its own)."""
    groups, route = wl.groups, weight_gradient_route(wl)
    if route in ("depthwise", "pointwise"):
        return None
    if route == "matrix product":
        pixels = wl.batch * wl.out_height * wl.out_width
        width, filters = ((wl.filters // groups, wl.in_channels) if _pointwise_dz_is_image(wl) else
                          (wl.group_in_channels, wl.filters))
        return ConvWorkload(1, 1, width, groups * pixels, filters, (1, 1), groups=groups, use_bias=False,
                            dtype=wl.dtype)
    top, left, bottom, right = wl.pads
    return ConvWorkload(wl.group_in_channels, wl.in_height + top + bottom, wl.in_width + left + right,
                        groups * wl.batch, wl.filters, (wl.out_height, wl.out_width), wl.dilation, wl.strides,
                        groups=groups, use_bias=False, dtype=wl.dtype)


def _per_group_transposed(matrix, groups: int):
    """(S, G·k) -> (k, G·S): column block g transposed, as the image of a grouped 1x1 convolution."""
    samples, width = matrix.shape
    return matrix.reshape(samples, groups, width // groups).transpose(2, 1, 0).reshape(width // groups, -1)


def weight_gradient_image(wl: ConvWorkload):
    """PrimFunc x -> the image of the "samples as channels" route: image[c', h, w, g·S + s] =
    x_pad[s, h, w, g·cg + c'], x in the workload's layout. A TVM kernel rather than numpy, because it
    runs on every core and pads in the same pass (0.40 against 2.4 ms for ResNet-50's 56x56x64 at
    batch 8)."""
    top, left, bottom, right = wl.pads
    samples, cg = wl.batch, wl.group_in_channels
    x = te.placeholder(wl.input_shape, wl.dtype, name="x")

    def value(c, h, w, k):
        row, column, channel = h - top, w - left, (k // samples) * cg + c
        inside = tirx.all(row >= 0, row < wl.in_height, column >= 0, column < wl.in_width)
        read = x[k % samples, row, column, channel] if wl.channels_last else x[k % samples, channel, row, column]
        return tirx.if_then_else(inside, read, tirx.const(0, wl.dtype))

    image = te.compute((cg, wl.in_height + top + bottom, wl.in_width + left + right, wl.groups * samples), value,
                       name="image")
    return read_unaligned(te.create_prim_func([x, image]), ("x",))


def weight_gradient_operands(wl: ConvWorkload, x, dz):
    """(image, weights) of `weight_gradient_workload` from x and dz (numpy, the workload's layout); for
    "samples as channels" the image is None: `weight_gradient_image` makes it."""
    dz_nhwc = dz if wl.channels_last else dz.transpose(0, 2, 3, 1)
    if weight_gradient_route(wl) == "matrix product":
        x_nhwc = x if wl.channels_last else x.transpose(0, 2, 3, 1)
        sh, sw = wl.strides
        pixels = wl.batch * wl.out_height * wl.out_width
        x_matrix = x_nhwc[:, ::sh, ::sw][:, :wl.out_height, :wl.out_width].reshape(pixels, wl.in_channels)
        dz_matrix = dz_nhwc.reshape(pixels, wl.filters)
        image, weights = (dz_matrix, x_matrix) if _pointwise_dz_is_image(wl) else (x_matrix, dz_matrix)
        image = _per_group_transposed(image, wl.groups)
        return image.reshape(1, 1, *image.shape), weights.reshape(1, 1, *weights.shape)
    return None, dz_nhwc.transpose(1, 2, 0, 3)  # dz as (OH, OW, samples, filters)


def weight_gradient_from_output(wl: ConvWorkload, out):
    """dW in Keras's layout from the output of `weight_gradient_workload`."""
    route, (kh, kw) = weight_gradient_route(wl), wl.kernel_size
    if route == "matrix product":
        if not _pointwise_dz_is_image(wl):
            return out.reshape(1, 1, wl.group_in_channels, wl.filters)
        # out[f', g·cg + c'] = dW[c', g·fg + f']
        fg, cg = wl.filters // wl.groups, wl.group_in_channels
        by_group = out.reshape(fg, wl.groups, cg).transpose(2, 1, 0).reshape(1, 1, cg, wl.filters)
        return np.ascontiguousarray(by_group)
    return np.ascontiguousarray(out[:, :kh, :kw, :].transpose(1, 2, 0, 3))
