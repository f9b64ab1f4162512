"""Workload + schedule rule (+ tuning record) → compiled kernel, cached in memory and on disk per target.

One path for every workload, a forward convolution or a gradient kernel (the interface in
tvmconv.compute): its PrimFunc, scheduled by a tuning record or by its rule (schedules/), compiled
for the target and loaded where this host can run it.

The disk cache lives under $TVMCONV_CACHE_DIR (default ~/.cache/tvmconv)/kernels/<target key>/.
Each entry is a shared library and a JSON sidecar holding its checksum; both are written to a
temporary name and renamed, so a concurrent reader sees a whole entry or none, and a process writes
an entry holding the folder's lock, so two processes compiling one kernel leave one entry. An entry
whose checksum does not match (truncated, corrupt, tampered) is reported, removed and rebuilt.
The cache fails soft, never open: where it cannot be written, kernels compile into a private
temporary folder (one warning); a cache folder that others could write is refused.
"""
import atexit
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import pathlib
import shutil
import stat
import tempfile
import threading
import typing
import warnings

import filelock
import numpy as np
import tvm
from tvm import s_tir

from . import lowering, records, runtime, schedules, targets, timing
from .compute import pack_weights


@dataclasses.dataclass
class CompiledKernel:
    workload: object  # a compute.ConvWorkload or a backward.GradientKernel
    target_key: str
    schedule: str   # the schedules/ rule that produced it ("x86", "arm", "cuda", "cpu"), or "tuning record"
    knobs: object   # the rule's knob values (None: a tuning record, or a schedule without knobs)
    layout: tuple[int, int, int]  # the PrimFunc's layout (weight block, flat tile, Winograd tile): prim_func(*layout)
    origin: str     # "compiled", "disk cache" or "memory cache"
    library: str    # the shared library in the kernel cache
    kernel: runtime.Kernel | None  # loaded here, when this host can run the target's code
    device_code: str | None = None  # GPU targets: the fatbin nvcc built, beside the library
    tuning: records.Tuned | None = None  # the tuning record it was built from (None: the rule's schedule)

    @property
    def weight_block(self) -> int:
        """Filters per block of the packed weights it reads (0: Keras's layout)."""
        return self.layout[0]

    def pack(self, weights: np.ndarray) -> np.ndarray:
        """A convolution's weights (Keras's layout) as this kernel reads them (compute.pack_weights)."""
        return pack_weights(weights, self.layout[0], self.layout[2])

    def time_evaluator(self, number: int = 10, repeat: int = 20, min_repeat_ms: int = 0):
        """TVM's time evaluator for this kernel on this machine's CPU or GPU: call it with
        `Conv2D.kernel_arguments(x)`."""
        if self.kernel is None:
            raise ValueError(f"kernels for {self.target_key} do not run on this host: time them on their device")
        return timing.time_evaluator(self.kernel.module, self.kernel.entry, self.kernel.device, number, repeat,
                                     min_repeat_ms)


_memory: dict[tuple, CompiledKernel] = {}
_lock = threading.Lock()


# What writing a cache entry fails with where the cache cannot take it (permissions, a read-only or full disk).
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)
_temporary_root: str | None = None  # where this process compiles when the cache cannot be written


def cache_dir() -> str:
    return os.environ.get("TVMCONV_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tvmconv")


def _check_private(folder: str) -> None:
    """Refuse a cache folder that someone else could write, as ssh refuses such key files: whoever can write
    it can replace the kernels this process loads and runs."""
    info = os.stat(folder)
    if info.st_uid not in (os.geteuid(), 0):
        raise PermissionError(f"tvmconv: the kernel cache folder {folder} belongs to user id {info.st_uid}, not to "
                              f"this user ({os.geteuid()}), who could replace the kernels this process runs: point "
                              "$TVMCONV_CACHE_DIR to a folder of your own")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        others = " and ".join(who for who, bit in (("its group", stat.S_IWGRP), ("all users", stat.S_IWOTH))
                              if info.st_mode & bit)
        raise PermissionError(f"tvmconv: the kernel cache folder {folder} is writable by {others} (mode "
                              f"{stat.S_IMODE(info.st_mode):o}), who could replace the kernels this process runs: "
                              f"chmod go-w {folder}, or point $TVMCONV_CACHE_DIR to a private folder")


def _cache_folder(key: str) -> tuple[str, str | None]:
    """kernels/<key> in the cache, each folder on the way made (mode 0700) where absent and checked
    (_check_private), and why new entries cannot be written there (None: they can)."""
    root = cache_dir()
    folders = [root, os.path.join(root, "kernels"), os.path.join(root, "kernels", key)]
    problem = None
    for folder in folders:
        if problem is None:
            try:
                os.makedirs(folder, mode=0o700, exist_ok=True)
            except OSError as err:
                problem = f"{err.strerror}: {folder}"
        if os.path.isdir(folder):
            _check_private(folder)
    if problem is None and not os.access(folders[-1], os.W_OK):
        problem = f"{folders[-1]} is read-only"
    return folders[-1], problem


