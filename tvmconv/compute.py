"""The convolution as TVM tensor expressions: shape arithmetic, forward compute, fused epilogue.

Target-free, like topi's `nn/`: schedules and builds consume what is declared here.
Block names are part of the contract with `schedules/` (see `conv2d_forward`). Last-axis
activations (softmax, log_softmax, sparsemax, glu) add blocks after "epilogue".

Every compiled workload, a forward convolution (`ConvWorkload`) or a gradient kernel
(`tvmconv.backward`), has one interface for builds, records and tuning:
  key          a stable identity (cache file names, tuning logs);
  label        a short readable description;
  flops        the work it does, for GFLOP/s figures;
  prim_func(weight_block, flat_tile, winograd)  the unscheduled PrimFunc (weights packed in blocks of
               `weight_block` filters, 0: Keras's layout; the conv stage's pixels as one axis in tiles of
               `flat_tile`, 0: rows and columns; Winograd F(`winograd`, 3), 0: the direct sum; kernels
               without weights ignore all three), built once per workload and layout;
  stand_ins()  the workloads whose tuning records may serve it, closest first, itself first.
How a workload is scheduled by default is its schedule rule's business (schedules/).

Words: "weights" are the layer's parameters (the convolution's filter taps and the bias); a
"kernel" is compiled code. Keras's own names (`Conv2D.kernel`, `kernel_size`, `kernel_initializer`)
keep Keras's meaning at the layer's API.
"""
import dataclasses
import functools
import hashlib
import json
import math
import re

import numpy as np
import tvm.script
from tvm import te, tirx
from tvm.topi.nn import winograd_util

# ---------------------------------------------------------------- shape arithmetic (one helper)


