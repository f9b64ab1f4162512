"""ARM (AArch64 NEON): the CPU template, with default tiles sized to NEON's 32 128-bit registers.

Cortex-A72 and Neoverse cores have two 128-bit FMA pipes of 4-cycle latency, the case the
template's default rule is written for; AArch64 broadcasts by FMA-by-element (`fmla v.4s, v.4s,
v.s[i]`), so a broadcast input costs no extra register.
"""
from tvmconv.compute import ConvWorkload
from tvmconv.targets import architecture

from . import cpu
from .cpu import Knobs, schedule  # the family's template is the CPU template, re-exported


def applies(wl: ConvWorkload, target) -> bool:
    return target.kind.name == "llvm" and architecture(target) in ("aarch64", "arm64")


def default_knobs(wl: ConvWorkload, target) -> Knobs:
    return cpu.register_tile_knobs(wl, target, registers=32)
