"""Running compiled modules with TVM's runtime only: loading, array hand-over, calls, exported bundles.

Nothing here compiles, and nothing here imports the `tvm` Python package (TVM's compiler): the
module needs `tvm_ffi` and TVM's runtime library (libtvm_runtime.so, 3 MB), which compiled kernels
call into for their thread pool. An inference service loads bundles with this module alone.
"""
import ctypes
import hashlib
import json
import math
import os
import platform
import sys
import threading

import numpy as np
import tvm_ffi

# TVM's generated code assumes 64-byte aligned buffers; DLPack hand-over checks it.
ALIGNMENT = 64


def aligned_empty(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    offset = -raw.ctypes.data % ALIGNMENT
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def as_aligned(array: np.ndarray) -> np.ndarray:
    """The array itself when TVM can use it in place, else an aligned C-contiguous copy."""
    if array.flags.c_contiguous and array.ctypes.data % ALIGNMENT == 0:
        return array
    copy = aligned_empty(array.shape, array.dtype)
    copy[...] = array
    return copy


def _load_tvm_runtime() -> None:
    """Load libtvm_runtime.so once, before any kernel library: kernels call its thread pool
    (TVMBackendParallelLaunch), and a kernel loaded without it crashes at its first parallel loop.
    Found through $TVMCONV_TVM_RUNTIME, else in the installed apache-tvm package (without importing it)."""
    global _tvm_runtime
    if _tvm_runtime is not None:
        return
    path = os.environ.get("TVMCONV_TVM_RUNTIME")
    if not path:  # the apache-tvm package's copy, looked up on sys.path without importing the package
        candidates = [os.path.join(entry or ".", "tvm", "lib", "libtvm_runtime.so") for entry in sys.path]
        path = next((c for c in candidates if os.path.exists(c)), None)
        if path is None:
            raise ImportError("TVM's runtime library was not found: install apache-tvm, or set TVMCONV_TVM_RUNTIME "
                              "to the path of libtvm_runtime.so")
    _tvm_runtime = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


_tvm_runtime = None


def to_tensor(array: np.ndarray) -> tvm_ffi.Tensor:
    """A CPU tensor sharing memory with `array` (copied only when misaligned or strided)."""
    return tvm_ffi.from_dlpack(as_aligned(array), require_alignment=ALIGNMENT)


def default_threads() -> int:
    """TVM_NUM_THREADS when set, else every CPU this process may run on."""
    value = os.environ.get("TVM_NUM_THREADS")
    return int(value) if value else len(os.sched_getaffinity(0))


_threads_lock = threading.Lock()
_threads_in_use = threading.local()  # TVM keeps one pool per calling thread


def use_threads(count: int) -> None:
    """Size TVM's thread pool (the calling thread's) to `count` threads.

    TVM reads TVM_NUM_THREADS at every parallel launch, caps the tasks at it, and when it is unset
    assumes hyper-threads on x86 and takes half the cores: on the 2-core machines here one task, half
    the speed, whatever the pool's size (measured: a 3x3 layer ran at 111 GFLOP/s instead of 223 with
    the variable unset). So the variable is left at least at `count`, and when unset is set to
    default_threads(), which it then keeps reporting."""
    current = os.environ.get("TVM_NUM_THREADS")
    needed = str(max(count, default_threads()))
    if getattr(_threads_in_use, "count", None) == count and current == needed:
        return
    with _threads_lock:
        os.environ["TVM_NUM_THREADS"] = needed
        _load_tvm_runtime()
        tvm_ffi.get_global_func("runtime.config_threadpool")(1, count)  # 1: every core, fastest first
        _threads_in_use.count = count


def input_tensor(array: np.ndarray) -> tvm_ffi.Tensor:
    """A CPU tensor sharing memory with a caller's array, copied only when not C-contiguous.
    (The kernels declare their input with element alignment: see compute.conv2d_forward.)"""
    return tvm_ffi.from_dlpack(np.ascontiguousarray(array), require_alignment=0)


def load_module(path: str):
    _load_tvm_runtime()
    return tvm_ffi.load_module(path)


def _idle_reference_counts() -> tuple[int, int]:
    """getrefcount of a pooled array nobody else holds, and of its memory, as OutputPool.take sees
    them: measured in the same code shape, since interpreters count borrowed references differently."""
    arrays = [aligned_empty((1,), np.float32)]
    for array in arrays:
        counts = sys.getrefcount(array), sys.getrefcount(array.base)
    return counts


class OutputPool:
    """Output arrays reused by later calls once the caller holds no reference to them (nor any view):
    a fresh multi-megabyte array costs page faults on every call. Each layer keeps at most `keep`."""

    IDLE = _idle_reference_counts()

    def __init__(self, keep: int = 2):
        self._arrays: list[np.ndarray] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self, shape, dtype) -> np.ndarray:
        with self._lock:
            for array in self._arrays:
                # Any reference beyond the idle counts means in use: to the array itself, or to its memory
                # (array.base, see aligned_empty) from a view, since numpy points views at the memory's owner.
                if (array.shape == shape and array.dtype == dtype
                        and (sys.getrefcount(array), sys.getrefcount(array.base)) == self.IDLE):
                    return array
            array = aligned_empty(shape, dtype)
            self._arrays = [array, *self._arrays][:self._keep]
            return array


