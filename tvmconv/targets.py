"""Compilation targets: the host CPU as it really is, and one canonical key per target.

The machines that run tvmconv differ (an AVX2-only AMD Zen 1 and an AVX-512 Zen 4 have both
served it), and code built for the wrong CPU dies with "Illegal instruction": the host target is
detected at run time, never hard-coded, and everything compiled is keyed by the full target.
"""
import functools
import hashlib
import json
import os
import shutil

import tvm
import tvm.support.cc
from tvm.target import codegen

from . import runtime

# LLVM splits 512-bit vectors in two on Intel AVX-512 CPU models ("prefer-256-bit"); the schedules
# choose their vector width themselves.
_FULL_WIDTH_AVX512 = "-prefer-256-bit"

# Instruction-set features a hypervisor may hide even though LLVM's CPU model implies them.
_CHECKED_X86_FEATURES = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "avx")

# LLVM's features that are instruction sets compiled code may use, by the name /proc/cpuinfo gives them (x86
# "flags", ARM "Features"). LLVM's other features are tuning hints (fast-*, slow-*, ...), system instructions that
# generated code never emits and hypervisors often hide (invpcid, mwaitx, rdpru, xsave*, ...), and crypto
# extensions, which code without intrinsics never uses and which CPUs of one LLVM model may lack (the Raspberry
# Pi 4's Cortex-A72): none of those is a requirement of a kernel.
_ISA_NAMES = {
    "x86_64": {
        "64bit": "lm", "x87": "fpu", "cmov": "cmov", "cx8": "cx8", "cx16": "cx16", "mmx": "mmx", "fxsr": "fxsr",
        "sahf": "lahf_lm", "popcnt": "popcnt", "lzcnt": "abm", "bmi": "bmi1", "bmi2": "bmi2", "movbe": "movbe",
        "adx": "adx", "prfchw": "3dnowprefetch", "crc32": "sse4_2", "sse": "sse", "sse2": "sse2", "sse3": "pni",
        "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "sse4a": "sse4a", "fma4": "fma4", "xop": "xop",
        "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "gfni": "gfni", "avxvnni": "avx_vnni",
        "avxifma": "avx_ifma", "avx512f": "avx512f", "evex512": "avx512f", "avx512cd": "avx512cd",
        "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512ifma": "avx512ifma",
        "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2", "avx512vnni": "avx512_vnni",
        "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq", "avx512bf16": "avx512_bf16",
        "avx512fp16": "avx512_fp16", "avx512vp2intersect": "avx512_vp2intersect", "amx-tile": "amx_tile",
        "amx-bf16": "amx_bf16", "amx-int8": "amx_int8", "amx-fp16": "amx_fp16"},
    "aarch64": {
        "fp-armv8": "fp", "neon": "asimd", "fullfp16": "asimdhp", "fp16fml": "asimdfhm", "rdm": "asimdrdm",
        "dotprod": "asimddp", "i8mm": "i8mm", "bf16": "bf16", "lse": "atomics", "rcpc": "lrcpc", "crc": "crc32",
        "jsconv": "jscvt", "complxnum": "fcma", "sve": "sve", "sve2": "sve2", "sme": "sme"},
}
# Vector extensions newer than the tables above are required under LLVM's name: a load refused, never a crash.
_VECTOR_PREFIXES = {"x86_64": ("avx", "amx", "sse", "fma"), "aarch64": ("sve", "sme", "neon")}


# x86 CPU models LLVM knows whose instruction sets a hypervisor's model number may understate, oldest first.
_X86_MODELS = ("haswell", "skylake-avx512", "cascadelake", "cooperlake", "icelake-server", "sapphirerapids",
               "emeraldrapids", "graniterapids", "znver1", "znver2", "znver3", "znver4", "znver5")


def _x86_model(cpu: str, flags: set[str]) -> str:
    """LLVM's CPU model for this host. LLVM names it by the family and model numbers CPUID reports, which a
    hypervisor may set to an older CPU's (seen: a Xeon with AMX and AVX512-FP16, Sapphire Rapids' instruction
    sets, reported as model 167, which LLVM names rocketlake: a client core with one 512-bit FMA port where
    the host has two). Where the OS reports more instruction sets than that model implies, the model of
    `_X86_MODELS` implying the most of them, all present, is taken (the oldest of equals)."""
    def isa(model: str) -> set[str]:
        return set(isa_features(tvm.target.Target({"kind": "llvm", "mcpu": model})))

    detected = isa(cpu)
    best, best_isa = cpu, detected
    for model in _X86_MODELS:
        isa_of_model = isa(model)
        if detected < isa_of_model <= flags and len(isa_of_model) > len(best_isa):
            best, best_isa = model, isa_of_model
    return best