def conv_output_length(length: int, kernel: int, stride: int, dilation: int, padding: str) -> int:
    effective = (kernel - 1) * dilation + 1
    if padding == "same":
        return -(-length // stride)
    return (length - effective) // stride + 1


def conv_output_shape(input_shape, filters: int, kernel_size, strides, dilation, padding: str,
                      channels_last: bool) -> tuple:
    """Keras's compute_conv_output_shape: the convolution's output shape for an input shape whose axes may
    be None (unknown: None in the output too); a zero or negative size raises Keras's ValueError."""
    spatial = input_shape[1:3] if channels_last else input_shape[2:4]
    out = [None if n is None else conv_output_length(n, k, s, d, padding)
           for n, k, s, d in zip(spatial, kernel_size, strides, dilation)]
    if any(n is not None and n <= 0 for n in out):
        raise ValueError("Computed output size would be zero or negative. Received "
                         f"`inputs shape={tuple(input_shape)}`, `kernel shape={tuple(kernel_size)}`, "
                         f"`dilation_rate={tuple(dilation)}`, `strides={tuple(strides)}`, `padding={padding}`.")
    return (input_shape[0], *out, filters) if channels_last else (input_shape[0], filters, *out)


def same_padding(length: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """Keras/TF "same": the extra pixel of an odd total goes at the end (bottom/right)."""
    out = conv_output_length(length, kernel, stride, dilation, "same")
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - length, 0)
    return total // 2, total - total // 2


# ---------------------------------------------------------------- the workload


@dataclasses.dataclass(frozen=True)
class ConvWorkload:
    """Everything that determines a compiled forward kernel, in the user's data format. Derived shapes are
    computed once per workload (cached properties): a layer's every call reads them."""

    batch: int
    in_height: int
    in_width: int
    in_channels: int
    filters: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    padding: str = "valid"
    groups: int = 1
    data_format: str = "channels_last"
    dtype: str = "float32"
    use_bias: bool = True
    activation: str = "linear"
    tf32: bool = False  # float32 multiplied on tensor cores in TF32 (10-bit mantissa), accumulated in float32

    def fields(self) -> dict:
        """The fields as keys and tuning logs store them: `tf32` only when set, so that the keys and the
        records of every workload from before it existed stay valid."""
        fields = dataclasses.asdict(self)
        if not self.tf32:
            del fields["tf32"]
        return fields

    @classmethod
    def from_fields(cls, fields) -> "ConvWorkload":
        """The workload that `fields()` stored (read from a tuning log or a round of candidates: checked,
        not trusted)."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        if not isinstance(fields, dict) or not set(fields) <= set(names) or not {
                name for name, f in names.items() if f.default is dataclasses.MISSING} <= set(fields):
            raise ValueError(f"not a convolution's fields: {fields!r}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        allowed = {"padding": ("valid", "same"), "data_format": ("channels_last", "channels_first"),
                   "dtype": ("float16", "float32", "float64"),
                   "activation": (*ELEMENTWISE_ACTIVATIONS, *LAST_AXIS_ACTIVATIONS)}
        for name, value in values.items():
            if name in allowed:
                valid = value in allowed[name]
            elif names[name].type in (bool, "bool"):
                valid = isinstance(value, bool)
            elif isinstance(value, tuple):
                valid = len(value) == 2 and all(type(v) is int and v > 0 for v in value)
            else:
                valid = type(value) is int and value > 0
            if not valid:
                raise ValueError(f"not a convolution's fields: {name}={value!r}")
        return cls(**values)

    @property
    def label(self) -> str:
        """Short and readable, e.g. "(1, 56, 56, 64)->64 3x3 s2 g32 same"."""
        kh, kw = self.kernel_size
        extras = [f"s{self.strides[0]}" if self.strides != (1, 1) else "",
                  f"d{self.dilation[0]}" if self.dilation != (1, 1) else "",
                  f"g{self.groups}" if self.groups > 1 else "", self.padding, "tf32" if self.tf32 else ""]
        return " ".join([f"{self.input_shape}->{self.filters} {kh}x{kw}", *filter(None, extras)])

    @property
    def channels_last(self) -> bool:
        return self.data_format == "channels_last"

    @property
    def accum_dtype(self) -> str:
        # float16 multiplies and accumulates in float32, then rounds once at the end.
        return "float64" if self.dtype == "float64" else "float32"

    @functools.cached_property
    def pads(self) -> tuple[int, int, int, int]:
        """(top, left, bottom, right)"""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        top, bottom = same_padding(self.in_height, self.kernel_size[0], self.strides[0], self.dilation[0])
        left, right = same_padding(self.in_width, self.kernel_size[1], self.strides[1], self.dilation[1])
        return (top, left, bottom, right)

    @property
    def has_data_pad(self) -> bool:
        """Whether the forward compute copies the input into a "data_pad" stage (padded, channels-last)."""
        return not self.channels_last or any(self.pads)

    @functools.cached_property
    def out_height(self) -> int:
        return conv_output_length(self.in_height, self.kernel_size[0], self.strides[0], self.dilation[0],
                                  self.padding)

    @functools.cached_property
    def out_width(self) -> int:
        return conv_output_length(self.in_width, self.kernel_size[1], self.strides[1], self.dilation[1],
                                  self.padding)

    @property
    def group_in_channels(self) -> int:
        return self.in_channels // self.groups

    def _layout(self, h, w, c) -> tuple:
        return (self.batch, h, w, c) if self.channels_last else (self.batch, c, h, w)

    @functools.cached_property
    def input_shape(self) -> tuple:
        return self._layout(self.in_height, self.in_width, self.in_channels)

    @property
    def weights_shape(self) -> tuple:
        """The convolution's weights in Keras's layout: (kh, kw, in_channels // groups, filters)."""
        return (*self.kernel_size, self.group_in_channels, self.filters)

    @functools.cached_property
    def conv_output_shape(self) -> tuple:
        """The convolution's own output, before a last-axis activation may reshape it."""
        return conv_output_shape(self.input_shape, self.filters, self.kernel_size, self.strides, self.dilation,
                                 self.padding, self.channels_last)

    @functools.cached_property
    def output_shape(self) -> tuple:
        shape = self.conv_output_shape
        # glu halves the last axis: the filters for channels_last, the width for channels_first.
        return (*shape[:-1], shape[-1] // 2) if self.activation == "glu" else shape

    @functools.cached_property
    def flops(self) -> int:
        """Multiply-adds of the convolution counted as 2 FLOPs each."""
        return (2 * self.batch * self.out_height * self.out_width * self.filters
                * self.group_in_channels * self.kernel_size[0] * self.kernel_size[1])

    @functools.cached_property
    def _hash(self) -> int:
        return hash(dataclasses.astuple(self))

    def __hash__(self) -> int:  # hashed once: each layer call looks its workload up
        return self._hash

    @functools.cached_property
    def key(self) -> str:
        """A stable identity (a hash of `fields()`), used in cache file names and tuning logs."""
        return "conv2d-" + hashlib.sha256(repr(tuple(self.fields().values())).encode()).hexdigest()[:16]

    def prim_func(self, weight_block: int = 0, flat_tile: int = 0, winograd: int = 0):
        return conv2d_forward(self, weight_block, flat_tile, winograd)

    @property
    def winograd_applies(self) -> bool:
        """Whether Winograd F(m, 3) computes this convolution (`conv2d_forward`): 3x3, stride 1, undilated,
        ungrouped."""
        return (self.kernel_size == (3, 3) and self.strides == (1, 1) and self.dilation == (1, 1)
                and self.groups == 1)

    def winograd_tiles(self, m: int) -> tuple[int, int]:
        """Rows and columns of output tiles of m x m pixels per image (the last ones cropped)."""
        return -(-self.out_height // m), -(-self.out_width // m)

    def winograd_gemm(self, m: int) -> "ConvWorkload":
        """The batched product at the heart of Winograd F(m, 3) as the 1x1 convolution whose loops it has:
        one "image" per point of the (m + 2)^2 transform, one "pixel" per tile, the channels reduced. Its
        register tiles are chosen and tuned as that convolution's (schedules/cpu.py)."""
        rows, columns = self.winograd_tiles(m)
        return ConvWorkload((m + 2) ** 2, 1, self.batch * rows * columns, self.in_channels, self.filters, (1, 1),
                            dtype=self.dtype, use_bias=False)

    def stand_ins(self) -> list[tuple["ConvWorkload", str | None]]:
        """This workload, then those whose records may stand in for it, closest first, each with how it
        differs: the same convolution with a plain epilogue (with or without bias, linear), which is what
        tuning logs of network layers (tvmconv.networks) hold. The main loop is theirs; the epilogue runs
        on the tile in registers. Never another batch: a trace replays there too, but its tiles and
        threads were measured for its own batch (Zen 4, MobileNetV2 at batch 8: 6 of 13 batch-1 records
        ran slower than the defaults, one 5.2x, its depthwise stride-2 layer of 56x56)."""
        options = [self] + [dataclasses.replace(self, use_bias=use_bias, activation=activation)
                            for use_bias, activation in ((False, "linear"), (True, "linear"))]
        found = {}
        for option in options:
            differences = [f"{name}={getattr(option, name)}" for name in ("use_bias", "activation")
                           if getattr(option, name) != getattr(self, name)]
            found.setdefault(option.key, (option, ", ".join(differences) or None))
        return list(found.values())


# ---------------------------------------------------------------- activations as expressions


# Expression helpers, shared with the activations' derivatives (tvmconv.backward).
SELU_ALPHA, SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


def const(x, value):
    """`value` as a constant of x's dtype."""
    return tirx.const(value, str(x.ty))


def where(cond, a, b):
    return tirx.Select(cond, a, b)


def softplus(x):  # log(1 + e^x) without overflow
    return te.max(x, const(x, 0)) + tirx.log1p(tirx.exp(-tirx.abs(x)))


def relu6(x):
    return te.min(te.max(x, const(x, 0)), const(x, 6))


def hard_sigmoid(x):
    return relu6(x + const(x, 3)) / const(x, 6)


def _activation_formulas():
    """Keras 3's elementwise activations on one TIR expression, with Keras's default parameters."""

    def sigmoid(x):
        return tirx.sigmoid(x)

    def expm1_neg(x, alpha):  # alpha * (e^x - 1) for x <= 0, x otherwise
        return where(x > const(x, 0), x, const(x, alpha) * (tirx.exp(te.min(x, const(x, 0))) - const(x, 1)))

    return {
        "linear": lambda x: x,
        "relu": lambda x: te.max(x, const(x, 0)),
        "relu6": relu6,
        "sigmoid": sigmoid,
        "tanh": tirx.tanh,
        "exponential": tirx.exp,
        "elu": lambda x: expm1_neg(x, 1.0),
        "celu": lambda x: expm1_neg(x, 1.0),  # alpha = 1: celu(x) = elu(x / alpha) * alpha
        "selu": lambda x: const(x, SELU_SCALE) * expm1_neg(x, SELU_ALPHA),
        "gelu": lambda x: const(x, 0.5) * x * (const(x, 1) + tirx.erf(x * const(x, 1 / math.sqrt(2)))),
        "hard_sigmoid": hard_sigmoid,
        "hard_silu": lambda x: x * hard_sigmoid(x),
        "hard_tanh": lambda x: te.min(te.max(x, const(x, -1)), const(x, 1)),
        "hard_shrink": lambda x: where(tirx.abs(x) > const(x, 0.5), x, const(x, 0)),
        "soft_shrink": lambda x: where(x > const(x, 0.5), x - const(x, 0.5),
                                       where(x < const(x, -0.5), x + const(x, 0.5), const(x, 0))),
        "leaky_relu": lambda x: where(x >= const(x, 0), x, const(x, 0.2) * x),
        "log_sigmoid": lambda x: -softplus(-x),
        "mish": lambda x: x * tirx.tanh(softplus(x)),
        "silu": lambda x: x * sigmoid(x),
        "softplus": softplus,
        "softsign": lambda x: x / (tirx.abs(x) + const(x, 1)),
        "sparse_plus": lambda x: where(x <= const(x, -1), const(x, 0),
                                       where(x >= const(x, 1), x, (x + const(x, 1)) * (x + const(x, 1)) / const(x, 4))),
        "sparse_sigmoid": lambda x: where(x <= const(x, -1), const(x, 0),
                                          where(x >= const(x, 1), const(x, 1), (x + const(x, 1)) / const(x, 2))),
        "squareplus": lambda x: (x + tirx.sqrt(x * x + const(x, 4))) / const(x, 2),
        "tanh_shrink": lambda x: x - tirx.tanh(x),
    }


ELEMENTWISE_ACTIVATIONS = _activation_formulas()


# te.max starts from the dtype's lowest value, and TVMScript (see read_unaligned) rejects
# float64 literals beyond float32's range: start from float32's lowest, far below any activation.
# (z is in the accumulator dtype, float32 or float64.)
_row_max = te.comm_reducer(lambda a, b: te.max(a, b), lambda dtype: tirx.const(-3.4e38, dtype), name="row_max")


def _softmax(z, log=False):
    *lead, length = z.shape
    k = te.reduce_axis((0, length), "k")
    zmax = te.compute(lead, lambda *i: _row_max(z[(*i, k)], axis=k), name="softmax_max")
    k2 = te.reduce_axis((0, length), "k2")
    total = te.compute(lead, lambda *i: te.sum(tirx.exp(z[(*i, k2)] - zmax[i]), axis=k2), name="softmax_sum")
    if log:
        return te.compute(z.shape, lambda *i: z[i] - zmax[i[:-1]] - tirx.log(total[i[:-1]]), name="log_softmax")
    return te.compute(z.shape, lambda *i: tirx.exp(z[i] - zmax[i[:-1]]) / total[i[:-1]], name="softmax")


def _sparsemax(z):
    """Sparsemax without a sort: z_j is in the support iff 1 + |{i: z_i >= z_j}| * z_j > sum_{z_i >= z_j} z_i."""
    *lead, length = z.shape
    zero, one = tirx.const(0, z.dtype), tirx.const(1, z.dtype)

    k = te.reduce_axis((0, length), "k")
    count = te.compute(z.shape, lambda *i: te.sum(tirx.Select(z[(*i[:-1], k)] >= z[i], one, zero), axis=k),
                       name="sparsemax_count")
    k2 = te.reduce_axis((0, length), "k2")
    mass = te.compute(z.shape, lambda *i: te.sum(tirx.Select(z[(*i[:-1], k2)] >= z[i], z[(*i[:-1], k2)], zero),
                                                 axis=k2), name="sparsemax_mass")
    k3 = te.reduce_axis((0, length), "k3")
    k4 = te.reduce_axis((0, length), "k4")

    def in_support(i, j):
        return one + count[(*i, j)] * z[(*i, j)] > mass[(*i, j)]

    support = te.compute(lead, lambda *i: te.sum(tirx.Select(in_support(i, k3), one, zero), axis=k3),
                         name="sparsemax_size")
    support_mass = te.compute(lead, lambda *i: te.sum(tirx.Select(in_support(i, k4), z[(*i, k4)], zero), axis=k4),
                              name="sparsemax_support_mass")
    return te.compute(z.shape, lambda *i: te.max(z[i] - (support_mass[i[:-1]] - one) / support[i[:-1]], zero),
                      name="sparsemax")


def _glu(z):
    *lead, length = z.shape
    half = length // 2
    return te.compute((*lead, half), lambda *i: z[i] * tirx.sigmoid(z[(*i[:-1], i[-1] + half)]), name="glu")


LAST_AXIS_ACTIVATIONS = {
    "softmax": _softmax,
    "log_softmax": lambda z: _softmax(z, log=True),
    "sparsemax": _sparsemax,
    "glu": _glu,
}


# ---------------------------------------------------------------- forward compute


def packed_weights_shape(wl: ConvWorkload, block: int, winograd: int = 0) -> tuple:
    """The weights in blocks of `block` filters: (ceil(filters / block), kh, kw, in_channels // groups, block),
    so one register tile's weights are contiguous; with `winograd` = m, transformed for F(m, 3):
    ((m + 2)^2, ceil(filters / block), in_channels, block). block == 0 means Keras's layout."""
    if winograd:
        return ((winograd + 2) ** 2, -(-wl.filters // block), wl.in_channels, block)
    if not block:
        return wl.weights_shape
    return (-(-wl.filters // block), *wl.kernel_size, wl.group_in_channels, block)


def winograd_matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ((m + 2) x m), B ((m + 2) x (m + 2)) and G ((m + 2) x 3) of Winograd F(m, 3), from TVM's
    Cook-Toom construction (the interpolation points topi's Winograd uses): y = Aᵀ [(G w Gᵀ) ⊙ (Bᵀ d B)] A."""
    points = winograd_util._interpolation_points(m + 2)
    return tuple(np.asarray(a, np.float64) for a in winograd_util._cook_toom_convolution(points, m, 3))


def pack_weights(weights: np.ndarray, block: int, winograd: int = 0) -> np.ndarray:
    """Keras's (kh, kw, cin/groups, filters) weights → `packed_weights_shape` (zero-filled past `filters`).
    Winograd's transform G w Gᵀ is done here, once per weight change, in float64."""
    if winograd:
        g = winograd_matrices(winograd)[2]
        points = np.einsum("ea,abcf,gb->egcf", g, weights.astype(np.float64), g)
        weights = points.reshape(1, -1, *weights.shape[2:]).astype(weights.dtype)  # as a 1 x alpha^2 "kernel"
    if not block:
        return weights
    kh, kw, cg, filters = weights.shape
    blocks = -(-filters // block)
    padded = np.zeros((kh, kw, cg, blocks * block), dtype=weights.dtype)
    padded[..., :filters] = weights
    packed = padded.reshape(kh, kw, cg, blocks, block).transpose(3, 0, 1, 2, 4)
    if winograd:  # (blocks, 1, alpha^2, cin, block) -> (alpha^2, blocks, cin, block)
        packed = packed[:, 0].transpose(1, 0, 2, 3)
    return np.ascontiguousarray(packed)


# The PrimFunc's attribute holding its ConvWorkload's fields (for a gradient kernel: its layer's).
WORKLOAD_ATTR = "tvmconv.workload"
# The PrimFunc's attribute naming its weight layout. Its name predates the word "weights" here and
# stays: tuning logs match records by the PrimFunc's structure, attributes included.
WEIGHT_BLOCK_ATTR = "tvmconv.kernel_block"
# The PrimFunc's attribute naming its flat tile, only where it has one: records of PrimFuncs without one
# (those tuned before flat tiles were tunable) keep matching.
FLAT_TILE_ATTR = "tvmconv.flat_tile"
# The PrimFunc's attribute naming its Winograd tile, only where it has one (as the flat tile's).
WINOGRAD_ATTR = "tvmconv.winograd"
# The Winograd output tiles conv2d_forward computes: F(2, 3) and F(4, 3). Larger ones lose accuracy in float32.
WINOGRAD_TILES = (2, 4)


def check_layout(wl: ConvWorkload, weight_block: int, flat_tile: int, winograd: int) -> None:
    """Refuse a PrimFunc layout conv2d_forward cannot compute for `wl` (ValueError): tuning logs and rounds
    of candidates name layouts, and they are read, not trusted."""
    if min(weight_block, flat_tile, winograd) < 0:
        raise ValueError(f"weight_block, flat_tile and winograd must not be negative, got "
                         f"{(weight_block, flat_tile, winograd)}")
    if winograd and (winograd not in WINOGRAD_TILES or not wl.winograd_applies or not weight_block or flat_tile):
        raise ValueError(f"winograd={winograd}: Winograd F(m, 3) takes m in {WINOGRAD_TILES}, a 3x3 stride-1 "
                         f"undilated ungrouped convolution, packed weights (weight_block > 0) and no flat tile; "
                         f"got {wl.label}, weight_block={weight_block}, flat_tile={flat_tile}")


@functools.lru_cache(maxsize=512)
def conv2d_forward(wl: ConvWorkload, weight_block: int = 0, flat_tile: int = 0, winograd: int = 0):
    """The forward PrimFunc with arguments (x, weights[, bias], y), x and y in the workload's layout.
    Built once per workload and layout (PrimFuncs are immutable): builds, record lookups and tuning share it.

    The weights are in Keras's layout (kh, kw, in_channels // groups, filters), or packed by
    `pack_weights` when weight_block > 0. Stages, by block name:
      "data_pad" — the input, zero-padded and channels-last; absent when the input already is both.
      "conv"     — the convolution in the accumulator dtype: (batch, height, width, filters), or with
                   flat_tile > 0 (pixels, filters), the pixels of all samples and rows as one axis
                   rounded up to a multiple of flat_tile. Its last pixels repeat the last real one,
                   so that tiles of flat_tile pixels need no bound checks (see schedules/cpu.py).
      "epilogue" — bias + activation + cast, written in the workload's layout.
    With winograd = m > 0 (`ConvWorkload.winograd_applies`; weight_block > 0), Winograd F(m, 3) instead,
    (m + 2)^2 = alpha^2 products per tile of m x m output pixels where the direct sum takes 9 m^2:
      "winograd_rows", "winograd_input" — the input transform Bᵀ d B of each tile's (m + 2)^2 window
                   (zero outside the image), rows then columns: (alpha, alpha, tiles, in_channels);
      "conv"     — per point of the transform, tiles x in_channels times in_channels x filters, with
                   the loops of `ConvWorkload.winograd_gemm`'s conv stage: (alpha^2, 1, tiles, filters);
      "winograd_output" — the output transform's first half, its second read by "epilogue".
    """
    check_layout(wl, weight_block, flat_tile, winograd)
    acc = wl.accum_dtype
    x = te.placeholder(wl.input_shape, wl.dtype, name="x")
    w = te.placeholder(packed_weights_shape(wl, weight_block, winograd), wl.dtype, name="weights")
    b = te.placeholder((wl.filters,), wl.dtype, name="bias") if wl.use_bias else None

    def input_at(n, h, ww, c):
        return x[n, h, ww, c] if wl.channels_last else x[n, c, h, ww]

    if winograd:
        conv_at = _winograd_conv(wl, winograd, input_at, w)
    else:
        conv_at = _direct_conv(wl, weight_block, flat_tile, x, input_at, w)

    def biased(n, oh, ow, f):
        value = conv_at(n, oh, ow, f)
        return value + b[f].astype(acc) if b is not None else value

    def in_layout(value):  # index the workload's layout, read the channels-last conv
        if wl.channels_last:
            return value
        return lambda n, f, oh, ow: value(n, oh, ow, f)

    out_shape = wl.conv_output_shape
    if wl.activation in LAST_AXIS_ACTIVATIONS:
        z = te.compute(out_shape, in_layout(biased), name="epilogue")
        activated = LAST_AXIS_ACTIVATIONS[wl.activation](z)
        y = te.compute(activated.shape, lambda *i: activated[i].astype(wl.dtype), name="output")
    else:
        act = ELEMENTWISE_ACTIVATIONS[wl.activation]
        y = te.compute(out_shape, in_layout(lambda *i: act(biased(*i)).astype(wl.dtype)), name="epilogue")
    args = [x, w] + ([b] if b is not None else []) + [y]
    # The workload and weight layout ride along as attributes: tuning logs name what they tuned.
    layout = {WEIGHT_BLOCK_ATTR: weight_block, **({FLAT_TILE_ATTR: flat_tile} if flat_tile else {}),
              **({WINOGRAD_ATTR: winograd} if winograd else {})}
    func = te.create_prim_func(args).with_attr({WORKLOAD_ATTR: json.dumps(wl.fields()), **layout})
    return read_unaligned(func)


def _direct_conv(wl: ConvWorkload, weight_block: int, flat_tile: int, x, input_at, w):
    """The direct sum's "data_pad" and "conv" stages; returns conv_at(n, oh, ow, f), reading "conv"."""
    kh, kw = wl.kernel_size
    sh, sw = wl.strides
    dh, dw = wl.dilation
    top, left, bottom, right = wl.pads
    cg, fg = wl.group_in_channels, wl.filters // wl.groups
    acc = wl.accum_dtype
    if not wl.has_data_pad:
        data = x
    else:
        def padded(n, h, ww, c):
            guards = [g for g, needed in ((h >= top, top), (h < wl.in_height + top, bottom),
                                          (ww >= left, left), (ww < wl.in_width + left, right)) if needed]
            value = input_at(n, h - top, ww - left, c)
            return tirx.if_then_else(tirx.all(*guards), value, tirx.const(0, wl.dtype)) if guards else value
        data = te.compute((wl.batch, wl.in_height + top + bottom, wl.in_width + left + right, wl.in_channels),
                          padded, name="data_pad")

    def weight(rh, rw, rc, f):
        if weight_block:
            return w[f // weight_block, rh, rw, rc, f % weight_block]
        return w[rh, rw, rc, f]

    rh, rw, rc = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw"), te.reduce_axis((0, cg), "rc")

    def window_sum(n, oh, ow, f):
        return te.sum(data[n, oh * sh + rh * dh, ow * sw + rw * dw, (f // fg) * cg + rc].astype(acc)
                      * weight(rh, rw, rc, f).astype(acc), axis=[rh, rw, rc])

    if not flat_tile:
        conv = te.compute((wl.batch, wl.out_height, wl.out_width, wl.filters), window_sum, name="conv")

        def conv_at(n, oh, ow, f):
            return conv(n, oh, ow, f)  # a call, not [], gives an expression with a dtype
        return conv_at
    oh_ow = wl.out_height * wl.out_width
    pixels = wl.batch * oh_ow

    def flat_sum(p, f):
        last = tirx.min(p, pixels - 1) if pixels % flat_tile else p
        return window_sum(last // oh_ow, last % oh_ow // wl.out_width, last % wl.out_width, f)
    conv = te.compute((-(-pixels // flat_tile) * flat_tile, wl.filters), flat_sum, name="conv")

    def flat_at(n, oh, ow, f):
        return conv(n * oh_ow + oh * wl.out_width + ow, f)
    return flat_at


def _weighted_sum(terms):
    """sum(coefficient * value) for Python-number coefficients: zeros dropped, ±1 without a multiply (the
    transforms' matrices are mostly 0 and ±1, and LLVM does not fold float multiplies by them)."""
    total = None
    for coefficient, value in terms:
        if coefficient:
            term = value if coefficient == 1 else -value if coefficient == -1 else value * float(coefficient)
            total = term if total is None else total + term
    return total


def _select(index, count: int, expr_for):
    """expr_for(i) where index == i, for i < count: each copy of an unrolled loop over `index` folds to one."""
    expr = expr_for(count - 1)
    for i in range(count - 2, -1, -1):
        expr = tirx.Select(index == i, expr_for(i), expr)
    return expr


def _winograd_conv(wl: ConvWorkload, m: int, input_at, w):
    """Winograd F(m, 3)'s stages up to the output transform's first half (see conv2d_forward); returns
    conv_at(n, oh, ow, f), its second half. The weights are G w Gᵀ, packed (`pack_weights`)."""
    a, b, _ = winograd_matrices(m)
    alpha, acc, block = m + 2, wl.accum_dtype, w.shape[-1]
    rows, columns = wl.winograd_tiles(m)
    tiles = wl.batch * rows * columns
    top, left = wl.pads[:2]

    def window(p, i, j, c):  # a tile's input window, zero outside the image
        n, t = p // (rows * columns), p % (rows * columns)
        h, ww = (t // columns) * m + i - top, (t % columns) * m + j - left
        inside = tirx.all(h >= 0, h < wl.in_height, ww >= 0, ww < wl.in_width)
        return tirx.if_then_else(inside, input_at(n, h, ww, c).astype(acc), tirx.const(0, acc))
    by_rows = te.compute((tiles, alpha, alpha, wl.in_channels), lambda p, i, nu, c: _select(
        nu, alpha, lambda k: _weighted_sum((b[j, k], window(p, i, j, c)) for j in range(alpha))), name="winograd_rows")
    data = te.compute((alpha, alpha, tiles, wl.in_channels), lambda eps, nu, p, c: _select(
        eps, alpha, lambda k: _weighted_sum((b[i, k], by_rows[p, i, nu, c]) for i in range(alpha))),
        name="winograd_input")
    rh, rw, rc = te.reduce_axis((0, 1), "rh"), te.reduce_axis((0, 1), "rw"), te.reduce_axis((0, wl.in_channels), "rc")
    # The loops of winograd_gemm's conv stage (image = point of the transform, one row, pixel = tile); the
    # 1x1 window's axes multiply nothing but keep the stage's shape, which the schedule reads.
    conv = te.compute((alpha * alpha, 1, tiles, wl.filters), lambda g, o, p, f: te.sum(
        data[g // alpha, g % alpha, p + rh + rw + o, rc] * w[g, f // block, rc, f % block].astype(acc),
        axis=[rh, rw, rc]), name="conv")
    half = te.compute((tiles, alpha, m, wl.filters), lambda p, i, jj, f: _select(
        jj, m, lambda q: _weighted_sum((a[j, q], conv[i * alpha + j, 0, p, f]) for j in range(alpha))),
        name="winograd_output")

    def conv_at(n, oh, ow, f):
        p = n * rows * columns + (oh // m) * columns + ow // m
        return _select(oh % m, m, lambda q: _weighted_sum((a[i, q], half[p, i, ow % m, f]) for i in range(alpha)))
    return conv_at


def read_unaligned(func, names: tuple[str, ...] = ("x",)):
    """Declare the input buffers `names` with element alignment instead of TVM's 64 bytes, so the kernel
    reads the caller's arrays in place (numpy aligns to 16 bytes): vector loads of them are then
    unaligned ones, which cost the same on the CPUs we target. TE has no alignment option and
    PrimFunc.specialize refuses to change one, so the declarations are rewritten in the TVMScript."""
    text = func.script()
    buffers = {param.name: param for param in func.params}  # TVM 0.27: the params are the buffers
    for name in names:
        buffer = buffers[name]
        shape = tuple(int(extent) for extent in buffer.shape)
        declared, itemsize = f'{name}: T.Buffer({shape}, "{buffer.dtype}"', np.dtype(str(buffer.dtype)).itemsize
        # (?<!\w): "z: T.Buffer(..." must not match inside "dz: T.Buffer(...".
        text, found = re.subn(r"(?<!\w)" + re.escape(declared), lambda m: f"{m.group(0)}, align={itemsize}", text)
        if found != 1:
            raise RuntimeError(f"unexpected signature for the input buffer {name!r}: found {found} times")
    return tvm.script.from_source(text)
