"""CUDA: the convolution as an implicit GEMM, tiled through shared memory.

Output pixels and filters form the GEMM's M and N; the reduction (window x input channels)
its K. Each thread block computes a (pixels of one output row x filters) tile; each
thread a small (pixels x filters) register tile; each step of the reduction stages a slice of
the input and of the weights in shared memory, loaded cooperatively by the block's threads.
The epilogue (bias, activation, cast, channels-first transpose) runs on the register tile.
Padding is read by bound checks (no padded copy: global memory traffic decides on a GPU).
The weights stay in Keras's layout, whose filter axis is contiguous: coalesced loads.
"""
import dataclasses

from tvm import s_tir

from tvmconv.compute import ConvWorkload


@dataclasses.dataclass(frozen=True)
class Knobs:
    pixel_threads: int = 8    # threads along output pixels per block
    filter_threads: int = 16  # threads along filters per block
    pixel_tile: int = 4       # output pixels per thread
    filter_tile: int = 4      # filters per thread
    rc_tile: int = 8          # input channels per shared-memory stage
    window_stage: bool = True  # stage the whole kh x kw window per step (False: one tap per step)

    weight_block = 0  # Keras's weight layout (compute.pack_weights)


def _fit(extent: int, wanted: int) -> int:
    """The largest power of two not above `wanted` that does not exceed the extent much."""
    tile = wanted
    while tile > 1 and tile // 2 >= extent:
        tile //= 2
    return tile


# A block's shared memory, where every CUDA GPU since Volta allows 48 KB without opting in.
_SHARED_BYTES = 48 * 1024


def _window_stage_bytes(wl: ConvWorkload, knobs: Knobs) -> int:
    """Shared memory of a whole-window stage: the input rows and columns one block's output row
    segment reads, and the window's weights, for rc_tile channels (float32)."""
    kh, kw = wl.kernel_size
    rows = (kh - 1) * wl.dilation[0] + 1
    columns = (knobs.pixel_threads * knobs.pixel_tile - 1) * wl.strides[1] + (kw - 1) * wl.dilation[1] + 1
    weights = kh * kw * knobs.rc_tile * knobs.filter_threads * knobs.filter_tile
    return 4 * (rows * columns * knobs.rc_tile + weights)


def default_knobs(wl: ConvWorkload, target) -> Knobs:
    """Measured on an H200 over ResNet-50's layers at batch 1 (scripts/gpu_check.py, docs/benchmarks.md):
    1-2 pixels x 4 filters per thread, 16 input channels per stage holding the whole window, and on
    wide rows blocks of 4 pixel threads (more blocks for the SMs). Where the window would not fit in
    shared memory, fewer channels per stage, else one tap per stage."""
    width = wl.out_width
    pixel_threads, pixel_tile = (4, 2) if width >= 56 else (4, 1) if width >= 28 else (8, 1)
    knobs = Knobs(pixel_threads=_fit(width, pixel_threads), filter_threads=_fit(wl.filters, 16), pixel_tile=pixel_tile,
                  filter_tile=_fit(wl.filters // wl.groups, 4), rc_tile=_fit(wl.group_in_channels, 16),
                  window_stage=True)
    while _window_stage_bytes(wl, knobs) > _SHARED_BYTES and knobs.rc_tile > 1:
        knobs = dataclasses.replace(knobs, rc_tile=knobs.rc_tile // 2)
    if _window_stage_bytes(wl, knobs) > _SHARED_BYTES:
        knobs = dataclasses.replace(knobs, rc_tile=_fit(wl.group_in_channels, 8), window_stage=False)
    return knobs


def _bind_elementwise(sch: s_tir.Schedule, block, threads: int = 128) -> None:
    """One thread per output element of a stage the template does not tile (last-axis activations)."""
    spatial = sum(1 for v in sch.get(block).iter_vars if v.iter_type == 0)
    fused = sch.fuse(*sch.get_loops(block)[:spatial])
    blocks, thread = sch.split(fused, factors=[None, threads])
    sch.bind(blocks, "blockIdx.x")
    sch.bind(thread, "threadIdx.x")


def apply(sch: s_tir.Schedule, wl: ConvWorkload, knobs: Knobs) -> None:
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
    threads = knobs.pixel_threads * knobs.filter_threads
    # Stage the reduction step's input and weights in shared memory, loaded by all threads: for rc_tile
    # channels, the whole window (input rows and taps read once per step, one barrier pair per step)
    # or one tap of it.
    stage_at = rc_o if knobs.window_stage else rw
    for operand in (0, 1):
        shared = sch.cache_read(conv, operand, "shared")
        sch.compute_at(shared, stage_at)
        loops = sch.get_loops(shared)
        depth = [sch.get(loop).same_as(sch.get(stage_at)) for loop in loops].index(True) + 1
        _, loader = sch.split(sch.fuse(*loops[depth:]), factors=[None, threads])
        sch.bind(loader, "threadIdx.x")
    if wl.has_data_pad:
        # Inlined into the shared stage, not into the conv: the stage then spans exactly the padded
        # window (its bounds checks read the padding), where the input's clamped region is larger.
        sch.compute_inline(sch.get_sblock("data_pad"))
    sch.set_scope(conv, 0, "local")
    sch.decompose_reduction(conv, rc_o)
    sch.reverse_compute_at(sch.get_sblock("epilogue"), thread)
    # A last-axis activation's stages need whole rows of the output: one thread per row or element.
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(sch.get_loops(block)[0]).thread_binding is None:
            _bind_elementwise(sch, block)


class CudaRule:
    """The schedule rule of CUDA targets (see schedules/__init__.py): the implicit-GEMM template above for
    convolutions; no template space to tune yet, and no gradient kernels."""

    name = "cuda"

    def __repr__(self):
        return "<CudaRule>"

    def applies(self, target) -> bool:
        return target.kind.name == "cuda"

    def default_knobs(self, workload, target) -> Knobs | None:
        return default_knobs(workload, target) if isinstance(workload, ConvWorkload) else None

    def tunable_knobs(self, workload, target) -> list[Knobs]:
        return []

    def sample_tiles(self, sch, workload, target, knobs):
        raise NotImplementedError("the cuda rule has no template space yet")

    def schedule(self, workload, sch: s_tir.Schedule, target, knobs: Knobs) -> None:
        if not isinstance(workload, ConvWorkload):
            raise NotImplementedError(f"the cuda rule has no schedule for {type(workload).__name__} (gradients "
                                      "run on this host's CPU)")
        apply(sch, workload, knobs)


RULE = CudaRule()
