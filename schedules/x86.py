"""x86 (AVX2 and AVX-512): the CPU template, with default tiles sized to the register file.

AVX2 has 16 vector registers, AVX-512 32; LLVM's CPU model says which the target has.
"""
from tvmconv.compute import ConvWorkload
from tvmconv.targets import architecture, vector_bits

from . import cpu
from .cpu import Knobs, schedule  # the family's template is the CPU template, re-exported


def applies(wl: ConvWorkload, target) -> bool:
    return target.kind.name == "llvm" and architecture(target) in ("x86_64", "i686")


def default_knobs(wl: ConvWorkload, target) -> Knobs:
    registers = 32 if vector_bits(target) == 512 else 16
    return cpu.register_tile_knobs(wl, target, registers)
