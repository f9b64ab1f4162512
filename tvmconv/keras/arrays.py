"""The arrays a Keras user holds, as numpy arrays: what layers and models take as inputs and weights.

numpy arrays, read-only ones included (np.load(mmap_mode="r"), np.frombuffer), are used as they are: the
kernels only read their inputs, and runtime.input_tensor hands read-only memory over too. DLPack producers
(torch, JAX, CuPy, ...) are read in place where they are in CPU memory (a CUDA layer's input also on its
GPU); anything else (`__array__`, lists) goes
through np.asarray, a copy where it must be one.
"""
import numpy as np

from ..runtime import GpuTensor

_DLPACK_CPU = 1  # DLPack's kDLCPU


def to_array(x, argument: str, gpu: bool = False) -> np.ndarray | GpuTensor:
    """`x` as a numpy array, sharing its memory where that can be done; with `gpu` (a layer whose kernels run
    on a CUDA GPU), a producer's tensor on the GPU as a GpuTensor, read in place. `argument` names it in
    errors."""
    if isinstance(x, np.ndarray):
        return x
    if getattr(x, "requires_grad", False) and callable(getattr(x, "detach", None)):
        x = x.detach()  # torch exports no tensor that autograd records, and the values are the same
    if gpu and GpuTensor.holds(x):
        return GpuTensor(x)
    if hasattr(x, "__dlpack__"):
        device = tuple(x.__dlpack_device__()) if hasattr(x, "__dlpack_device__") else (_DLPACK_CPU, 0)
        if device[0] != _DLPACK_CPU:
            where = getattr(x, "device", f"DLPack device {device}")
            raise ValueError(f"{argument} is a {type(x).__name__} on {where}, and tvmconv reads arrays in CPU memory: "
                             "move it there first (torch: x.cpu(); JAX: jax.device_put(x, jax.devices('cpu')[0]))")
        try:
            return np.from_dlpack(x)
        except (TypeError, RuntimeError, BufferError):
            pass  # e.g. a dtype DLPack cannot hand to numpy (bfloat16): np.asarray converts it below
    return np.asarray(x)


def check_gpu_input(x: GpuTensor, layer: str, compute_dtype: str, host_side_work: bool) -> None:
    """A tensor on the GPU is read in place by the kernel alone: nothing casts it, nothing runs on it on the host
    (`host_side_work`: the layer has a callable activation or an activity regularizer)."""
    if host_side_work:
        raise TypeError(f"Layer '{layer}' applies its callable activation or activity regularizer to numpy "
                        "arrays: pass the input as a numpy array, not as a tensor on the GPU")
    if x.dtype != np.dtype(compute_dtype):
        raise TypeError(f"Layer '{layer}' reads a tensor on the GPU in place, so it must have the layer's "
                        f"compute dtype {compute_dtype}. Received dtype={x.dtype}")


def gradient_arrays(output_gradient, output, output_shape: tuple, input_shape: tuple) -> tuple:
    """Conv2D.gradients' `output_gradient` (dL/dy) and optional `output` (y) as arrays of the layer's output
    shape for this input."""
    dy = to_array(output_gradient, "`output_gradient`")
    if dy.shape != output_shape:
        raise ValueError(f"`output_gradient` must have the layer's output shape {output_shape} for an "
                         f"input of shape {input_shape}. Received shape {dy.shape}")
    if output is not None:
        output = to_array(output, "`output`")
        if output.dtype.kind not in "biuf" or output.shape != dy.shape:
            raise ValueError(f"`output` must be the layer's output for these inputs: a real array of shape "
                             f"{dy.shape}. Received shape {output.shape}, dtype={output.dtype}")
    return dy, output
