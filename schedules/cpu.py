"""The direct-convolution template for LLVM CPUs, and the generic rule that uses it on any of them.

Register blocking, as topi's x86 and arm_cpu schedules do it: each register tile is
`ow_tile` output columns x `f_vectors` vectors of filters, kept in registers (a "local"
accumulator) over the whole reduction, so every loaded weight vector feeds `ow_tile` FMAs and
every broadcast input value feeds `f_vectors`. The weights are packed (`compute.pack_kernel`)
so a tile's weights are one contiguous stream. The epilogue (bias, activation, cast, and the
channels-first transpose) runs on the tile while it is still in registers.

Knobs are data: family modules (x86, arm) pick defaults from the vector width, the register
count and the shape; the autotuner samples the same knobs.
"""
import dataclasses

from tvm import s_tir

from tvmconv.compute import ConvWorkload
from tvmconv.targets import vector_bits


@dataclasses.dataclass(frozen=True)
class Knobs:
    lanes: int          # vector width in accumulator elements
    f_vectors: int      # filter vectors per register tile (unrolled)
    ow_tile: int        # output columns per register tile (unrolled)
    oh_tile: int = 1    # output rows per register tile (unrolled)
    rc_tile: int = 0    # input channels per inner reduction step; 0 = all of them
    filters_first: bool = False  # filter blocks outermost: each block's weights stay in cache over all rows
    pad_inline: bool = False  # read the input through bound checks instead of a padded copy
    unroll_window: bool = False  # unroll the kernel window: neighbouring taps share loaded input vectors

    @property
    def kernel_block(self) -> int:
        """Filters per packed weight block: one register tile's width."""
        return self.lanes * self.f_vectors


def largest_divisor(extent: int, limit: int) -> int:
    return max(d for d in range(1, min(extent, limit) + 1) if extent % d == 0)


def lanes(wl: ConvWorkload, target) -> int:
    return max(vector_bits(target) // (64 if wl.accum_dtype == "float64" else 32), 1)


def applies(wl: ConvWorkload, target) -> bool:
    return target.kind.name == "llvm"


def default_knobs(wl: ConvWorkload, target) -> Knobs:
    """A conservative register tile for any SIMD width (the family modules refine it)."""
    n_lanes = lanes(wl, target)
    f_vectors = largest_divisor(max(wl.filters // n_lanes, 1), 2)
    return Knobs(n_lanes, f_vectors, largest_divisor(wl.out_width, 4))


def schedule(func, wl: ConvWorkload, target, knobs: Knobs | None = None) -> s_tir.Schedule:
    knobs = knobs or default_knobs(wl, target)
    sch = s_tir.Schedule(func)
    conv = sch.get_sblock("conv")
    n, oh, ow, f, rh, rw, rc = sch.get_loops(conv)
    oh_o, oh_i = sch.split(oh, factors=[None, knobs.oh_tile])
    ow_o, ow_i = sch.split(ow, factors=[None, knobs.ow_tile])
    f_o, f_r, f_v = sch.split(f, factors=[None, knobs.f_vectors, knobs.lanes])
    rc_o, rc_i = sch.split(rc, factors=[None, knobs.rc_tile or wl.group_in_channels])
    outer = (f_o, n, oh_o) if knobs.filters_first else (n, oh_o, f_o)
    sch.reorder(*outer, ow_o, rc_o, rh, rw, rc_i, oh_i, ow_i, f_r, f_v)
    # Threads split rows and filter blocks together: 7x7 layers have too few rows for many cores.
    sch.parallel(sch.fuse(*outer))
    tile_root = ow_o
    # The accumulator tile lives in registers; the epilogue consumes it inside the same tile.
    sch.set_scope(conv, 0, "local")
    # (With a last-axis activation, "epilogue" is the pre-activation tensor; the stages after it
    # need whole rows and stay outside.)
    sch.reverse_compute_at(sch.get_sblock("epilogue"), tile_root)
    epilogue_inner = sch.get_loops(sch.get_sblock("epilogue"))[-1]
    sch.vectorize(epilogue_inner)
    if knobs.unroll_window:
        sch.unroll(rh)
        sch.unroll(rw)
    sch.unroll(oh_i)
    sch.unroll(ow_i)
    sch.unroll(f_r)
    sch.vectorize(f_v)
    init = sch.decompose_reduction(conv, rc_o)
    sch.vectorize(sch.get_loops(init)[-1])
    if wl.channels_last and not any(wl.pads):
        return sch
    pad = sch.get_sblock("data_pad")
    if knobs.pad_inline:
        sch.compute_inline(pad)
    else:
        loops = sch.get_loops(pad)
        sch.parallel(sch.fuse(*loops[:2]))
        sch.vectorize(loops[-1])
    return sch
