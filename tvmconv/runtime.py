"""Running compiled modules with TVM's runtime only: loading, array hand-over, calls, exported bundles.

Nothing here compiles, and nothing here imports the `tvm` Python package (TVM's compiler): the
module needs `tvm_ffi` and TVM's runtime library (libtvm_runtime.so, 3 MB), which compiled kernels
call into for their thread pool. An inference service loads bundles with this module alone.
"""
import ctypes
import functools
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


def use_threads(count: int | None) -> None:
    """Size TVM's thread pool (the calling thread's) to `count` threads (None: default_threads()).

    TVM reads TVM_NUM_THREADS at every parallel launch, caps the tasks at it, and when it is unset
    assumes hyper-threads on x86 and takes half the cores: on the 2-core machines here one task, half
    the speed, whatever the pool's size (measured: a 3x3 layer ran at 111 GFLOP/s instead of 223 with
    the variable unset). So the variable is left at least at `count`, and when unset is set to
    default_threads(), which it then keeps reporting. Nothing is done when the calling thread's last
    call asked for the same and the variable is as that call left it: the per-call cost is one lookup."""
    if getattr(_threads_in_use, "state", None) == (count, os.environ.get("TVM_NUM_THREADS")):
        return
    threads = count or default_threads()
    needed = str(max(threads, default_threads()))
    with _threads_lock:
        os.environ["TVM_NUM_THREADS"] = needed
        _load_tvm_runtime()
        tvm_ffi.get_global_func("runtime.config_threadpool")(1, threads)  # 1: every core, fastest first
        _threads_in_use.state = (count, needed)


def input_tensor(array: np.ndarray) -> tvm_ffi.Tensor:
    """A CPU tensor sharing memory with a caller's array, copied only when not C-contiguous.
    (The kernels declare their input with element alignment: see compute.conv2d_forward.)"""
    return tvm_ffi.from_dlpack(np.ascontiguousarray(array), require_alignment=0)


def load_module(path: str, device_code: str | None = None):
    """Load a compiled library. A CUDA library also needs `device_code`: the file of GPU code that
    nvcc built for it (build.py), which TVM's CUDA runtime loads in place of the library's CUDA source."""
    _load_tvm_runtime()
    if device_code is None:
        return tvm_ffi.load_module(path)
    _load_cuda_runtime()
    with open(device_code, "rb") as f:
        code = f.read()
    with _device_code_lock:  # the callback below hands `code` to this load, and to no other
        _device_code_for_load[:] = [code]
        try:
            return tvm_ffi.load_module(path)
        finally:
            _device_code_for_load.clear()


# ---------------------------------------------------------------- CUDA
# A CUDA library keeps its kernels as CUDA source, and TVM's CUDA runtime asks the callback
# "tvm_callback_cuda_compile" to compile that source when the library loads. On the GPU machine the
# callback hands over the device code that nvcc built beside the library at build time instead: no
# CUDA compiler and no TVM compiler are needed where the kernels run.
CUDA = 2  # DLPack's kDLCUDA
_device_code_lock = threading.Lock()
_device_code_for_load: list[bytes] = []
_cuda_runtime = None


def _prebuilt_device_code(*_source_and_target):
    if not _device_code_for_load:
        raise RuntimeError("tvmconv: a CUDA library was loaded without its device code: load it with "
                           "runtime.load_module(path, device_code=...)")
    return _device_code_for_load[0]


def _load_cuda_runtime() -> None:
    """Load TVM's CUDA runtime (libtvm_runtime_cuda.so, beside libtvm_runtime.so): the CUDA device API
    and module loader. It needs the NVIDIA driver (libcuda.so.1) and the CUDA 13 runtime (libcudart.so.13)."""
    global _cuda_runtime
    if _cuda_runtime is not None:
        return
    _load_tvm_runtime()
    path = os.path.join(os.path.dirname(_tvm_runtime._name), "libtvm_runtime_cuda.so")
    try:
        library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as err:
        raise RuntimeError(f"TVM's CUDA runtime could not be loaded ({err}). It needs an NVIDIA driver "
                           "(libcuda.so.1) and the CUDA 13 runtime library (libcudart.so.13) on the library path") from None
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", _prebuilt_device_code, override=True)
    _cuda_runtime = library


@functools.cache
def cuda_available() -> bool:
    """Whether this machine has a CUDA GPU that TVM's CUDA runtime can use (asked once: a CPU machine's
    failing library load is not retried at every build)."""
    try:
        _load_cuda_runtime()
    except (RuntimeError, ImportError):
        return False
    return bool(global_function("runtime.GetDeviceAttr")(CUDA, 0, 0))  # 0: kExist


def global_function(name: str):
    """A function of TVM's runtime library, by its registered name."""
    _load_tvm_runtime()
    return tvm_ffi.get_global_func(name)


def cuda_compute_version() -> str:
    """GPU 0's compute capability, e.g. "9.0"."""
    return str(global_function("runtime.GetDeviceAttr")(CUDA, 0, 4))  # 4: kComputeVersion


def device_empty(shape, dtype, device: str) -> tvm_ffi.Tensor:
    """An uninitialized tensor on `device` ("cpu" or "cuda")."""
    if device == "cpu":
        return to_tensor(aligned_empty(shape, dtype))
    alloc = global_function("runtime.TVMTensorAllocWithScope")
    return alloc(tvm_ffi.Shape(shape), tvm_ffi.dtype(str(np.dtype(dtype))), tvm_ffi.device("cuda", 0), None)


