"""CUDA: the convolution as an implicit GEMM, tiled through shared memory.

Output pixels and filters form the GEMM's M and N; the reduction (window x input channels)
its K. Each thread block computes a (pixels of one output row x filters) tile; each
thread a small (pixels x filters) register tile; each step of the reduction stages a slice of
the input and of the weights in shared memory, loaded cooperatively by the block's threads.
The epilogue (bias, activation, cast, channels-first transpose) runs on the register tile.
Padding is read by bound checks (no padded copy: global memory traffic decides on a GPU).
The weights stay in Keras's layout, whose filter axis is contiguous: coalesced loads.

The template is a MetaSchedule design space too (tvmconv.tuning, tvmconv.rounds): `tunable_knobs`
lists its structural variants (the whole window or one tap staged per step), `sample_tiles` turns the
thread shape, the register tile and the channels per stage into sampled decisions, and `apply` takes
those as it takes plain integers. MetaSchedule's CUDA postprocessors reject the samples a block cannot
run (too many threads, more shared memory than the target's `max_shared_memory_per_block`).

The gradient kernels that are not convolutions (tvmconv.backward) have fixed schedules here: a thread
per element for the elementwise ones, a block of threads reducing each element of dW for the two kernels
of dW that are reductions.
"""
import dataclasses
import functools

from tvm import DataType, s_tir

from tvmconv import backward
from tvmconv.compute import ConvWorkload

from . import tensor_cores


@dataclasses.dataclass(frozen=True)
class Knobs:
    pixel_threads: int = 8    # threads along output pixels per block
    filter_threads: int = 16  # threads along filters per block
    pixel_tile: int = 4       # output pixels per thread
    filter_tile: int = 4      # filters per thread
    rc_tile: int = 8          # input channels per shared-memory stage
    window_stage: bool = True  # stage the whole kh x kw window per step (False: one tap per step)

    weight_block = 0  # Keras's weight layout (compute.pack_weights)
    flat_tile = 0  # the conv stage over (batch, rows, columns) (compute.conv2d_forward)
    layout = (0, 0, 0)  # Keras's weights, rows and columns, the direct sum: prim_func(*layout)


def _fit(extent: int, wanted: int) -> int:
    """The largest power of two not above `wanted` that does not exceed the extent much."""
    tile = wanted
    while tile > 1 and tile // 2 >= extent:
        tile //= 2
    return tile


def shared_bytes(target) -> int:
    """A block's shared memory: the target's, else 48 KB, which every CUDA GPU since Volta allows without
    opting in (tvmconv.targets' presets state it)."""
    return int(target.attrs.get("max_shared_memory_per_block", 48 * 1024))


def _window_stage_bytes(wl: ConvWorkload, knobs: Knobs) -> int:
    """Shared memory of a whole-window stage: the input rows and columns one block's output row
    segment reads, and the window's weights, for rc_tile channels."""
    kh, kw = wl.kernel_size
    rows = (kh - 1) * wl.dilation[0] + 1
    columns = (knobs.pixel_threads * knobs.pixel_tile - 1) * wl.strides[1] + (kw - 1) * wl.dilation[1] + 1
    weights = kh * kw * knobs.rc_tile * knobs.filter_threads * knobs.filter_tile
    return DataType(wl.dtype).bits // 8 * (rows * columns * knobs.rc_tile + weights)


