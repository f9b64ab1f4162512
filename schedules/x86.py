"""x86 (AVX2 and AVX-512): the CPU template with defaults sized to the register file and the FMA pipes.

The default register tile maximises the FMAs per load, ow*fv / (ow + fv) for `ow` broadcast
input values and `fv` weight vectors per reduction step, within the vector registers left
after the weights and one broadcast (16 with AVX2, 32 with AVX-512), and needs at least
`_MIN_ACCUMULATORS` independent accumulators to cover the FMA latency (4 cycles, 2 pipes).
Tile sizes that leave part of a tile idle (non-dividing widths, filters short of a vector)
are charged for the idle part.
"""
import itertools

from tvm.target import codegen

from tvmconv.compute import ConvWorkload

from . import cpu
from .cpu import Knobs, schedule  # noqa: F401  (the family's template is the CPU template)

_MIN_ACCUMULATORS = 8


def applies(wl: ConvWorkload, target) -> bool:
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())
    return triple.startswith(("x86_64", "i686"))


def _registers(target) -> int:
    return 32 if "avx512f" in codegen.llvm_get_cpu_features(target) else 16


def _tile_score(wl: ConvWorkload, lanes: int, ow: int, fv: int) -> float:
    width_used = wl.out_width / (-(-wl.out_width // ow) * ow)
    filters_used = wl.filters / (-(-wl.filters // (fv * lanes)) * fv * lanes)
    reuse = ow * fv / (ow + fv)
    latency = min(ow * fv / _MIN_ACCUMULATORS, 1.0)
    return reuse * latency * width_used * filters_used


def default_knobs(wl: ConvWorkload, target) -> Knobs:
    depthwise = wl.groups == wl.in_channels == wl.filters
    # A vector's lanes must read one input channel (one group), or consecutive ones in depthwise
    # convolutions, and must not run past the last filter: else each lane is gathered or predicated.
    # So small groups get narrower vectors, e.g. 4 lanes for ResNeXt's 4 filters per group.
    lanes = cpu.lanes(wl, target)
    while (wl.filters if depthwise else wl.filters // wl.groups) % lanes:
        lanes //= 2
    if depthwise:
        # Depthwise: one FMA per loaded input vector, so memory decides. Padding by bound checks
        # saves a pass over the input, and an unrolled window lets neighbouring taps share loads.
        ow = max(range(1, min(wl.out_width, 8) + 1), key=lambda c: (_tile_score(wl, lanes, c, 1), c))
        return Knobs(lanes, 1, ow, pad_inline=True, unroll_window=True)
    budget = _registers(target) - 2
    candidates = [(ow, fv) for ow, fv in itertools.product(range(1, min(wl.out_width, 16) + 1), range(1, 5))
                  if ow * fv + fv <= budget]
    ow, fv = max(candidates, key=lambda c: (_tile_score(wl, lanes, *c), c[0]))
    return Knobs(lanes, fv, ow)
