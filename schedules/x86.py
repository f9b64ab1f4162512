"""x86 (AVX2 and AVX-512): the CPU template, with a model of the target's core.

The vector width comes from LLVM's CPU model (AVX-512: 32 registers, else 16). The pipes come from the
microarchitecture, named by LLVM's CPU name: how many FMAs and loads of that width issue per cycle, the
FMA latency and what a broadcast costs (vendors' optimization manuals and Agner Fog's tables; where
those do not say, measured). Intel's server cores issue two 512-bit FMAs per cycle, so they need twice
the accumulators in flight that AMD's Zen 4 needs, whose 512-bit FMAs issue as two 256-bit halves. The
caches are read from /sys for this host's own CPU, else taken from the table; memory's rate and the share of
L2 that keeps a layer's weights, which no cache tells, from the table (measured).
"""
import functools
import os

from tvmconv.targets import host, vector_bits

from .cpu import CpuCore, CpuRule, target_cores

# L2's bandwidth to L1 as sustained: 3/4 of its peak (32 bytes a cycle on Zen 1 to 3, 64 on Zen 4 and on
# Intel's client cores; the server cores' below). On Zen 3, ResNet-50's stack at 24 ran 9% faster than at 32,
# its weight-heavy tiles (4 filter vectors, whose 128 weight bytes a step L2 delivers just in time at 32)
# picked less often.
_ZEN = dict(l1_bytes=32 << 10, l2_bytes=512 << 10, l2_bytes_per_cycle=24)
# Intel's server L2 keeps weights read again on every row only up to about a quarter of its size
# (CpuCore.weights_l2_share). Measured on Sapphire Rapids (2 MiB of L2), kernels alone, the orders taking turns:
# ResNet-50's four 1x1 layers whose weights take 1-2 MiB ran rows first at 0.86-0.89x filter blocks first
# at batch 1 and 0.86-0.94x at batch 8 (pixels first 0.51-0.88x), MobileNetV2's four 1x1 layers of width 7
# with 0.6-1.6 MiB at 0.69-0.91x and 0.82-0.95x; its 1x1 layers of 512 KiB and less at 0.95-1.27x.
# Its L2 also delivers less to L1 than its 64 bytes a cycle suggest: tiles of 4 filter vectors, which need 32
# bytes of weights a cycle from L2 where a block's weights outgrow L1, ran slower than tiles of 2 vectors and
# more pixels (kernels alone, the two taking turns): at 24 bytes a cycle, as on Zen, the model takes those on
# the 14 layers of ResNet-50 whose tiles then change, which ran 0.99-1.15x at batch 1 (3.7% off the stack's
# time) and 0.90-1.10x at batch 8 (0.15% off), conv3x3s2_28x28x256, the weakest against the peers, 1.15x and 1.10x.
# Assumed on the other server cores, whose L2 and L3 are built alike (not measured there).
_INTEL_SERVER = dict(fma_ports=2, fma_latency=4, load_ports=2, l1_bytes=48 << 10, l2_bytes=1280 << 10,
                     l2_bytes_per_cycle=24, weights_l2_share=0.25)
_INTEL_CLIENT = dict(fma_ports=2, fma_latency=4, load_ports=2, l1_bytes=32 << 10, l2_bytes=256 << 10,
                     l2_bytes_per_cycle=48)