def _temporary_folder(key: str, problem: str) -> str:
    """kernels/<key> in a private temporary folder (mode 0700) that lives as long as this process; the first
    use warns, saying why the cache was not used."""
    global _temporary_root
    if _temporary_root is None:
        _temporary_root = tempfile.mkdtemp(prefix="tvmconv-kernels-")
        atexit.register(shutil.rmtree, _temporary_root, ignore_errors=True)
        warnings.warn(f"tvmconv: the kernel cache {cache_dir()} cannot be written ({problem}); this process compiles "
                      f"its kernels into {_temporary_root}, removed when it exits", RuntimeWarning)
    folder = os.path.join(_temporary_root, key)
    os.makedirs(folder, exist_ok=True)
    return folder


def _atomic_write(path: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
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
            with contextlib.suppress(OSError):  # a read-only cache keeps it: the rebuilt entry goes elsewhere
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


def layout(knobs) -> tuple[int, int, int]:
    """The PrimFunc layout that knobs schedule (compute's prim_func arguments); Keras's weights and the direct
    sum for a schedule without knobs."""
    return (0, 0, 0) if knobs is None else knobs.layout


def scheduled(workload, target: tvm.target.Target, rule, knobs):
    """The PrimFunc of `workload` scheduled by a schedules/ rule with these knobs."""
    sch = s_tir.Schedule(workload.prim_func(*layout(knobs)))
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
            func = workload.prim_func(*tuned.layout)
            return records.apply(tuned, func).mod["main"], None, tuned
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


class _Entry(typing.NamedTuple):
    """The files of a cache entry."""
    library: str
    sidecar: str
    device_code: str | None  # GPU targets only

    @classmethod
    def at(cls, folder: str, file_name: str, cuda: bool) -> "_Entry":
        library = os.path.join(folder, file_name)
        return cls(library, library[:-3] + ".json", library[:-3] + ".fatbin" if cuda else None)

    def intact(self) -> bool:
        return _verified(self.library, self.sidecar) and (self.device_code is None or os.path.exists(self.device_code))

    def write(self, module, target: tvm.target.Target, meta: dict) -> None:
        fcompile = targets.cross_compiler(target)
        _atomic_write(self.library, lambda path: module.export_library(path, fcompile=fcompile))
        if self.device_code:
            code = device_code(module, target)
            _atomic_write(self.device_code, lambda path: pathlib.Path(path).write_bytes(code))
        meta = {"sha256": runtime.file_sha256(self.library), "target": str(target.export()), "tvm": tvm.__version__,
                **meta}
        _atomic_write(self.sidecar, lambda path: _write_json(path, meta))


def _library(func, target: tvm.target.Target, key: str, name: str, meta: dict) -> tuple:
    """The shared library of a scheduled PrimFunc in the disk cache, compiled when absent or damaged:
    (library path, device code path or None, "compiled" or "disk cache")."""
    # The file name covers the exact scheduled program, so a change to compute or schedule
    # never picks up a stale library.
    fingerprint = hashlib.sha256((tvm.__version__ + str(target.export()) + func.script()).encode()).hexdigest()[:16]
    file_name, cuda = f"{name}-{fingerprint}.so", target.kind.name == "cuda"
    folder, problem = _cache_folder(key)
    entry = _Entry.at(folder, file_name, cuda)
    with contextlib.nullcontext() if problem else filelock.FileLock(os.path.join(folder, records.LOCK_FILE)):
        if entry.intact():
            return entry.library, entry.device_code, "disk cache"
        module = lowering.compile(func, target)
        if problem is None:
            try:
                entry.write(module, target, meta)
                return entry.library, entry.device_code, "compiled"
            except OSError as err:
                if err.errno not in _UNWRITABLE:
                    raise
                problem = f"{err.strerror}: {folder}"
    entry = _Entry.at(_temporary_folder(key, problem), file_name, cuda)
    entry.write(module, target, meta)
    return entry.library, entry.device_code, "compiled"


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
        # A trace replays on the PrimFunc of its layout: the same trace on another layout is another kernel.
        choice = (workload.key, key, knobs, tuned and (tuned.layout, str(tuned.trace)))
        cached = _memory.get(choice)
        if cached is not None:
            # The same program may come from another record (another folder): report the one asked for.
            return dataclasses.replace(cached, origin="memory cache", tuning=cached.tuning and tuned)
        func, knobs, tuned = _scheduled_choice(workload, target, rule, knobs, tuned)
        library, gpu_code, origin = _library(func, target, key, workload.key, {
            "workload": dataclasses.asdict(workload), "label": workload.label,
            "schedule": str(tuned) if tuned else rule.name, "knobs": repr(knobs)})
        # Loaded from the library in both cases: what runs is what the cache holds.
        kernel = _loaded(library, gpu_code) if targets.runnable_here(target) else None
        compiled = CompiledKernel(workload, key, "tuning record" if tuned else rule.name, knobs,
                                  tuned.layout if tuned else layout(knobs), origin, library, kernel,
                                  gpu_code, tuned)
        _memory[choice] = compiled
        return compiled
