"""The default CPU schedule: parallel over output rows, vectorized over the contiguous output axis.

Correct for every workload of `tvmconv.compute` on any LLVM target, and far from the
pathological speed of an unscheduled kernel. Per-target templates (x86, arm) live beside it.

The innermost tile is a register block: a vector along the contiguous output axis (channels for
channels_last, width for channels_first) times a few unrolled pixels or channels, with the whole
reduction outside it, so each loaded input value feeds several FMAs and the accumulators stay
in registers. The epilogue (bias, activation, cast) runs on that tile while it is still hot.
"""
import dataclasses

from tvm import s_tir

from tvmconv.compute import LAST_AXIS_ACTIVATIONS, ConvWorkload
from tvmconv.targets import vector_bits


@dataclasses.dataclass(frozen=True)
class Knobs:
    vector_tile: int  # output elements along the contiguous axis per inner tile (vectorized)
    block_tile: int   # output pixels (channels_last) or channels (channels_first) per tile (unrolled)


def _largest_divisor(extent: int, limit: int) -> int:
    return max(d for d in range(1, min(extent, limit) + 1) if extent % d == 0)


def applies(wl: ConvWorkload, target) -> bool:
    return target.kind.name == "llvm"


def default_knobs(wl: ConvWorkload, target) -> Knobs:
    lanes = max(vector_bits(target) // (64 if wl.accum_dtype == "float64" else 32), 1)
    if wl.channels_last:
        return Knobs(_largest_divisor(wl.filters, 2 * lanes), _largest_divisor(wl.out_width, 8))
    return Knobs(_largest_divisor(wl.out_width, 2 * lanes), _largest_divisor(wl.filters, 4))


def schedule(func, wl: ConvWorkload, target, knobs: Knobs | None = None) -> s_tir.Schedule:
    knobs = knobs or default_knobs(wl, target)
    sch = s_tir.Schedule(func)
    conv = sch.get_sblock("conv")
    if wl.channels_last:
        n, oh, ow, f, rh, rw, rc = sch.get_loops(conv)
        f_o, f_i = sch.split(f, factors=[None, knobs.vector_tile])
        ow_o, ow_i = sch.split(ow, factors=[None, knobs.block_tile])
        sch.reorder(n, oh, ow_o, f_o, rh, rw, rc, ow_i, f_i)
        outer, tile_root, unrolled, vector, first_reduction = sch.fuse(n, oh), f_o, ow_i, f_i, rh
    else:
        n, f, oh, ow, rh, rw, rc = sch.get_loops(conv)
        f_o, f_i = sch.split(f, factors=[None, knobs.block_tile])
        ow_o, ow_i = sch.split(ow, factors=[None, knobs.vector_tile])
        sch.reorder(n, f_o, oh, ow_o, rc, rh, rw, f_i, ow_i)
        outer, tile_root, unrolled, vector, first_reduction = sch.fuse(n, f_o, oh), ow_o, f_i, ow_i, rc
    sch.parallel(outer)
    # The epilogue joins the tile; with a last-axis activation it needs whole rows, so it stays apart.
    if wl.activation not in LAST_AXIS_ACTIVATIONS:
        sch.reverse_compute_at(sch.get_sblock("epilogue"), tile_root)
    sch.unroll(unrolled)
    sch.vectorize(vector)
    sch.decompose_reduction(conv, first_reduction)
    return sch
