"""Running compiled modules with TVM's runtime API only: loading, array hand-over, calls.

Nothing here compiles: an inference service loads and runs kernels with this module alone.
"""
import os
import threading

import math

import numpy as np
import tvm.runtime
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


def to_tensor(array: np.ndarray) -> tvm.runtime.Tensor:
    """A CPU tensor sharing memory with `array` (copied only when misaligned or strided)."""
    return tvm.runtime.from_dlpack(as_aligned(array))


def default_threads() -> int:
    """TVM_NUM_THREADS when set, else every CPU this process may run on.

    (TVM's own default halves the core count on x86, assuming hyper-threads: on the 2-core
    machines here that is one thread and half the speed.)"""
    value = os.environ.get("TVM_NUM_THREADS")
    return int(value) if value else len(os.sched_getaffinity(0))


_threads_lock = threading.Lock()
_threads_in_use = None


def use_threads(count: int) -> None:
    """Size TVM's process-wide thread pool; a no-op when it already has `count` threads."""
    global _threads_in_use
    if count == _threads_in_use:
        return
    with _threads_lock:
        # TVM caps the pool at TVM_NUM_THREADS whenever it is (re)configured.
        if int(os.environ.get("TVM_NUM_THREADS") or 0) < count:
            os.environ["TVM_NUM_THREADS"] = str(count)
        tvm.get_global_func("runtime.config_threadpool")(1, count)  # 1: every core, fastest first
        _threads_in_use = count


def input_tensor(array: np.ndarray) -> tvm.runtime.Tensor:
    """A CPU tensor sharing memory with a caller's array, copied only when not C-contiguous.
    (The kernels declare their input with element alignment: see compute.conv2d_forward.)"""
    return tvm_ffi.from_dlpack(np.ascontiguousarray(array), require_alignment=0)


def load_module(path: str):
    return tvm.runtime.load_module(path)


class Kernel:
    """One compiled function, called with numpy arrays or tensors: the input first (read in place at any
    alignment), then the weights and the output (64-byte aligned)."""

    def __init__(self, module, entry: str = "main"):
        self.module = module
        self.entry = entry
        self.function = module[entry]

    def __call__(self, x, *args):
        self.function(input_tensor(x) if isinstance(x, np.ndarray) else x,
                      *[to_tensor(a) if isinstance(a, np.ndarray) else a for a in args])
