"""Timing compiled kernels with TVM's runtime alone (no compiler): its time evaluator.

Kept apart from tvmconv.runtime, which loads and calls kernels; like it, this needs only `tvm_ffi`
and libtvm_runtime.so, so a GPU machine without apache-tvm times kernels with it (scripts/gpu_check.py).
"""
import struct

import tvm_ffi

from . import runtime


def time_evaluator(module, entry: str, device: str, number: int, repeat: int, min_repeat_ms: int = 0):
    """TVM's time evaluator: a function that runs `entry` of `module` on its arguments `number` times per
    repeat, synchronizing `device` ("cpu" or "cuda") around each repeat, and returns the `repeat` mean
    times in seconds."""
    dev = tvm_ffi.device(device, 0)
    evaluate = runtime.global_function("runtime.RPCTimeEvaluator")(
        module, entry, dev.dlpack_device_type(), dev.index, number, repeat, min_repeat_ms,
        100, 0, 1, 0, "")  # limit_zero_time_iterations, cooldown ms, repeats_to_cooldown, cache flush, f_preproc
    return lambda *args: list(struct.unpack(f"@{repeat}d", evaluate(*args)))