@functools.lru_cache(maxsize=None)
def host() -> dict:
    """The host's target dict: LLVM's CPU name (corrected where a hypervisor understates it), minus features
    the OS reports absent, and the core count."""
    cpu = codegen.llvm_get_system_cpu()
    flags = runtime.cpu_flags()
    x86 = bool(flags) and codegen.llvm_get_system_triple().startswith("x86_64")
    if x86:
        cpu = _x86_model(cpu, flags)
    target = {"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1}
    if x86:
        implied = codegen.llvm_get_cpu_features(tvm.target.Target(target))
        hidden = sorted(f for f in _CHECKED_X86_FEATURES if f in implied and f not in flags)
        mattr = [f"-{f}" for f in hidden]
        if "prefer-256-bit" in implied and "avx512f" in flags:
            mattr.append(_FULL_WIDTH_AVX512)
        if mattr:
            target["mattr"] = mattr
    return target


_AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 4}

# A GPU library's host code runs on the GPU machine's CPU, whatever it is: baseline x86-64.
_GPU_HOST = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
# What a block may use on every CUDA GPU since Volta without opting in; MetaSchedule's GPU verification
# (tuning) rejects candidates beyond them and refuses targets that do not state them.
_CUDA_LIMITS = {"max_shared_memory_per_block": 48 * 1024, "max_threads_per_block": 1024, "thread_warp_size": 32}

# Named targets. The x86 presets use the oldest CPU model with that vector ISA, so their code
# runs on every CPU that has it (AMD Zen 1 and later for AVX2, Zen 4 and Skylake-SP for AVX-512).
PRESETS = {
    "x86-avx2": lambda: {"kind": "llvm", "mcpu": "haswell", "num-cores": host()["num-cores"]},
    "x86-avx512": lambda: {"kind": "llvm", "mcpu": "skylake-avx512", "mattr": [_FULL_WIDTH_AVX512],
                           "num-cores": host()["num-cores"]},
    "aarch64": lambda: {**_AARCH64, "mcpu": "cortex-a72"},
    "aarch64-neoverse": lambda: {**_AARCH64, "mcpu": "neoverse-n1"},
    "cuda-sm_80": lambda: {"kind": "cuda", "arch": "sm_80", **_CUDA_LIMITS, "host": _GPU_HOST},
    "cuda-sm_90": lambda: {"kind": "cuda", "arch": "sm_90", **_CUDA_LIMITS, "host": _GPU_HOST},
}
PRESETS["cuda"] = PRESETS["cuda-sm_80"]


def resolve(target) -> tvm.target.Target:
    """None or "host" (this CPU), a preset name, a target dict or a Target → a TVM Target."""
    if target is None or target == "host":
        return tvm.target.Target(host())
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str) and target in PRESETS:
        return tvm.target.Target(PRESETS[target]())
    if not isinstance(target, dict):
        error = ValueError if isinstance(target, str) else TypeError
        raise error("The `target` argument must be None or 'host' (this CPU), one of the presets "
                    f"{', '.join(repr(p) for p in PRESETS)}, or a TVM target dict such as "
                    f"{{'kind': 'llvm', 'mcpu': 'znver1', 'num-cores': 2}}. Received: target={target!r}")
    try:
        return tvm.target.Target(target)
    except Exception as err:  # TVM raises its own error types for unknown kinds and attributes
        raise ValueError(f"Invalid `target` {target!r}: {err}") from None


def architecture(target: tvm.target.Target) -> str:
    """The CPU architecture the code is for ("x86_64", "aarch64", ...): the target's triple (a GPU target's
    host's), else this machine's."""
    cpu = target.host if target.kind.name == "cuda" and target.host is not None else target
    return str(cpu.attrs.get("mtriple", "") or codegen.llvm_get_system_triple()).split("-")[0]


def isa_features(target: tvm.target.Target) -> list[str]:
    """The instruction sets the target's code may use, as /proc/cpuinfo names them (a GPU target's: its host's)."""
    cpu = target.host if target.kind.name == "cuda" and target.host is not None else target
    arch = architecture(target)
    names, prefixes = _ISA_NAMES.get(arch, {}), _VECTOR_PREFIXES.get(arch, ())
    features = codegen.llvm_get_cpu_features(cpu)
    return sorted({names.get(f, f) for f in features if f in names or f.startswith(prefixes)})


def vector_bits(target: tvm.target.Target) -> int:
    """SIMD register width. (codegen.llvm_get_vector_width answers for the host, not the target.)"""
    if target.kind.name != "llvm":
        return 128
    features = codegen.llvm_get_cpu_features(target)
    if "avx512f" in features:
        return 512
    if "avx" in features:
        return 256
    return 128


