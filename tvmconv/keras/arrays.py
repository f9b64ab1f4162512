"""The arrays a Keras user holds, as numpy arrays: what layers and models take as inputs and weights."""
import numpy as np

from ..runtime import GpuTensor


def to_array(x, gpu: bool = False) -> np.ndarray | GpuTensor:
    """numpy arrays as they are; DLPack producers (torch, jax, ...) without a copy where possible; with `gpu`
    (a layer whose kernels run on a CUDA GPU), a producer's tensor on the GPU as a GpuTensor, read in place."""
    if isinstance(x, np.ndarray):
        return x
    if gpu and GpuTensor.holds(x):
        return GpuTensor(x)
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (TypeError, RuntimeError, BufferError):
            pass
    return np.asarray(x)
