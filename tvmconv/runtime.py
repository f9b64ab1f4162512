"""Running compiled modules with TVM's runtime only: loading, array hand-over, calls, exported bundles.

Nothing here compiles, and nothing here imports the `tvm` Python package (TVM's compiler): the
module needs `tvm_ffi` and TVM's runtime library (libtvm_runtime.so, 3 MB), which compiled kernels
call into for their thread pool. An inference service loads bundles with this module alone.
"""
import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import io
import json
import math
import os
import platform
import shutil
import stat
import struct
import sys
import tempfile
import threading
import warnings
import zipfile

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


def is_aligned(array: np.ndarray) -> bool:
    """Whether TVM can use the array in place: C-contiguous and 64-byte aligned."""
    return array.flags.c_contiguous and array.ctypes.data % ALIGNMENT == 0


def aligned_copy(array: np.ndarray) -> np.ndarray:
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


def _tensor(array: np.ndarray, alignment: int) -> tvm_ffi.Tensor:
    """A CPU tensor sharing memory with the C-contiguous `array`. Handed over as a DLPack 1.0 capsule, which
    carries numpy's read-only flag: the older protocol refuses read-only arrays (np.load(mmap_mode="r"),
    np.frombuffer, JAX's arrays), and the kernels only read their inputs."""
    return tvm_ffi.from_dlpack(array.__dlpack__(max_version=(1, 0)), require_alignment=alignment)


def to_tensor(array: np.ndarray) -> tvm_ffi.Tensor:
    """A CPU tensor sharing memory with `array` (copied only when misaligned or strided: for an output,
    see `output_tensor`). DLPack checks the alignment itself, faster than numpy can (per-call cost)."""
    if array.flags.c_contiguous:
        try:
            return _tensor(array, ALIGNMENT)
        except RuntimeError:  # "Data is not aligned to 64 bytes"
            pass
    return _tensor(aligned_copy(array), ALIGNMENT)


def output_tensor(array: np.ndarray) -> tvm_ffi.Tensor:
    """A CPU tensor that a kernel writes `array` through: the array must be C-contiguous and aligned
    (aligned_empty), since a copy would take the result away from the caller."""
    if not array.flags.c_contiguous:
        raise ValueError(f"kernel outputs must be C-contiguous arrays (runtime.aligned_empty); got strides "
                         f"{array.strides}")
    return tvm_ffi.from_dlpack(array, require_alignment=ALIGNMENT)


def default_threads() -> int:
    """TVM_NUM_THREADS when set, else every CPU this process may run on."""
    value = os.environ.get("TVM_NUM_THREADS")
    return int(value) if value else len(os.sched_getaffinity(0))


class _ThreadsInUse(threading.local):  # TVM keeps one pool per calling thread
    state = None  # (count, TVM_NUM_THREADS) as the thread's last use_threads left them


_threads_lock = threading.Lock()
_threads_in_use = _ThreadsInUse()
# The environment as os.environ keeps it (CPython on POSIX: bytes), read per call: os.environ.get takes four
# Python-level steps, which cost 1.5-3 µs between two kernel calls (measured), this one lookup.
_environ_bytes = os.environ._data


def use_threads(count: int | None) -> None:
    """Size TVM's thread pool (the calling thread's) to `count` threads (None: default_threads()).

    TVM reads TVM_NUM_THREADS at every parallel launch, caps the tasks at it, and when it is unset
    assumes hyper-threads on x86 and takes half the cores: on the 2-core machines here one task, half
    the speed, whatever the pool's size (measured: a 3x3 layer ran at 111 GFLOP/s instead of 223 with
    the variable unset). So the variable is left at least at `count`, and when unset is set to
    default_threads(), which it then keeps reporting. Nothing is done when the calling thread's last
    call asked for the same and the variable is as that call left it: the per-call cost is one lookup."""
    if _threads_in_use.state == (count, _environ_bytes.get(b"TVM_NUM_THREADS")):
        return
    threads = count or default_threads()
    needed = str(max(threads, default_threads()))
    with _threads_lock:
        os.environ["TVM_NUM_THREADS"] = needed
        _load_tvm_runtime()
        # -3 (kSpecifyThreadShareAllCore): each thread may run on any of this process's CPUs. Mode 1 (big
        # cores) pins a one-thread pool's caller to the first CPU, so that two single-thread processes
        # (TVM_NUM_THREADS=1 each) shared CPU 0 and the caller's own threads inherited the pin; no
        # kernel ran slower unpinned (measured: 394 vs 403 µs, 420 vs 421, 104 vs 103 on three layers).
        cpus = [str(cpu) for cpu in sorted(os.sched_getaffinity(0))]
        tvm_ffi.get_global_func("runtime.config_threadpool")(-3, threads, cpus)
        _threads_in_use.state = (count, _environ_bytes.get(b"TVM_NUM_THREADS"))


