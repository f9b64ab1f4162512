"""ARM (AArch64 NEON): the CPU template, with default tiles sized to NEON's 32 128-bit registers.

Cortex-A72 and Neoverse cores have two 128-bit FMA pipes of 4-cycle latency, the case the
template's default rule is written for; AArch64 broadcasts by FMA-by-element (`fmla v.4s, v.4s,
v.s[i]`), so a broadcast input costs no extra register.
"""
from tvmconv.compute import ConvWorkload
from tvmconv.targets import architecture

from . import cpu
from .cpu import (  # noqa: F401  (the family's template is the CPU template)
    Knobs, apply, schedule, schedule_depthwise_kernel_gradient, schedule_elementwise, schedule_kernel_gradient_image,
    schedule_pointwise_kernel_gradient)


def applies(wl: ConvWorkload, target) -> bool:
    return target.kind.name == "llvm" and architecture(target) in ("aarch64", "arm64")


REGISTERS = 32


def default_knobs(wl: ConvWorkload, target) -> Knobs:
    return cpu.default_knobs(wl, target, REGISTERS)


def tunable_knobs(wl: ConvWorkload, target) -> list[Knobs]:
    return cpu.tunable_knobs(wl, target, REGISTERS)


def sample_tiles(sch, wl: ConvWorkload, target, knobs: Knobs) -> Knobs:
    return cpu.sample_tiles(sch, wl, target, knobs, REGISTERS)
