"""Workload + schedule rule (+ tuning record) → compiled kernel, cached in memory and on disk per target.

One path for every workload, a forward convolution or a gradient kernel (the interface in
tvmconv.compute): its PrimFunc, scheduled by a tuning record or by its rule (schedules/), compiled
for the target and loaded where this host can run it.

The disk cache lives under $TVMCONV_CACHE_DIR (default ~/.cache/tvmconv)/kernels/<target key>/.
Each entry is a shared library and a JSON sidecar holding its checksum; both are written to a
temporary name and renamed, so a concurrent reader sees a whole entry or none. An entry whose
checksum does not match (truncated, corrupt, tampered) is reported, removed and rebuilt.
"""
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import threading
import warnings

import tvm
from tvm import s_tir

from . import records, runtime, schedules, targets, timing


@dataclasses.dataclass
class CompiledKernel:
    workload: object  # a compute.ConvWorkload or a backward.GradientKernel
    target_key: str
    schedule: str   # the schedules/ rule that produced it ("x86", "arm", "cuda", "cpu"), or "tuning record"
    knobs: object   # the rule's knob values (None: a tuning record, or a schedule without knobs)
    weight_block: int  # filters per block of the packed weights it reads (0: Keras's layout)
    origin: str     # "compiled", "disk cache" or "memory cache"
    library: str    # the shared library in the kernel cache
    kernel: runtime.Kernel | None  # loaded here, when this host can run the target's code
    device_code: str | None = None  # GPU targets: the fatbin nvcc built, beside the library
    tuning: records.Tuned | None = None  # the tuning record it was built from (None: the rule's schedule)

    def time_evaluator(self, number: int = 10, repeat: int = 20, min_repeat_ms: int = 0):
        """TVM's time evaluator for this kernel on this machine's CPU or GPU: call it with
        `Conv2D.kernel_arguments(x)`."""
        if self.kernel is None:
            raise ValueError(f"kernels for {self.target_key} do not run on this host: time them on their device")
        return timing.time_evaluator(self.kernel.module, self.kernel.entry, self.kernel.device, number, repeat,
                                     min_repeat_ms)


_memory: dict[tuple, CompiledKernel] = {}
_lock = threading.Lock()


def cache_dir() -> str:
    return os.environ.get("TVMCONV_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tvmconv")


def _atomic_write(path: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)


def _verified(library: str, sidecar: str) -> bool:
    """Whether the cache holds this entry intact; a damaged entry is reported and removed."""
    if not (os.path.exists(library) and os.path.exists(sidecar)):
        return False
    try:
        with open(sidecar) as f:
            expected = json.load(f)["sha256"]
        if runtime.file_sha256(library) != expected:
            raise ValueError("checksum mismatch")
        return True
    except Exception as err:  # any damage to either file means: rebuild
        warnings.warn(f"tvmconv: corrupt kernel cache entry {library} ({err}); rebuilding it", RuntimeWarning)
        for path in (library, sidecar):
            if os.path.exists(path):
                os.remove(path)
        return False


def device_code(module, target: tvm.target.Target) -> bytes:
    """The GPU code of a CUDA module: a fatbin that nvcc builds from the module's CUDA source, with
    machine code for the target's arch and PTX that newer GPUs compile when they load it. (TVM keeps
    the CUDA source in the library; the runtime loads this in its place: runtime.load_module.)"""
    if shutil.which("nvcc") is None:
        raise RuntimeError("CUDA kernels are built with nvcc, which is not on the PATH: install the CUDA toolkit")
    import tvm.support.nvcc  # only CUDA builds need it
    source = next(m for m in module.imports if m.kind == "cuda").inspect_source()
    version = str(target.attrs["arch"]).removeprefix("sm_")
    with target:
        return bytes(tvm.support.nvcc.compile_cuda(
            source, target_format="fatbin", compiler="nvcc",
            arch=["-gencode", f"arch=compute_{version},code=[sm_{version},compute_{version}]"]))


def weight_block(knobs) -> int:
    """The packed weight layout that knobs read; 0 (Keras's layout) for a schedule without knobs."""
    return 0 if knobs is None else knobs.weight_block


def scheduled(workload, target: tvm.target.Target, rule, knobs):
    """The PrimFunc of `workload` scheduled by a schedules/ rule with these knobs."""
    sch = s_tir.Schedule(workload.prim_func(weight_block(knobs)))
    rule.schedule(workload, sch, target, knobs)
    return sch.mod["main"]


def _choice(workload, target: tvm.target.Target, knobs, record, log_roots) -> tuple:
    """(rule, knobs, tuning record): `knobs` if given; else `record` if given (False: none, the rule's
    default schedule); else the best record in `log_roots` (default: records.search_roots()) unless it
    re-timed slower than the rule's schedule; else the rule's default knobs. Cheap: record lookups are
    memoized."""
    rule = schedules.find_rule(target)
    tuned = None
    if knobs is None and record is not False:
        tuned = record or records.best(workload, target, log_roots)
    if tuned is None and knobs is None:
        knobs = rule.default_knobs(workload, target)
    return rule, (None if tuned else knobs), tuned


