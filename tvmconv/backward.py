"""The training gradients of Conv2D as TE computes (keras_conv2d_spec.md §8).

With z = conv(x, W) + b, y = act(z) and dy = dL/dy:
  "activation" — dz = dy · act'(z), from the pre-activation z (exact for every activation; the
                 last-axis ones take the Jacobian product along the output's last axis);
  "input"      — dx: each x element gathers dz through every window that read it (the transposed
                 convolution: strides, dilation, groups and both paddings as index guards);
  "weight"     — dW (Keras's layout) as the correlation of the input with dz, and db = Σ dz.
All arrays are in the workload's data format and compute dtype; z and dz have the conv's output
shape (for glu: twice dy's last axis).
"""
import dataclasses
import math

from tvm import te, tirx

from .compute import ConvWorkload, _input_read_unaligned, _softmax, _sparsemax


def _derivatives():
    """act'(z) for Keras's elementwise activations, with their default parameters."""

    def const(x, value):
        return tirx.const(value, str(x.ty))

    def where(cond, a, b):
        return tirx.Select(cond, a, b)

    def between(x, low, high):  # 1 where low < x < high
        return where(tirx.all(x > const(x, low), x < const(x, high)), const(x, 1), const(x, 0))

    def softplus(x):
        return te.max(x, const(x, 0)) + tirx.log1p(tirx.exp(-tirx.abs(x)))

    def sigmoid(x):
        return tirx.sigmoid(x)

    def elu_like(x, alpha, scale=1.0):  # d/dx of scale * (x if x > 0 else alpha * (e^x - 1))
        return const(x, scale) * where(x > const(x, 0), const(x, 1), const(x, alpha) * tirx.exp(te.min(x, const(x, 0))))

    def hard_sigmoid_slope(x):
        return between(x, -3, 3) / const(x, 6)

    def hard_sigmoid(x):
        return te.min(te.max(x + const(x, 3), const(x, 0)), const(x, 6)) / const(x, 6)

    selu_alpha, selu_scale = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946
    return {
        "linear": lambda x: const(x, 1),
        "relu": lambda x: where(x > const(x, 0), const(x, 1), const(x, 0)),
        "relu6": lambda x: between(x, 0, 6),
        "sigmoid": lambda x: sigmoid(x) * (const(x, 1) - sigmoid(x)),
        "tanh": lambda x: const(x, 1) - tirx.tanh(x) * tirx.tanh(x),
        "exponential": tirx.exp,
        "elu": lambda x: elu_like(x, 1.0),
        "celu": lambda x: elu_like(x, 1.0),
        "selu": lambda x: elu_like(x, selu_alpha, selu_scale),
        "gelu": lambda x: (const(x, 0.5) * (const(x, 1) + tirx.erf(x * const(x, 1 / math.sqrt(2))))
                           + x * tirx.exp(const(x, -0.5) * x * x) * const(x, 1 / math.sqrt(2 * math.pi))),
        "hard_sigmoid": hard_sigmoid_slope,
        "hard_silu": lambda x: hard_sigmoid(x) + x * hard_sigmoid_slope(x),
        "hard_tanh": lambda x: between(x, -1, 1),
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
        "sparse_sigmoid": lambda x: between(x, -1, 1) / const(x, 2),
        "squareplus": lambda x: (const(x, 1) + x / tirx.sqrt(x * x + const(x, 4))) / const(x, 2),
        "tanh_shrink": lambda x: tirx.tanh(x) * tirx.tanh(x),
    }


DERIVATIVES = _derivatives()