class Kernel:
    """A compiled function in this process: input read in place at any alignment, weights and
    output as 64-byte aligned tensors."""

    device = "cpu"

    def __init__(self, module, entry: str = "main"):
        self.module = module
        self.entry = entry
        self.function = module[entry]

    def weights(self, arrays) -> list:
        return [to_tensor(np.ascontiguousarray(a)) for a in arrays]

    def __call__(self, x: np.ndarray, weights: list, out: np.ndarray) -> None:
        self.function(input_tensor(x), *weights, to_tensor(out))


# ---------------------------------------------------------------- exported bundles (tvmconv.export)

BUNDLE_FORMAT = "tvmconv-bundle-1"
BUNDLE_FILES = {"library": "kernels.so", "weights": "weights.npz", "manifest": "manifest.json"}


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Predictor:
    """An exported bundle, loaded: `pred(x)` runs its layers. Compiles nothing; safe to call from many
    threads at once (each call has its own intermediate arrays; the weights are only read)."""

    def __init__(self, path: str, threads: int | None = None):
        self.threads = threads or default_threads()
        manifest_path = os.path.join(path, BUNDLE_FILES["manifest"])
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is not a tvmconv bundle: {manifest_path} is missing") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"damaged bundle manifest {manifest_path}: {err.msg}") from None
        if manifest.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"{manifest_path}: unknown bundle format {manifest.get('format')!r} "
                             f"(this runtime reads {BUNDLE_FORMAT})")
        for role in ("library", "weights"):
            file = os.path.join(path, manifest["files"][role]["name"])
            if not os.path.exists(file):
                raise FileNotFoundError(f"bundle file missing: {file}")
            if file_sha256(file) != manifest["files"][role]["sha256"]:
                raise ValueError(f"bundle file {file} does not match its checksum in {manifest_path}: "
                                 "it was modified or damaged; refusing to load it")
        host = host_architecture()
        if manifest["architecture"] != host:
            raise ValueError(f"the bundle at {path} is compiled for {manifest['architecture']}, this machine is {host}")
        missing = sorted(set(manifest.get("cpu_flags", [])) - cpu_flags())
        if missing and host == "x86_64":  # its code would die with "Illegal instruction"
            raise ValueError(f"the bundle at {path} is compiled for {manifest['target'].get('mcpu')}, whose "
                             f"instructions this CPU lacks ({', '.join(missing)}): export it for this machine's target")
        self.manifest = manifest
        self.path = path
        self.input_shape = tuple(manifest["input_shape"])
        self.dtype = np.dtype(manifest["dtype"])
        module = load_module(os.path.join(path, manifest["files"]["library"]["name"]))
        with np.load(os.path.join(path, manifest["files"]["weights"]["name"])) as stored:
            self._layers = [(module[layer["function"]], layer["reads"], tuple(layer["output_shape"]),
                             np.dtype(layer["dtype"]),
                             [to_tensor(np.ascontiguousarray(stored[name])) for name in layer["weights"]])
                            for layer in manifest["layers"]]
        self._outputs = manifest["outputs"]

    @property
    def output_shapes(self) -> list[tuple]:
        return [tuple(self.manifest["layers"][i]["output_shape"]) for i in self._outputs]

    def _check(self, x) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise TypeError(f"expected a numpy array of shape (N, {', '.join(map(str, self.input_shape[1:]))}) and "
                            f"dtype {self.dtype}, got {type(x).__name__}")
        if x.dtype != self.dtype:
            raise ValueError(f"expected input dtype {self.dtype}, got {x.dtype}")
        if x.ndim != 4 or x.shape[1:] != self.input_shape[1:] or x.shape[0] < 1:
            raise ValueError(f"expected input shape (N, {', '.join(map(str, self.input_shape[1:]))}) with N >= 1, "
                             f"got {x.shape}")
        return x

    def _run(self, chunk: np.ndarray) -> list[np.ndarray]:
        use_threads(self.threads)  # TVM's own default is half the cores on x86
        values = []
        for function, reads, shape, dtype, weights in self._layers:
            source = chunk if reads < 0 else values[reads]
            source = source.astype(dtype, copy=False)  # a layer computes in its own dtype, as Conv2D does
            out = aligned_empty(shape, dtype)
            function(input_tensor(source), *weights, to_tensor(out))
            values.append(out)
        return [values[i] for i in self._outputs]

    def __call__(self, x):
        """Outputs for a batch of any size: the kernels run on chunks of the exported batch size."""
        x = self._check(x)
        batch = self.input_shape[0]
        results = []
        for start in range(0, x.shape[0], batch):
            chunk = x[start:start + batch]
            if chunk.shape[0] < batch:  # the last, short chunk: zero-padded, the padding's outputs dropped
                padded = np.zeros(self.input_shape, self.dtype)
                padded[:chunk.shape[0]] = chunk
                outputs = [y[:chunk.shape[0]] for y in self._run(padded)]
            else:
                outputs = self._run(chunk)
            results.append(outputs)
        merged = [np.concatenate(parts) if len(parts) > 1 else parts[0] for parts in zip(*results)]
        return merged[0] if self.manifest["single_output"] else merged


def host_architecture() -> str:
    """This machine's CPU architecture, as LLVM triples name it ("x86_64", "aarch64")."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def cpu_flags() -> set[str]:
    """The instruction-set extensions the OS reports (/proc/cpuinfo "flags"; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load(path: str, threads: int | None = None) -> Predictor:
    """Load an exported bundle (tvmconv.export) for inference with TVM's runtime only; its kernels run
    on `threads` threads (default: TVM_NUM_THREADS, else every CPU this process may use)."""
    return Predictor(path, threads)