def input_tensor(array: np.ndarray) -> tvm_ffi.Tensor:
    """A CPU tensor sharing memory with a caller's array, copied only when not C-contiguous.
    (The kernels declare their input with element alignment: see compute.conv2d_forward.)"""
    return _tensor(np.ascontiguousarray(array), 0)


def input_argument(array: np.ndarray):
    """A caller's array as a kernel argument, read in place: the array itself where tvm_ffi takes it as
    it is (C-contiguous and writeable: the call converts it through DLPack in C, 0.3-0.8 µs a call less
    than input_tensor, measured on MobileNetV2's layers), else input_tensor(array): numpy exports
    read-only memory only through DLPack 1.0, which tvm_ffi's own conversion does not ask for."""
    flags = array.flags
    return array if flags.c_contiguous and flags.writeable else input_tensor(array)


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
    host = out if is_aligned(out) else aligned_empty(out.shape, out.dtype)
    global_function("runtime.TVMTensorCopyFromTo")(tensor, output_tensor(host))
    if host is not out:
        out[...] = host
    return out


def _idle_reference_counts() -> tuple[int, int]:
    """getrefcount of a pooled array nobody else holds, and of its memory, as OutputPool.take sees
    them: measured in the same code shape, since interpreters count borrowed references differently.
    (The entry's handle holds one reference to the array: a tensor over it, or the array itself.)"""
    array = aligned_empty((1,), np.float32)
    entries = [((1,), "float32", array, output_tensor(array))]
    del array
    for entry in entries:
        array = entry[2]
        counts = sys.getrefcount(array), sys.getrefcount(array.base)
    return counts


class _ThreadEntries(threading.local):
    def __init__(self):
        self.entries: list[tuple] = []  # (shape, dtype name, array, its handle), newest first


class OutputPool:
    """Output arrays reused by later calls once the caller holds no reference to them (nor any view):
    a fresh multi-megabyte array costs page faults on every call. Each array is kept with what its runner
    writes it through (`runner.output_for(array)`: here a tensor over it, made once, where making it for
    every call cost ~1 µs). Each calling thread has its own, of at most `keep` arrays: no two threads can
    take the same array, and no lock is taken (one cost 0.15 µs a call, a third of the pool's time)."""

    IDLE = _idle_reference_counts()

    def __init__(self, keep: int = 2):
        self._local = _ThreadEntries()
        self._keep = keep

    def take(self, shape: tuple, dtype: str, output_for) -> tuple:
        """(array, handle) of an idle array of this shape and dtype, else of a new one, whose handle is
        output_for(array)."""
        local = self._local
        for entry in local.entries:
            # (entry[3], the handle, is not bound to a name here: where it is the array itself, that name
            # would be one more reference, and the array would never look idle)
            array = entry[2]
            # Any reference beyond the idle counts means in use: to the array itself, or to its memory
            # (array.base, see aligned_empty) from a view, since numpy points views at the memory's owner.
            if (entry[0] == shape and entry[1] == dtype
                    and (sys.getrefcount(array), sys.getrefcount(array.base)) == self.IDLE):
                return array, entry[3]
        array = aligned_empty(shape, dtype)
        out = output_for(array)
        local.entries = [(shape, dtype, array, out), *local.entries][:self._keep]
        return array, out


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

    def output_for(self, array: np.ndarray) -> tvm_ffi.Tensor:
        """What __call__ writes `array` through, for a caller that reuses the array (OutputPool)."""
        return output_tensor(array)

    def __call__(self, x: np.ndarray, weights: list, out, threads: int | None = None) -> None:
        """Run on `threads` of this CPU's cores (None: default_threads()); `out`: the output array, or
        output_for(array)."""
        use_threads(threads)
        self.function(input_argument(x), *weights, out if isinstance(out, tvm_ffi.Tensor) else output_tensor(out))

    def call(self, *inputs: np.ndarray, out: np.ndarray) -> None:
        """Run a function whose every input is declared unaligned (the gradient kernels that are not
        convolutions): inputs read in place, on the calling thread's pool."""
        self.function(*map(input_argument, inputs), output_tensor(out))