def default_knobs(wl: ConvWorkload, target) -> Knobs:
    """Measured on an H200 over ResNet-50's layers at batch 1 (scripts/gpu_check.py, docs/benchmarks.md):
    1-2 pixels x 4 filters per thread, 16 input channels per stage holding the whole window, and on
    wide rows blocks of 4 pixel threads (more blocks for the SMs). Where the window would not fit in
    shared memory, fewer channels per stage, else one tap per stage."""
    width = wl.out_width
    pixel_threads, pixel_tile = (4, 2) if width >= 56 else (4, 1) if width >= 28 else (8, 1)
    pixel_threads = _fit(width, pixel_threads)
    filter_threads, filter_tile = _fit(wl.filters, 16), _fit(wl.filters // wl.groups, 4)
    # Where blocks overhang the row (7- and 14-wide rows), whole blocks of filters if fewer threads get there
    # (160 filters: 8 x 4, not 2.5 blocks of 16 x 4): with blocks overhanging both, TVM sized the stages of
    # MobileNetV2's 7x7x576 -> 160 layer at 18 MB of shared memory. (Not elsewhere: 16 threads a block made
    # MobileNetV2's 56x56x96 -> 24 layer 20 times slower on an H200.)
    while width % (pixel_threads * pixel_tile) and filter_threads > 4 and wl.filters % (filter_threads * filter_tile):
        filter_threads //= 2
    knobs = Knobs(pixel_threads=pixel_threads, filter_threads=filter_threads, pixel_tile=pixel_tile,
                  filter_tile=filter_tile, rc_tile=_fit(wl.group_in_channels, 16), window_stage=True)
    limit = shared_bytes(target)
    while _window_stage_bytes(wl, knobs) > limit and knobs.rc_tile > 1:
        knobs = dataclasses.replace(knobs, rc_tile=knobs.rc_tile // 2)
    if _window_stage_bytes(wl, knobs) > limit:
        knobs = dataclasses.replace(knobs, rc_tile=_fit(wl.group_in_channels, 8), window_stage=False)
    return knobs


def _sample(sch: s_tir.Schedule, candidates: list[int]):
    return sch.sample_categorical(candidates, [1 / len(candidates)] * len(candidates))


def _up_to(extent: int, values: tuple[int, ...]) -> list[int]:
    """The values not above `extent` (at least the smallest: a tile may overhang a small extent)."""
    return [v for v in values if v <= extent] or [values[0]]


def tunable_knobs(wl: ConvWorkload, target) -> list[Knobs]:
    """The structural variants, tile sizes at their defaults (`sample_tiles` samples them): the whole
    window staged per reduction step, or one tap of it."""
    default = default_knobs(wl, target)
    return [dataclasses.replace(default, window_stage=stage) for stage in (True, False)]


def sample_tiles(sch: s_tir.Schedule, wl: ConvWorkload, knobs: Knobs) -> Knobs:
    """`knobs` with the thread shape (pixel and filter threads per block), the register tile (pixels and
    filters per thread) and the input channels per shared-memory stage as decisions sampled in `sch`,
    none much larger than the extent it tiles. Samples that exceed a block's threads or shared memory
    are left for MetaSchedule's GPU verification to reject."""
    cg = wl.group_in_channels
    return dataclasses.replace(
        knobs,
        pixel_threads=_sample(sch, _up_to(wl.out_width, (1, 2, 4, 8, 16, 32))),
        filter_threads=_sample(sch, _up_to(wl.filters, (4, 8, 16, 32, 64))),
        pixel_tile=_sample(sch, _up_to(wl.out_width, (1, 2, 4))),
        filter_tile=_sample(sch, _up_to(wl.filters, (1, 2, 4, 8))),
        rc_tile=_sample(sch, sorted({c for c in (1, 2, 4, 8, 16, 32) if c <= cg} | ({cg} if cg <= 32 else set()))))


def _bind_elementwise(sch: s_tir.Schedule, block, threads: int = 128) -> None:
    """One thread per output element of a stage the template does not tile (last-axis activations, the
    elementwise gradient kernels); a reduction inside such a stage runs in its thread."""
    spatial = sum(1 for v in sch.get(block).iter_vars if v.iter_type == 0)
    fused = sch.fuse(*sch.get_loops(block)[:spatial])
    blocks, thread = sch.split(fused, factors=[None, threads])
    sch.bind(blocks, "blockIdx.x")
    sch.bind(thread, "threadIdx.x")


def apply(sch: s_tir.Schedule, wl: ConvWorkload, knobs: Knobs) -> None:
    """Schedule the convolution with `knobs`, whose tile sizes may be sampled decisions."""
    conv = sch.get_sblock("conv")
    n, oh, ow, f, rh, rw, rc = sch.get_loops(conv)
    # A block covers a segment of one output row; a thread a (pixels x filters) register tile.
    ow_block, ow_thread, ow_inner = sch.split(ow, factors=[None, knobs.pixel_threads, knobs.pixel_tile])
    f_block, f_thread, f_inner = sch.split(f, factors=[None, knobs.filter_threads, knobs.filter_tile])
    rc_o, rc_i = sch.split(rc, factors=[None, knobs.rc_tile])
    sch.reorder(n, oh, ow_block, f_block, ow_thread, f_thread, rc_o, rh, rw, rc_i, ow_inner, f_inner)
    sch.bind(sch.fuse(n, oh, ow_block, f_block), "blockIdx.x")
    thread = sch.fuse(ow_thread, f_thread)
    sch.bind(thread, "threadIdx.x")
    # Stage the reduction step's input and weights in shared memory, loaded by all threads: for rc_tile
    # channels, the whole window (input rows and taps read once per step, one barrier pair per step)
    # or one tap of it.
    stage_at = rc_o if knobs.window_stage else rw
    for operand in (0, 1):
        shared = sch.cache_read(conv, operand, "shared")
        sch.compute_at(shared, stage_at, preserve_unit_loops=True)
        loops = sch.get_loops(shared)
        depth = [sch.get(loop).same_as(sch.get(stage_at)) for loop in loops].index(True) + 1
        # Split by the two thread counts, not their product: a trace (a tuning record) holds sampled
        # values, not expressions of them.
        _, *loader = sch.split(sch.fuse(*loops[depth:]), factors=[None, knobs.pixel_threads, knobs.filter_threads])
        sch.bind(sch.fuse(*loader), "threadIdx.x")
    if wl.has_data_pad:
        # Inlined into the shared stage, not into the conv: the stage then spans exactly the padded
        # window (its bounds checks read the padding), where the input's clamped region is larger.
        sch.compute_inline(sch.get_sblock("data_pad"))
    sch.set_scope(conv, 0, "local")
    sch.decompose_reduction(conv, rc_o)
    sch.reverse_compute_at(sch.get_sblock("epilogue"), thread)


def _bind_the_rest(sch: s_tir.Schedule) -> None:
    """A last-axis activation's stages, after either template, need whole rows of the output: one thread
    per row or element. A block's outermost loop is read from the schedule's state, not by get_loops: that
    instruction would enter the trace with as many outputs as the templates' blocks have loops, which
    varies with the sampled tiles (unit loops are dropped), and a trace must replay with any decisions."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        outermost = sch.get_sref(block)
        while outermost.parent is not None and outermost.parent.parent is not None:  # up to the root block's child
            outermost = outermost.parent
        if getattr(outermost.stmt, "thread_binding", None) is None:
            _bind_elementwise(sch, block)


def schedule_elementwise(sch: s_tir.Schedule) -> None:
    """Every block of a gradient kernel without a reduction across threads (the activation's derivative,
    dW's regrouped input): one thread per element."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        _bind_elementwise(sch, block)


def schedule_weight_gradient_reduction(sch: s_tir.Schedule, threads: int = 128) -> None:
    """The depthwise and pointwise dW kernels (backward.depthwise_weight_gradient,
    pointwise_weight_gradient): each element of dW is a sum over every pixel of the batch, which one
    block of `threads` threads reduces (TVM lowers the threads' partial sums to a warp-shuffle reduction);
    a float16 layer's cast to its dtype runs as an elementwise stage."""
    block = sch.get_sblock("dW")
    loops = sch.get_loops(block)
    sch.bind(sch.fuse(*loops[:4]), "blockIdx.x")
    _, thread = sch.split(sch.fuse(*loops[4:]), factors=[None, threads])
    sch.bind(thread, "threadIdx.x")
    for other in sch.get_child_blocks(sch.get_sblock("root")):
        if not sch.get(other).same_as(sch.get(block)):
            _bind_elementwise(sch, other)


class CudaRule:
    """The schedule rule of CUDA targets (see schedules/__init__.py): for convolutions, the tensor-core
    template (tensor_cores.py) where it applies, else the implicit-GEMM template above, each with its design
    space (a convolution the tensor cores can compute may be tuned on either); the fixed schedules above for
    the gradient kernels."""

    name = "cuda"

    def __repr__(self):
        return "<CudaRule>"

    def applies(self, target) -> bool:
        return target.kind.name == "cuda"

    def default_knobs(self, workload, target) -> Knobs | tensor_cores.Knobs | None:
        if not isinstance(workload, ConvWorkload):
            return None
        if tensor_cores.applies(workload, target):
            return tensor_cores.default_knobs(workload)
        return default_knobs(workload, target)

    def tunable_knobs(self, workload, target) -> list:
        if not isinstance(workload, ConvWorkload):
            return []
        on_tensor_cores = [tensor_cores.default_knobs(workload)] if tensor_cores.applies(workload, target) else []
        return on_tensor_cores + tunable_knobs(workload, target)

    def sample_tiles(self, sch: s_tir.Schedule, workload: ConvWorkload, target, knobs):
        if isinstance(knobs, tensor_cores.Knobs):
            return tensor_cores.sample_tiles(sch, workload, knobs)
        return sample_tiles(sch, workload, knobs)

    @functools.singledispatchmethod
    def schedule(self, workload, sch: s_tir.Schedule, target, knobs) -> None:
        raise NotImplementedError(f"the cuda rule has no schedule for {type(workload).__name__}")

    @schedule.register
    def _(self, workload: ConvWorkload, sch: s_tir.Schedule, target, knobs) -> None:
        if isinstance(knobs, tensor_cores.Knobs):
            tensorizations = tensor_cores.apply(sch, workload, knobs)
            _bind_the_rest(sch)
            for loop, intrinsic in tensorizations:
                sch.tensorize(loop, intrinsic)
        else:
            apply(sch, workload, knobs)
            _bind_the_rest(sch)

    @schedule.register(backward.ActivationGradient)
    @schedule.register(backward.WeightGradientImage)
    def _(self, workload, sch: s_tir.Schedule, target, knobs=None) -> None:
        schedule_elementwise(sch)

    @schedule.register(backward.DepthwiseWeightGradient)
    @schedule.register(backward.PointwiseWeightGradient)
    def _(self, workload, sch: s_tir.Schedule, target, knobs=None) -> None:
        schedule_weight_gradient_reduction(sch)


RULE = CudaRule()