def _last_axis_backward(activation: str, z, dy):
    """dz for the activations taken along the last axis: the Jacobian-vector product."""
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
    y = _sparsemax(z) if activation == "sparsemax" else _softmax(z)
    k = te.reduce_axis((0, length), "k")
    if activation == "softmax":  # dz = y * (dy - Σ dy·y)
        dot = te.compute(lead, lambda *i: te.sum(dy[(*i, k)] * y[(*i, k)], axis=k), name="dy_dot_y")
        return te.compute(z.shape, lambda *i: y[i] * (dy[i] - dot[i[:-1]]), name="dz")
    if activation == "log_softmax":  # dz = dy - softmax(z) * Σ dy
        total = te.compute(lead, lambda *i: te.sum(dy[(*i, k)], axis=k), name="dy_sum")
        return te.compute(z.shape, lambda *i: dy[i] - y[i] * total[i[:-1]], name="dz")
    # sparsemax: on the support S, dz = dy - mean over S of dy; 0 elsewhere
    zero, one = tirx.const(0, z.dtype), tirx.const(1, z.dtype)
    k2 = te.reduce_axis((0, length), "k2")
    size = te.compute(lead, lambda *i: te.sum(tirx.Select(y[(*i, k)] > zero, one, zero), axis=k), name="support")
    total = te.compute(lead, lambda *i: te.sum(tirx.Select(y[(*i, k2)] > zero, dy[(*i, k2)], zero), axis=k2),
                       name="support_dy")
    return te.compute(z.shape, lambda *i: tirx.Select(y[i] > zero, dy[i] - total[i[:-1]] / size[i[:-1]], zero),
                      name="dz")


def activation_backward(wl: ConvWorkload):
    """PrimFunc (z, dy) -> dz; z and dz in the conv's output shape, dy in the layer's output shape."""
    z = te.placeholder(wl.conv_output_shape, wl.dtype, name="z")
    dy = te.placeholder(wl.output_shape, wl.dtype, name="dy")
    if wl.activation in DERIVATIVES:
        derivative = DERIVATIVES[wl.activation]
        dz = te.compute(z.shape, lambda *i: dy(*i) * derivative(z(*i)), name="dz")
    else:
        dz = _last_axis_backward(wl.activation, z, dy)
    return te.create_prim_func([z, dy, dz])


def _channels_last_view(tensor, channels_last: bool):
    """Index a tensor of the workload's layout as (n, h, w, c)."""
    if channels_last:
        return lambda n, h, w, c: tensor[n, h, w, c]
    return lambda n, h, w, c: tensor[n, c, h, w]


