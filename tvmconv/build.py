"""Compute + schedule → compiled kernel, cached in memory and on disk per (workload, target).

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

from . import backward, records, runtime, schedules, targets
from .compute import ConvWorkload, conv2d_forward


@dataclasses.dataclass
class CompiledKernel:
    workload: ConvWorkload
    target_key: str
    schedule: str   # the schedules/ rule that produced it, or "tuning record"
    knobs: object   # the rule's knob values (None when a tuning record scheduled it)
    origin: str     # "compiled", "disk cache" or "memory cache"
    library: str    # the shared library in the kernel cache
    kernel: runtime.Kernel | None  # loaded here, when this host can run the target's code
    device_code: str | None = None  # GPU targets: the fatbin nvcc built, beside the library
    tuning: records.Tuned | None = None  # the tuning record it was built from (None: the template's defaults)

    @property
    def kernel_block(self) -> int:
        """Filters per block of the packed kernel this kernel reads (0: Keras's layout)."""
        return self.tuning.kernel_block if self.tuning else self.knobs.kernel_block

    def time_evaluator(self, number: int = 10, repeat: int = 20, min_repeat_ms: int = 0):
        """TVM's time evaluator for this kernel on this machine's CPU or GPU: call it with
        `Conv2D.kernel_arguments(x)`."""
        if self.kernel is None:
            raise ValueError(f"kernels for {self.target_key} do not run on this host: time them on their device")
        return runtime.time_evaluator(self.kernel.module, self.kernel.entry, self.kernel.device, number, repeat,
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


def scheduled(rule, wl: ConvWorkload, target: tvm.target.Target, knobs):
    """The PrimFunc of our compute for `wl`, scheduled by a schedules/ rule with these knobs."""
    return rule.schedule(conv2d_forward(wl, knobs.kernel_block), wl, target, knobs).mod["main"]


def _choice(wl: ConvWorkload, target: tvm.target.Target, knobs, log_roots, record=None) -> tuple:
    """(rule, knobs, tuning record): `knobs` if given, else `record` if given, else the best record in
    `log_roots` (default: records.search_roots()) unless it re-timed slower than the defaults, else the
    rule's default knobs. Cheap: the record lookup is memoized."""
    rule = schedules.find_rule(wl, target)
    tuned = (record or records.best(wl, target, log_roots)) if knobs is None else None
    return rule, (None if tuned else knobs or rule.default_knobs(wl, target)), tuned


def _function(rule, wl: ConvWorkload, target: tvm.target.Target, knobs, tuned) -> tuple:
    """(scheduled PrimFunc, knobs, tuned) for a choice; a record whose trace does not replay on this
    workload gives way to the default knobs."""
    if tuned is not None:
        try:
            return records.apply(tuned, conv2d_forward(wl, tuned.kernel_block)).mod["main"], None, tuned
        except Exception as err:  # e.g. a batch-1 trace whose tile sizes do not fit this batch
            warnings.warn(f"tvmconv: the tuning record in {tuned.folder} does not apply to this workload ({err}); "
                          "using the template's defaults", RuntimeWarning)
            knobs = rule.default_knobs(wl, target)
    return scheduled(rule, wl, target, knobs), knobs, None


def scheduled_function(wl: ConvWorkload, target: tvm.target.Target, knobs=None, log_roots=None) -> tuple:
    """(the scheduled PrimFunc, its knobs or None, its tuning record or None), chosen as `get_kernel`
    chooses, without compiling it (export links several into one library)."""
    rule, knobs, tuned = _choice(wl, target, knobs, log_roots)
    return _function(rule, wl, target, knobs, tuned)


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


def get_kernel(wl: ConvWorkload, target: tvm.target.Target, knobs=None, log_roots=None,
               record: "records.Tuned | None" = None) -> CompiledKernel:
    """The kernel for `wl` on `target`: with `knobs` if given, else from `record` if given, else from the
    best tuning record in `log_roots` (default: records.search_roots()) unless that re-timed slower than
    the defaults, else with the rule's default knobs."""
    key = targets.target_key(target)
    with _lock:
        rule, knobs, tuned = _choice(wl, target, knobs, log_roots, record)
        # Kept under the choice, so a record that falls back to the defaults is replayed (and reported) once.
        choice = (wl.key, key, knobs, tuned and str(tuned.trace))
        cached = _memory.get(choice)
        if cached is not None:
            return dataclasses.replace(cached, origin="memory cache")
        func, knobs, tuned = _function(rule, wl, target, knobs, tuned)
        library, gpu_code, origin = _library(func, target, key, wl.key, {
            "workload": dataclasses.asdict(wl), "schedule": str(tuned) if tuned else rule.__name__,
            "knobs": repr(knobs)})
        # Loaded from the library in both cases: what runs is what the cache holds.
        kernel = _loaded(library, gpu_code) if targets.runnable_here(target) else None
        schedule = "tuning record" if tuned else rule.__name__.rsplit(".", 1)[-1]
        compiled = CompiledKernel(wl, key, schedule, knobs, origin, library, kernel, gpu_code, tuned)
        _memory[choice] = compiled
        return compiled


# The gradient kernels that are not forward convolutions: (compute, the schedule rule's function for it).
GRADIENT_KERNELS = {
    "activation": (backward.activation_backward, "schedule_elementwise"),
    "activation-from-output": (lambda wl: backward.activation_backward(wl, from_output=True), "schedule_elementwise"),
    "depthwise-kernel": (backward.depthwise_kernel_backward, "schedule_depthwise_kernel_gradient"),
    "pointwise-kernel": (backward.pointwise_kernel_backward, "schedule_pointwise_kernel_gradient"),
    "kernel-gradient-image": (backward.kernel_gradient_image, "schedule_kernel_gradient_image"),
}


def gradient_function(part: str, wl: ConvWorkload):
    """The unscheduled PrimFunc of the `part` kernel of GRADIENT_KERNELS for `wl`, naming what it computes
    in its attributes (as conv2d_forward does), so that tuning logs can hold its records."""
    compute, _ = GRADIENT_KERNELS[part]
    return compute(wl).with_attr({"tvmconv.workload": json.dumps(dataclasses.asdict(wl)), "tvmconv.gradient": part})


def get_gradient_kernel(part: str, wl: ConvWorkload, target: tvm.target.Target, log_roots=None,
                        record: "bool | records.Tuned" = True) -> runtime.Kernel:
    """The `part` kernel of GRADIENT_KERNELS for `wl`, on this host: scheduled by its best tuning record in
    `log_roots` (default: records.search_roots()) when that re-timed faster than the rule's schedule,
    else by the rule. `record`: False for the rule's schedule, or the record to use."""
    key = targets.target_key(target)
    with _lock:
        func = gradient_function(part, wl)
        if record is True:
            record = records.best_gradient(backward.GradientKernel(part, wl), func, target, log_roots)
        tuned = record or None
        memory_key = (part, wl.key, key, tuned and str(tuned.trace))
        cached = _memory.get(memory_key)
        if cached is not None:
            return cached
        if tuned is not None:
            func = records.apply(tuned, func).mod["main"]
        else:
            rule = schedules.find_rule(wl, target)
            scheduler = GRADIENT_KERNELS[part][1]
            if not hasattr(rule, scheduler):
                raise NotImplementedError(f"the {rule.__name__} schedules have no gradient kernels yet")
            func = getattr(rule, scheduler)(func, wl, target).mod["main"]
        library, _, _ = _library(func, target, key, f"{wl.key}-grad-{part}",
                                 {"workload": dataclasses.asdict(wl), "gradient": part,
                                  "schedule": str(tuned) if tuned else "rule"})
        kernel = _memory[memory_key] = runtime.Kernel(runtime.load_module(library))
        return kernel