# Memory's rate per core (CpuCore.memory_bytes_per_cycle) as measured: on Zen 4 and Sapphire Rapids, at
# least the rate at which F(4, 3)'s kernel for ResNet-50's 3x3 layer of width 7 streamed its 38 MB of
# transformed weights (420 µs on Zen 4, 834 µs on Sapphire Rapids, two cores at the clock of the FMA peak).
# Per LLVM CPU name, at the core's widest vector (CpuCore's fields; the rest take its defaults).
CORES = {
    # Zen 1 runs 256-bit vectors as two 128-bit halves on two 128-bit FMA pipes.
    "znver1": dict(fma_ports=1, fma_latency=5, load_ports=1, **_ZEN),
    # Zen 2 and 3: two 256-bit FMA pipes; an input broadcast from memory measured at two load slots (Zen 3:
    # tiles of 1 filter vector x 7 columns ran at 0.6x those of 2 x 5).
    "znver2": dict(fma_ports=2, fma_latency=5, load_ports=2, broadcast_slots=2, **_ZEN),
    "znver3": dict(fma_ports=2, fma_latency=4, load_ports=2, broadcast_slots=2, **_ZEN),
    # Zen 4: 512-bit FMAs and loads as two 256-bit halves: one of each per cycle at 512 bits.
    "znver4": dict(fma_ports=1, fma_latency=4, load_ports=1, l1_bytes=32 << 10, l2_bytes=1 << 20,
                   l2_bytes_per_cycle=48, memory_bytes_per_cycle=12),
    "znver5": dict(fma_ports=2, fma_latency=4, load_ports=2, l1_bytes=48 << 10, l2_bytes=1 << 20,
                   l2_bytes_per_cycle=48),
    "skylake-avx512": {**_INTEL_SERVER, "l1_bytes": 32 << 10, "l2_bytes": 1 << 20},
    "cascadelake": {**_INTEL_SERVER, "l1_bytes": 32 << 10, "l2_bytes": 1 << 20},
    "cooperlake": {**_INTEL_SERVER, "l1_bytes": 32 << 10, "l2_bytes": 1 << 20},
    "icelake-server": _INTEL_SERVER,
    "sapphirerapids": {**_INTEL_SERVER, "l2_bytes": 2 << 20, "memory_bytes_per_cycle": 7},
    "emeraldrapids": {**_INTEL_SERVER, "l2_bytes": 2 << 20},
    "graniterapids": {**_INTEL_SERVER, "l2_bytes": 2 << 20},
    # Client cores with AVX-512 fuse their two 256-bit FMA ports into one 512-bit one.
    "icelake-client": {**_INTEL_CLIENT, "fma_ports": 1, "l1_bytes": 48 << 10, "l2_bytes": 512 << 10},
    "tigerlake": {**_INTEL_CLIENT, "fma_ports": 1, "l1_bytes": 48 << 10, "l2_bytes": 1280 << 10},
    "rocketlake": {**_INTEL_CLIENT, "fma_ports": 1, "l1_bytes": 48 << 10, "l2_bytes": 512 << 10},
    "haswell": {**_INTEL_CLIENT, "fma_latency": 5},
    "broadwell": {**_INTEL_CLIENT, "fma_latency": 5},
    "skylake": _INTEL_CLIENT,
    "alderlake": {**_INTEL_CLIENT, "l1_bytes": 48 << 10, "l2_bytes": 1280 << 10},
}


@functools.cache
def host_caches() -> dict:
    """This machine's L1 data, L2 and L3 sizes as Linux reports them for its first core (empty where it does
    not): per core for L1 and L2, the L3 shared."""
    found = {}
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        # (cache/ also holds files, such as uevent, beside its index<N> folders)
        for index in (name for name in os.listdir(root) if name.startswith("index")):
            def read(name, index=index):
                with open(os.path.join(root, index, name)) as f:
                    return f.read().strip()
            level, kind, size = int(read("level")), read("type"), read("size")
            number = int(size.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(size[-1], 0)
            if level == 1 and kind == "Data":
                found["l1_bytes"] = number
            elif level in (2, 3) and kind in ("Unified", "Data"):
                found[f"l{level}_bytes"] = number
    except (OSError, ValueError):
        return {}
    return found


def core(target) -> CpuCore:
    bits = vector_bits(target)
    cpu = str(target.attrs.get("mcpu", ""))
    known = dict(CORES.get(cpu, {}))
    if cpu and cpu == host().get("mcpu"):
        known.update(host_caches())
    # Every x86-64 core has non-temporal vector stores (SSE2's MOVNTPS, and its AVX forms).
    return CpuCore(vector_bits=bits, registers=32 if bits == 512 else 16, cores=target_cores(target),
                   nontemporal_stores=True, **known)


RULE = CpuRule("x86", ("x86_64", "i686"), core)