def input_backward(wl: ConvWorkload):
    """PrimFunc (dz, kernel) -> dx, the kernel in Keras's layout (kh, kw, in_channels // groups, filters)."""
    kh, kw = wl.kernel_size
    (sh, sw), (dh, dw) = wl.strides, wl.dilation
    top, left, _, _ = wl.pads
    cg, fg = wl.group_in_channels, wl.filters // wl.groups
    oh_n, ow_n = wl.out_height, wl.out_width
    dz = te.placeholder(wl.conv_output_shape, wl.dtype, name="dz")
    w = te.placeholder(wl.kernel_shape, wl.dtype, name="kernel")
    dz_at = _channels_last_view(dz, wl.channels_last)
    rh, rw, rf = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw"), te.reduce_axis((0, fg), "rf")

    def gather(n, h, x_w, c):
        # Output (oh, ow) read x[h, w] through tap (rh, rw) iff h + top - rh*dh = oh*sh with 0 <= oh < OH.
        hh, ww = h + top - rh * dh, x_w + left - rw * dw
        f = (c // cg) * fg + rf
        hit = tirx.all(hh >= 0, ww >= 0, tirx.floormod(hh, sh) == 0, tirx.floormod(ww, sw) == 0,
                       tirx.floordiv(hh, sh) < oh_n, tirx.floordiv(ww, sw) < ow_n)
        value = dz_at(n, tirx.floordiv(hh, sh), tirx.floordiv(ww, sw), f) * w[rh, rw, c % cg, f]
        return te.sum(tirx.if_then_else(hit, value, tirx.const(0, wl.dtype)), axis=[rh, rw, rf])

    if wl.channels_last:
        dx = te.compute(wl.input_shape, gather, name="dx")
    else:
        dx = te.compute(wl.input_shape, lambda n, c, h, x_w: gather(n, h, x_w, c), name="dx")
    return te.create_prim_func([dz, w, dx])


def weight_backward(wl: ConvWorkload):
    """PrimFunc (x, dz) -> dW[, db]: dW in Keras's layout, db when the layer has a bias."""
    kh, kw = wl.kernel_size
    (sh, sw), (dh, dw) = wl.strides, wl.dilation
    top, left, _, _ = wl.pads
    cg, fg = wl.group_in_channels, wl.filters // wl.groups
    x = te.placeholder(wl.input_shape, wl.dtype, name="x")
    dz = te.placeholder(wl.conv_output_shape, wl.dtype, name="dz")
    x_at, dz_at = _channels_last_view(x, wl.channels_last), _channels_last_view(dz, wl.channels_last)
    n_axis = te.reduce_axis((0, wl.batch), "n")
    oh, ow = te.reduce_axis((0, wl.out_height), "oh"), te.reduce_axis((0, wl.out_width), "ow")

    def correlate(i, j, c, f):
        h, x_w = oh * sh + i * dh - top, ow * sw + j * dw - left
        inside = tirx.all(h >= 0, h < wl.in_height, x_w >= 0, x_w < wl.in_width)
        value = x_at(n_axis, h, x_w, (f // fg) * cg + c) * dz_at(n_axis, oh, ow, f)
        return te.sum(tirx.if_then_else(inside, value, tirx.const(0, wl.dtype)), axis=[n_axis, oh, ow])

    dw_tensor = te.compute(wl.kernel_shape, correlate, name="dW")
    outputs = [dw_tensor]
    if wl.use_bias:
        n2, oh2, ow2 = (te.reduce_axis((0, wl.batch), "n2"), te.reduce_axis((0, wl.out_height), "oh2"),
                        te.reduce_axis((0, wl.out_width), "ow2"))
        outputs.append(te.compute((wl.filters,), lambda f: te.sum(dz_at(n2, oh2, ow2, f), axis=[n2, oh2, ow2]),
                                  name="db"))
    return _input_read_unaligned(te.create_prim_func([x, dz, *outputs]), wl)


# ---------------------------------------------------------------- gradients that are forward convolutions


def input_gradient_workload(wl: ConvWorkload) -> ConvWorkload | None:
    """The forward workload whose output is dx, when there is one: for stride 1 and padding that keeps
    the size on both sides alike (odd effective extents, or 1x1), dx is the forward convolution of dz
    with the kernel flipped in space and transposed per group (`transposed_kernel`). Else None."""
    extents = [d * (k - 1) + 1 for k, d in zip(wl.kernel_size, wl.dilation, strict=True)]
    if wl.strides != (1, 1) or not (wl.padding == "same" or extents == [1, 1]) or not all(e % 2 for e in extents):
        return None
    return dataclasses.replace(wl, in_height=wl.out_height, in_width=wl.out_width, in_channels=wl.filters,
                               filters=wl.in_channels, use_bias=False, activation="linear")


def transposed_kernel(kernel, groups: int):
    """Keras's (kh, kw, cin/groups, filters) kernel flipped in space, with (cin, filters) swapped per group."""
    kh, kw, cg, filters = kernel.shape
    fg = filters // groups
    flipped = kernel[::-1, ::-1].reshape(kh, kw, cg, groups, fg)
    return flipped.transpose(0, 1, 4, 3, 2).reshape(kh, kw, fg, groups * cg)


def kernel_gradient_workload(wl: ConvWorkload) -> ConvWorkload | None:
    """The forward workload whose output holds dW (without groups; else None), as `Conv2D._kernel_gradient`
    lays its arguments out:
      1x1: a matrix product, x's channels as pixels and dz's pixels as input channels;
      k x k: the padded input with its samples as channels and its channels as the batch, convolved
             with dz as an (OH x OW) kernel, the stride and dilation swapped."""
    if wl.groups != 1:
        return None
    if wl.kernel_size == (1, 1):
        pixels = wl.batch * wl.out_height * wl.out_width
        return ConvWorkload(1, 1, wl.in_channels, pixels, wl.filters, (1, 1), use_bias=False, dtype=wl.dtype)
    top, left, bottom, right = wl.pads
    return ConvWorkload(wl.in_channels, wl.in_height + top + bottom, wl.in_width + left + right, wl.batch,
                        wl.filters, (wl.out_height, wl.out_width), wl.dilation, wl.strides, use_bias=False,
                        dtype=wl.dtype)
