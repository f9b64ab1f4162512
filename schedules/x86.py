"""x86 (AVX2 and AVX-512): the CPU template, with default tiles sized to the register file.

AVX2 has 16 vector registers, AVX-512 32; LLVM's CPU model says which the target has.
"""
from tvmconv.compute import ConvWorkload
from tvmconv.targets import architecture, vector_bits

from . import cpu
from .cpu import (  # noqa: F401  (the family's template is the CPU template)
    Knobs, apply, schedule, schedule_depthwise_kernel_gradient, schedule_elementwise, schedule_kernel_gradient_image,
    schedule_pointwise_kernel_gradient)


def applies(wl: ConvWorkload, target) -> bool:
    return target.kind.name == "llvm" and architecture(target) in ("x86_64", "i686")


def registers(target) -> int:
    return 32 if vector_bits(target) == 512 else 16


def default_knobs(wl: ConvWorkload, target) -> Knobs:
    return cpu.default_knobs(wl, target, registers(target))


def tunable_knobs(wl: ConvWorkload, target) -> list[Knobs]:
    return cpu.tunable_knobs(wl, target, registers(target))


def sample_tiles(sch, wl: ConvWorkload, target, knobs: Knobs) -> Knobs:
    return cpu.sample_tiles(sch, wl, target, knobs, registers(target))
