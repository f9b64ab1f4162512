"""ARM (AArch64 NEON): the CPU template, with a model of the target's core: NEON's 32 128-bit registers.

Cortex-A72 and Neoverse cores have two 128-bit FMA pipes; the A72's FMAs take 7 cycles, the Neoverse
cores' 4 (Arm's software optimization guides).
"""
from .cpu import CpuCore, CpuRule, target_cores

# Per LLVM CPU name (CpuCore's fields; the rest take its defaults). L3 as on the boards people run them
# on: none on the Raspberry Pi 4's Cortex-A72, 2 MB on the Pi 5's Cortex-A76.
CORES = {
    "cortex-a72": dict(fma_latency=7, l1_bytes=32 << 10, l2_bytes=512 << 10, l3_bytes=0),
    "cortex-a76": dict(fma_latency=4, l1_bytes=64 << 10, l2_bytes=512 << 10, l3_bytes=2 << 20),
    "cortex-a78": dict(fma_latency=4, l1_bytes=64 << 10, l2_bytes=512 << 10),
    "neoverse-n1": dict(fma_latency=4, l1_bytes=64 << 10, l2_bytes=1 << 20),
}


def core(target) -> CpuCore:
    return CpuCore(vector_bits=128, registers=32, cores=target_cores(target),
                   **CORES.get(str(target.attrs.get("mcpu", "")), {}))


RULE = CpuRule("arm", ("aarch64", "arm64"), core)
