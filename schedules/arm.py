"""ARM (AArch64 NEON): the CPU template, with default tiles sized to NEON's 32 128-bit registers.

Cortex-A72 and Neoverse cores have two 128-bit FMA pipes of 4-cycle latency, the case the
template's default rule is written for; AArch64 broadcasts by FMA-by-element (`fmla v.4s, v.4s,
v.s[i]`), so a broadcast input costs no extra register.
"""
from .cpu import CpuCore, CpuRule


def core(target) -> CpuCore:
    return CpuCore(vector_bits=128, registers=32)


RULE = CpuRule("arm", ("aarch64", "arm64"), core)