class CudaKernel(Kernel):
    """A compiled CUDA function: weights kept on the GPU, input and output copied for each call, or a
    caller's GPU tensors used in place (`on_device`)."""

    device = "cuda"

    def weights(self, arrays) -> list:
        return [to_device(np.ascontiguousarray(a), self.device) for a in arrays]

    def output_for(self, array: np.ndarray) -> np.ndarray:
        return array  # the result is copied into it

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

BUNDLE_FORMAT = "tvmconv-bundle-2"
# A bundle's files have these names and no others, so a manifest can name nothing outside its folder.
BUNDLE_FILES = {"library": "kernels.so", "device_code": "kernels.fatbin", "weights": "weights.npz",
                "manifest": "manifest.json", "signature": "manifest.sig"}
HASHED_FILES = ("library", "device_code", "weights")  # the roles whose SHA-256 the manifest holds
_ELF_MACHINES = {"x86_64": 62, "aarch64": 183}
_FLOAT_DTYPES = ("float16", "float32", "float64")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def key_fingerprint(public_key) -> str:
    """The hex SHA-256 of an ed25519 public key's raw 32 bytes: how tvmconv names a signing key."""
    from cryptography.hazmat.primitives import serialization
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def load_public_keys(trusted_keys) -> list:
    """`trusted_keys` (a list of ed25519 public keys, each a path to a PEM file or PEM bytes) as key objects.
    cryptography is imported here, not with the module: a board that loads unsigned bundles does without it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    if not isinstance(trusted_keys, (list, tuple)):
        raise TypeError("`trusted_keys` must be a list of public keys, each a path to a PEM file or PEM bytes "
                        f"(tvmconv keygen writes one to KEYFILE.pub). Received: trusted_keys={trusted_keys!r:.80}")
    if not trusted_keys:
        raise ValueError("`trusted_keys` is empty: give at least one public key, or None to load bundles without "
                         "checking a signature")
    keys = []
    for i, item in enumerate(trusted_keys):
        if isinstance(item, (bytes, bytearray)):
            pem, source = bytes(item), f"trusted_keys[{i}]"
        elif isinstance(item, (str, os.PathLike)):
            source = f"trusted_keys[{i}] ({os.fspath(item)})"
            with open(item, "rb") as f:
                pem = f.read()
        else:
            raise TypeError(f"`trusted_keys[{i}]` must be a path to a PEM file or PEM bytes, got {type(item).__name__}")
        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError as err:
            raise ValueError(f"{source} is not a PEM public key: {err}") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ValueError(f"{source} is a {type(key).__name__}: tvmconv bundles are signed with ed25519 keys "
                             "(tvmconv keygen makes them)")
        keys.append(key)
    return keys


def _signer(manifest: bytes, signature: bytes | None, keys: list, path: str) -> str:
    """The fingerprint of the trusted key whose signature `signature` is, over the manifest's bytes."""
    from cryptography.exceptions import InvalidSignature
    if signature is None:
        raise ValueError(f"the bundle at {path} is not signed (it has no {BUNDLE_FILES['signature']}), and trusted "
                         "keys were given: refusing to load it")
    for key in keys:
        try:
            key.verify(signature, manifest)
            return key_fingerprint(key)
        except InvalidSignature:
            continue
    raise ValueError(f"the bundle at {path} is not signed by any of the trusted keys "
                     f"({', '.join(key_fingerprint(k)[:16] for k in keys)}): it was modified, or signed by another "
                     "key; refusing to load it")


def _read_bundle_file(folder: int, path: str, role: str) -> bytes | None:
    """A bundle file's bytes, read once (None when absent), from the open folder `folder`. Only a regular file is
    read: never through a symlink, never a FIFO or a device (which could block, or never end)."""
    file = os.path.join(path, BUNDLE_FILES[role])
    try:
        fd = os.open(BUNDLE_FILES[role], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ValueError(f"bundle file {file} is a symbolic link: a bundle holds regular files only; "
                             "refusing to load it") from None
        raise
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"bundle file {file} is not a regular file: refusing to load it")
        return f.read()