def _scheduled_choice(workload, target: tvm.target.Target, rule, knobs, tuned) -> tuple:
    """(scheduled PrimFunc, knobs, tuned) for a choice; a record whose trace does not replay on this
    workload gives way to the rule's default schedule."""
    if tuned is not None:
        try:
            return records.apply(tuned, workload.prim_func(tuned.weight_block)).mod["main"], None, tuned
        except Exception as err:  # e.g. a batch-1 trace whose tile sizes do not fit this batch
            warnings.warn(f"tvmconv: the tuning record in {tuned.folder} does not apply to this workload ({err}); "
                          "using the template's defaults", RuntimeWarning)
            knobs = rule.default_knobs(workload, target)
    return scheduled(workload, target, rule, knobs), knobs, None


def scheduled_function(workload, target: tvm.target.Target, knobs=None, log_roots=None) -> tuple:
    """(the scheduled PrimFunc, its knobs or None, its tuning record or None), chosen as `get_kernel`
    chooses, without compiling it (export links several into one library)."""
    rule, knobs, tuned = _choice(workload, target, knobs, None, log_roots)
    return _scheduled_choice(workload, target, rule, knobs, tuned)


def _library(func, target: tvm.target.Target, key: str, name: str, meta: dict) -> tuple:
    """The shared library of a scheduled PrimFunc in the disk cache, compiled when absent or damaged:
    (library path, device code path or None, "compiled" or "disk cache")."""
    # The file name covers the exact scheduled program, so a change to compute or schedule
    # never picks up a stale library.
    fingerprint = hashlib.sha256((tvm.__version__ + str(target.export()) + func.script()).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir(), "kernels", key)
    os.makedirs(folder, exist_ok=True)
    library = os.path.join(folder, f"{name}-{fingerprint}.so")
    sidecar = library[:-3] + ".json"
    gpu_code = library[:-3] + ".fatbin" if target.kind.name == "cuda" else None
    if _verified(library, sidecar) and (gpu_code is None or os.path.exists(gpu_code)):
        return library, gpu_code, "disk cache"
    module = tvm.compile(func, target=target).mod
    fcompile = targets.cross_compiler(target)
    _atomic_write(library, lambda path: module.export_library(path, fcompile=fcompile))
    if gpu_code:
        code = device_code(module, target)
        _atomic_write(gpu_code, lambda path: pathlib.Path(path).write_bytes(code))
    meta = {"sha256": runtime.file_sha256(library), "target": str(target.export()), "tvm": tvm.__version__, **meta}
    _atomic_write(sidecar, lambda path: _write_json(path, meta))
    return library, gpu_code, "compiled"


def _loaded(library: str, gpu_code: str | None) -> runtime.Kernel:
    if gpu_code is None:
        return runtime.Kernel(runtime.load_module(library))
    return runtime.CudaKernel(runtime.load_module(library, gpu_code))


def get_kernel(workload, target: tvm.target.Target, knobs=None, log_roots=None,
               record: "records.Tuned | bool | None" = None) -> CompiledKernel:
    """The kernel for `workload` (a ConvWorkload or a GradientKernel) on `target`: with `knobs` if given,
    else from `record` if given (False: no record, the rule's default schedule), else from the best tuning
    record in `log_roots` (default: records.search_roots()) unless that re-timed slower than the rule's
    schedule, else with the rule's default knobs."""
    key = targets.target_key(target)
    with _lock:
        rule, knobs, tuned = _choice(workload, target, knobs, record, log_roots)
        # Kept under the choice, so a record that falls back to the defaults is replayed (and reported) once.
        choice = (workload.key, key, knobs, tuned and str(tuned.trace))
        cached = _memory.get(choice)
        if cached is not None:
            return dataclasses.replace(cached, origin="memory cache")
        func, knobs, tuned = _scheduled_choice(workload, target, rule, knobs, tuned)
        library, gpu_code, origin = _library(func, target, key, workload.key, {
            "workload": dataclasses.asdict(workload), "label": workload.label,
            "schedule": str(tuned) if tuned else rule.name, "knobs": repr(knobs)})
        # Loaded from the library in both cases: what runs is what the cache holds.
        kernel = _loaded(library, gpu_code) if targets.runnable_here(target) else None
        compiled = CompiledKernel(workload, key, "tuning record" if tuned else rule.name, knobs,
                                  tuned.weight_block if tuned else weight_block(knobs), origin, library, kernel,
                                  gpu_code, tuned)
        _memory[choice] = compiled
        return compiled