def target_key(target: tvm.target.Target) -> str:
    """Readable and unique: kind, CPU or arch, vector ISA, cores, and a hash of the whole target."""
    attrs = dict(target.attrs.items())
    full = json.dumps({"kind": target.kind.name, **{k: str(v) for k, v in sorted(attrs.items())}}, sort_keys=True)
    parts = [target.kind.name, str(attrs.get("mcpu") or attrs.get("arch") or "generic")]
    if target.kind.name == "llvm":
        parts.append(f"v{vector_bits(target)}")
        parts.append(f"{attrs.get('num-cores', 1)}c")
    return "-".join(parts + [hashlib.sha256(full.encode()).hexdigest()[:8]])


# The C++ toolchain that links kernels for a foreign CPU, and the Debian package that has it.
CROSS_TOOLCHAINS = {"aarch64": ("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu")}


def cross_compiler(target: tvm.target.Target):
    """The export_library `fcompile` that links kernels for `target`: None for this host's own CPU and
    for GPU targets (whose host code is for this CPU), a cross compiler for another CPU architecture."""
    if target.kind.name != "llvm":
        return None
    arch = architecture(target)
    if arch == runtime.host_architecture():
        return None
    if arch not in CROSS_TOOLCHAINS:
        raise ValueError(f"tvmconv has no toolchain for {arch} targets (known: {', '.join(CROSS_TOOLCHAINS)})")
    compiler, package = CROSS_TOOLCHAINS[arch]
    if shutil.which(compiler) is None:
        raise RuntimeError(f"Cross-compiling for {arch} needs {compiler}, which is not installed: "
                           f"apt-get install {package}")
    return tvm.support.cc.cross_compiler(compiler)


def check_tf32(tf32: bool, target: tvm.target.Target, dtype: str) -> bool:
    """`tf32` (Conv2D's argument) if the target has TF32 tensor cores (CUDA sm_80 and later) and the layer
    computes in float32; ValueError otherwise."""
    if not tf32:
        return False
    arch = str(target.attrs.get("arch", "")) if target.kind.name == "cuda" else ""
    if not (arch.startswith("sm_") and arch[3:].isdigit() and int(arch[3:]) >= 80):
        raise ValueError("`tf32=True` multiplies on the tensor cores of CUDA GPUs from sm_80 (A100) on: use a target "
                         f"such as 'cuda-sm_80' or 'cuda-sm_90'. Received: target={target_key(target)}")
    if dtype != "float32":
        raise ValueError(f"`tf32=True` is for float32 layers; this layer computes in {dtype} (float16 layers use the "
                         "tensor cores already)")
    return True


def runnable_here(target: tvm.target.Target) -> bool:
    try:
        check_runnable_here(target)
        return True
    except ValueError:
        return False


def _check_gpu(target: tvm.target.Target) -> None:
    """Raise unless this machine has a CUDA GPU that runs the target's code: its arch or a newer one
    (the fatbin carries PTX for newer GPUs)."""
    if not runtime.cuda_available():
        raise ValueError(f"Kernels for target {target_key(target)} need a CUDA GPU, and this machine has none that "
                         "TVM's CUDA runtime can use (an NVIDIA driver and libcudart.so.13 are needed): run them on "
                         "a GPU machine, e.g. exported with tvmconv.export(..., target='cuda-sm_90')")
    wanted = int(str(target.attrs["arch"]).removeprefix("sm_"))
    found = int(runtime.cuda_compute_version().replace(".", ""))
    if found < wanted:
        raise ValueError(f"Target {target_key(target)} is built for sm_{wanted}, and this GPU is sm_{found}: "
                         f"use the target preset 'cuda-sm_{found}' or one for an older arch")


def check_runnable_here(target: tvm.target.Target) -> None:
    """Raise before running code the host cannot execute (another ISA, or features it lacks)."""
    if target.kind.name == "cuda":
        _check_gpu(target)
        return
    host_target = tvm.target.Target(host())
    if target.kind.name != "llvm" or architecture(target) != runtime.host_architecture():
        raise ValueError(f"Kernels for target {target_key(target)} cannot run on this host "
                         f"({target_key(host_target)}): run them on a matching device over RPC with "
                         "remote='HOST:PORT' (an emulated aarch64 board: scripts/arm_board.sh start), "
                         "or export them.")
    missing = sorted(set(isa_features(target)) - set(isa_features(host_target)))
    if missing:
        raise ValueError(f"Target {target_key(target)} uses CPU features this host lacks ({', '.join(missing)}): "
                         "running its kernels here would die with 'Illegal instruction'. Use target=None for the "
                         "host CPU, or export the kernels for a machine that has them.")