def _is_index(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


def _is_shape(value) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(_is_index(d, 1, 1 << 63) for d in value)


def _is_names(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _checked_manifest(data: bytes, where: str) -> dict:
    """The manifest's JSON with every field the runtime reads checked: a ValueError names the first bad one."""
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"damaged bundle manifest {where}: {err}") from None

    def field(entries, key: str, name: str, expected: str, valid):
        if not isinstance(entries, dict):
            parent = f"`{name.rpartition('.')[0]}`" if "." in name else "the manifest"
            raise ValueError(f"bundle manifest {where}: {parent} must be a JSON object, got {entries!r:.60}")
        if key not in entries:
            raise ValueError(f"bundle manifest {where}: `{name}` is missing (it must be {expected})")
        if not valid(entries[key]):
            raise ValueError(f"bundle manifest {where}: `{name}` must be {expected}, got {entries[key]!r:.80}")
        return entries[key]

    field(manifest, "format", "format", f"{BUNDLE_FORMAT!r} (the format this runtime reads)",
          lambda v: v == BUNDLE_FORMAT)
    field(manifest, "architecture", "architecture", "a CPU architecture such as 'x86_64'",
          lambda v: isinstance(v, str) and v)
    field(manifest, "isa_features", "isa_features", "a list of instruction-set names", _is_names)
    field(manifest, "target_key", "target_key", "a string", lambda v: isinstance(v, str))
    device = field(manifest, "device", "device", "'cpu' or 'cuda'", lambda v: v in ("cpu", "cuda"))
    field(manifest, "dtype", "dtype", f"one of {_FLOAT_DTYPES}", lambda v: v in _FLOAT_DTYPES)
    field(manifest, "data_format", "data_format", "'channels_last' or 'channels_first'",
          lambda v: v in ("channels_last", "channels_first"))
    input_shape = field(manifest, "input_shape", "input_shape", "4 positive integers", _is_shape)
    files = field(manifest, "files", "files", "an object of files by role", lambda v: isinstance(v, dict))
    needed = {"library", "weights"} | ({"device_code"} if device == "cuda" else set())
    for role in sorted(needed | set(files)):
        if role not in HASHED_FILES:
            raise ValueError(f"bundle manifest {where}: `files.{role}` is no file of a bundle (they are "
                             f"{', '.join(HASHED_FILES)})")
        field(files, role, f"files.{role}", "an object with the file's name and SHA-256", lambda v: True)
        field(files[role], "name", f"files.{role}.name", repr(BUNDLE_FILES[role]),
              lambda v, r=role: v == BUNDLE_FILES[r])
        field(files[role], "sha256", f"files.{role}.sha256", "64 hex digits",
              lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v))
    layers = field(manifest, "layers", "layers", "a non-empty list", lambda v: isinstance(v, list) and v)
    for i, layer in enumerate(layers):
        name = f"layers[{i}]"
        field(layer, "function", f"{name}.function", repr(f"layer_{i}"), lambda v, i=i: v == f"layer_{i}")
        reads = field(layer, "reads", f"{name}.reads", f"-1 (the input) or an earlier layer's index (0 to {i - 1})",
                      lambda v, i=i: _is_index(v, -1, i))
        source = input_shape if reads < 0 else layers[reads]["output_shape"]
        field(layer, "input_shape", f"{name}.input_shape", f"the shape it reads, {source}", lambda v, s=source: v == s)
        field(layer, "output_shape", f"{name}.output_shape", "4 positive integers", _is_shape)
        field(layer, "dtype", f"{name}.dtype", f"one of {_FLOAT_DTYPES}", lambda v: v in _FLOAT_DTYPES)
        field(layer, "weights", f"{name}.weights", "a list of 1 or 2 weight names",
              lambda v: _is_names(v) and 1 <= len(v) <= 2)
    outputs = field(manifest, "outputs", "outputs", f"a non-empty list of layer indices (0 to {len(layers) - 1})",
                    lambda v: isinstance(v, list) and v and all(_is_index(o, 0, len(layers)) for o in v))
    field(manifest, "single_output", "single_output", "a boolean, true only for one output",
          lambda v: isinstance(v, bool) and (not v or len(outputs) == 1))
    return manifest


def _check_library(data: bytes, architecture: str, file: str) -> None:
    """Refuse a library that dlopen would map beyond its end: a truncated library whose checksum matches kills
    the process with SIGBUS when a page past the end is touched. Required: a 64-bit little-endian ELF shared
    object for `architecture`, every segment within the file."""
    def refusal(why: str) -> ValueError:
        return ValueError(f"bundle file {file} is not a whole shared library for {architecture} ({why}); "
                          "refusing to load it")
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4:6] != b"\x02\x01":
        raise refusal("not a 64-bit little-endian ELF file")
    kind, machine = struct.unpack_from("<HH", data, 16)
    if kind != 3 or machine != _ELF_MACHINES.get(architecture):  # 3: ET_DYN
        raise refusal(f"ELF type {kind}, machine {machine}")
    (headers,), (size, count) = struct.unpack_from("<Q", data, 32), struct.unpack_from("<HH", data, 54)
    if size != 56 or headers + size * count > len(data):
        raise refusal("its program headers lie beyond its end")
    for i in range(count):
        _, _, offset, _, _, length = struct.unpack_from("<IIQQQQ", data, headers + i * size)
        if offset + length > len(data):
            raise refusal(f"segment {i} ends at byte {offset + length} of {len(data)}: the file is truncated")