def to_device(array: np.ndarray, device: str) -> tvm_ffi.Tensor:
    """A copy of `array` on `device` (for "cpu", the array itself where it is aligned)."""
    if device == "cpu":
        return to_tensor(array)
    tensor = device_empty(array.shape, array.dtype, device)
    global_function("runtime.TVMTensorCopyFromTo")(input_tensor(array), tensor)
    return tensor


class GpuTensor:
    """A caller's tensor on a CUDA GPU (torch, CuPy, ...), taken by DLPack without a copy: a CUDA kernel reads
    it in place, and its output goes back as a tensor of the caller's library, on the GPU."""

    def __init__(self, source):
        self.tensor = tvm_ffi.from_dlpack(source)
        self.shape = tuple(self.tensor.shape)
        self.dtype = np.dtype(str(self.tensor.dtype))
        self._library = sys.modules[type(source).__module__.split(".")[0]]

    @staticmethod
    def holds(source) -> bool:
        """Whether `source` is a DLPack producer's tensor on a CUDA GPU."""
        device = getattr(source, "__dlpack_device__", None)
        return device is not None and device()[0] == CUDA

    def like_source(self, tensor: tvm_ffi.Tensor):
        """`tensor` as a tensor of the source's library (its `from_dlpack`), sharing its memory."""
        return self._library.from_dlpack(tensor)


def copy_to_host(tensor: tvm_ffi.Tensor, out: np.ndarray) -> np.ndarray:
    """Copy a device tensor into the C-contiguous array `out`."""
    host = as_aligned(out)
    global_function("runtime.TVMTensorCopyFromTo")(tensor, to_tensor(host))
    if host is not out:
        out[...] = host
    return out


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

    def __call__(self, x: np.ndarray, weights: list, out: np.ndarray, threads: int | None = None) -> None:
        """Run on `threads` of this CPU's cores (None: default_threads())."""
        use_threads(threads)
        self.function(input_tensor(x), *weights, to_tensor(out))

    def call(self, *inputs: np.ndarray, out: np.ndarray) -> None:
        """Run a function whose every input is declared unaligned (the gradient kernels that are not
        convolutions): inputs read in place, on the calling thread's pool."""
        self.function(*map(input_tensor, inputs), to_tensor(out))


class CudaKernel(Kernel):
    """A compiled CUDA function: weights kept on the GPU, input and output copied for each call, or a
    caller's GPU tensors used in place (`on_device`)."""

    device = "cuda"

    def weights(self, arrays) -> list:
        return [to_device(np.ascontiguousarray(a), self.device) for a in arrays]

    def __call__(self, x: np.ndarray, weights: list, out: np.ndarray, threads: int | None = None) -> None:
        result = device_empty(out.shape, out.dtype, self.device)
        self.function(to_device(x, self.device), *weights, result)
        copy_to_host(result, out)

    def call(self, *inputs: np.ndarray, out: np.ndarray) -> None:
        result = device_empty(out.shape, out.dtype, self.device)
        self.function(*(to_device(np.ascontiguousarray(a), self.device) for a in inputs), result)
        copy_to_host(result, out)

    def on_device(self, x: tvm_ffi.Tensor, weights: list, output_shape: tuple) -> tvm_ffi.Tensor:
        """The output for `x`, a tensor on this GPU (a caller's, by DLPack: read in place), on the GPU."""
        out = device_empty(output_shape, str(x.dtype), self.device)
        self.function(x, *weights, out)
        return out


# ---------------------------------------------------------------- exported bundles (tvmconv.export)

BUNDLE_FORMAT = "tvmconv-bundle-1"
BUNDLE_FILES = {"library": "kernels.so", "device_code": "kernels.fatbin", "weights": "weights.npz",
                "manifest": "manifest.json"}


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
        for role in manifest["files"]:
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
        self.device = manifest.get("device", "cpu")
        if self.device == "cuda" and not cuda_available():
            raise RuntimeError(f"the bundle at {path} runs on a CUDA GPU, and this machine has none that TVM's CUDA "
                               "runtime can use (it needs an NVIDIA driver and libcudart.so.13)")
        self.manifest = manifest
        self.path = path
        self.input_shape = tuple(manifest["input_shape"])
        self.dtype = np.dtype(manifest["dtype"])
        files = {role: os.path.join(path, entry["name"]) for role, entry in manifest["files"].items()}
        module = load_module(files["library"], files.get("device_code"))
        with np.load(files["weights"]) as stored:
            self._layers = [(module[layer["function"]], layer["reads"], tuple(layer["output_shape"]),
                             np.dtype(layer["dtype"]),
                             [to_device(np.ascontiguousarray(stored[name]), self.device) for name in layer["weights"]])
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
        values = []  # each layer's output, a tensor on the bundle's device
        for function, reads, shape, dtype, weights in self._layers:
            source = chunk if reads < 0 else values[reads]
            if isinstance(source, np.ndarray) or np.dtype(str(source.dtype)) != dtype:
                host = self._host(source).astype(dtype, copy=False)  # a layer computes in its own dtype
                source = input_tensor(host) if self.device == "cpu" else to_device(host, self.device)
            out = device_empty(shape, dtype, self.device)
            function(source, *weights, out)
            values.append(out)
        return [self._host(values[i]) for i in self._outputs]

    def _host(self, value) -> np.ndarray:
        """An array or a tensor on the bundle's device, as a numpy array (a CPU tensor's memory itself)."""
        if isinstance(value, np.ndarray) or self.device == "cpu":
            return np.from_dlpack(value)
        return copy_to_host(value, aligned_empty(tuple(value.shape), str(value.dtype)))

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
