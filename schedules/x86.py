"""x86 (AVX2 and AVX-512): the CPU template, with a core model read off the target.

AVX2 has 16 vector registers, AVX-512 32; LLVM's CPU model says which the target has.
"""
from tvmconv.targets import vector_bits

from .cpu import CpuCore, CpuRule


def core(target) -> CpuCore:
    bits = vector_bits(target)
    return CpuCore(vector_bits=bits, registers=32 if bits == 512 else 16)


RULE = CpuRule("x86", ("x86_64", "i686"), core)