@contextlib.contextmanager
def _sealed_copies(contents: dict[str, bytes]):
    """{name: path} of sealed in-memory copies of `contents` (name -> bytes): what is loaded is the very bytes
    that were checked, and no other process can change or truncate them afterwards. (TVM picks a library's
    loader by its file name's suffix, so each path is a link named `name` to its copy.)"""
    folder = tempfile.mkdtemp(prefix="tvmconv-bundle-")
    descriptors = []
    try:
        paths = {}
        for name, data in contents.items():
            fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            descriptors.append(fd)
            with open(fd, "wb", closefd=False) as f:
                f.write(data)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
                        | fcntl.F_SEAL_SEAL)
            paths[name] = os.path.join(folder, name)
            os.symlink(f"/proc/self/fd/{fd}", paths[name])
        yield paths
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        for fd in descriptors:
            os.close(fd)


def _weights(data: bytes, file: str) -> np.lib.npyio.NpzFile:
    """The weights archive. np.savez stores its arrays uncompressed; a compressed member could inflate to any
    size, so it is refused."""
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"bundle file {file} is not a weights archive ({err})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile) or any(
            member.compress_type != zipfile.ZIP_STORED for member in archive.zip.infolist()):
        raise ValueError(f"bundle file {file} is not an uncompressed .npz archive, as tvmconv.export writes")
    return archive


class Predictor:
    """An exported bundle, loaded: `pred(x)` runs its layers. Compiles nothing; safe to call from many
    threads at once (each call has its own intermediate arrays; the weights are only read).

    `signature` is the fingerprint of the trusted key that signed the bundle (key_fingerprint), None when it
    was loaded without trusted keys."""

    def __init__(self, path, threads: int | None = None, trusted_keys=None):
        if threads is not None and not _is_index(threads, 1, 1 << 16):
            raise ValueError(f"`threads` must be a positive integer or None, got {threads!r}")
        self.threads = threads or default_threads()
        keys = None if trusted_keys is None else load_public_keys(trusted_keys)
        path = os.fspath(path)
        try:
            folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(f"{path} is not a tvmconv bundle: no such folder") from None
        try:
            manifest_bytes = _read_bundle_file(folder, path, "manifest")
            where = os.path.join(path, BUNDLE_FILES["manifest"])
            if manifest_bytes is None:
                raise FileNotFoundError(f"{path} is not a tvmconv bundle: {where} is missing")
            # Checked before the manifest is even parsed: with trusted keys, nothing unsigned is read.
            self.signature = None if keys is None else _signer(
                manifest_bytes, _read_bundle_file(folder, path, "signature"), keys, path)
            manifest = _checked_manifest(manifest_bytes, where)
            contents = {role: _read_bundle_file(folder, path, role) for role in manifest["files"]}
        finally:
            os.close(folder)
        for role, data in contents.items():
            file = os.path.join(path, BUNDLE_FILES[role])
            if data is None:
                raise FileNotFoundError(f"bundle file missing: {file}")
            if hashlib.sha256(data).hexdigest() != manifest["files"][role]["sha256"]:
                raise ValueError(f"bundle file {file} does not match its checksum in {where}: "
                                 "it was modified or damaged; refusing to load it")
        host = host_architecture()
        if manifest["architecture"] != host:
            raise ValueError(f"the bundle at {path} is compiled for {manifest['architecture']}, this machine is {host}")
        self._check_isa(manifest, path)
        self.device = manifest["device"]
        if self.device == "cuda" and not cuda_available():
            raise RuntimeError(f"the bundle at {path} runs on a CUDA GPU, and this machine has none that TVM's CUDA "
                               "runtime can use (it needs an NVIDIA driver and libcudart.so.13)")
        _check_library(contents["library"], host, os.path.join(path, BUNDLE_FILES["library"]))
        self.manifest = manifest
        self.path = path
        self.input_shape = tuple(manifest["input_shape"])
        self.dtype = np.dtype(manifest["dtype"])
        code = {BUNDLE_FILES[role]: contents[role] for role in ("library", "device_code") if role in contents}
        with _sealed_copies(code) as copies:
            module = load_module(copies[BUNDLE_FILES["library"]], copies.get(BUNDLE_FILES["device_code"]))
        self._layers = self._loaded_layers(module, _weights(contents["weights"], os.path.join(path, BUNDLE_FILES[
            "weights"])))
        self._outputs = manifest["outputs"]

    @staticmethod
    def _check_isa(manifest: dict, path: str) -> None:
        """Refuse a bundle whose code uses instructions this CPU lacks: it would die with 'Illegal instruction'."""
        available = cpu_flags()
        if not available:
            warnings.warn(f"tvmconv: this machine's /proc/cpuinfo lists no CPU features, so the instruction sets "
                          f"the bundle at {path} uses cannot be checked", RuntimeWarning)
            return
        missing = sorted(set(manifest["isa_features"]) - available)
        if missing:
            raise ValueError(f"the bundle at {path} is compiled for {manifest['target_key']}, whose instructions this "
                             f"CPU lacks ({', '.join(missing)}): running it would die with 'Illegal instruction'; "
                             "export it for this machine's target")

    def _loaded_layers(self, module, stored) -> list:
        layers = []
        with stored:
            for i, layer in enumerate(self.manifest["layers"]):
                try:
                    function = module[layer["function"]]
                except (AttributeError, RuntimeError):
                    raise ValueError(f"the bundle's library has no function {layer['function']!r} "
                                     f"(layers[{i}].function)") from None
                weights = []
                for name in layer["weights"]:
                    if name not in stored.files:
                        raise ValueError(f"the bundle's weights have no array {name!r} (layers[{i}].weights)")
                    try:
                        weights.append(to_device(np.ascontiguousarray(stored[name]), self.device))
                    except (ValueError, OSError, EOFError) as err:
                        raise ValueError(f"the bundle's weights array {name!r} is damaged ({err})") from None
                layers.append((function, layer["reads"], tuple(layer["output_shape"]), np.dtype(layer["dtype"]),
                               weights))
        return layers

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
                source = input_argument(host) if self.device == "cpu" else to_device(host, self.device)
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


# Bit i of the auxiliary vector's AT_HWCAP / AT_HWCAP2 on aarch64 Linux (asm/hwcap.h), named as /proc/cpuinfo names
# them. The kernel's hwcaps are what user-mode emulators (qemu-user) emulate; their /proc/cpuinfo is the host's.
_AARCH64_HWCAP = ("fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp", "asimdhp",
                  "cpuid", "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4", "asimddp", "sha512",
                  "sve", "asimdfhm", "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb", "paca", "pacg")
_AARCH64_HWCAP2 = ("dcpodp", "sve2", "sveaes", "svepmull", "svebitperm", "svesha3", "svesm4", "flagm2", "frint",
                   "svei8mm", "svef32mm", "svef64mm", "svebf16", "i8mm", "bf16", "dgh", "rng", "bti", "mte")
_AT_HWCAP, _AT_HWCAP2 = 16, 26


def _aarch64_hwcaps() -> set[str]:
    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return set()
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    flags = set()
    for entry, names in ((_AT_HWCAP, _AARCH64_HWCAP), (_AT_HWCAP2, _AARCH64_HWCAP2)):
        bits = getauxval(entry)
        flags.update(name for i, name in enumerate(names) if bits >> i & 1)
    return flags


def cpu_flags() -> set[str]:
    """The instruction-set extensions the OS reports, as /proc/cpuinfo names them: the kernel's hwcaps on
    aarch64, /proc/cpuinfo's "flags" on x86; empty where there are none."""
    arch = host_architecture()
    if arch == "aarch64":
        return _aarch64_hwcaps()
    key = "flags" if arch in ("x86_64", "i686", "i386") else "Features"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == key:
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load(path, threads: int | None = None, trusted_keys=None) -> Predictor:
    """Load an exported bundle (tvmconv.export) for inference with TVM's runtime only; its kernels run
    on `threads` threads (default: TVM_NUM_THREADS, else every CPU this process may use). With
    `trusted_keys` (ed25519 public keys, each a path to a PEM file or PEM bytes: tvmconv keygen), only a
    bundle signed by one of them loads; `Predictor.signature` then names that key."""
    return Predictor(path, threads, trusted_keys)
