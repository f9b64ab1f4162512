"""The arrays a Keras user holds, as numpy arrays: what layers and models take as inputs and weights."""
import numpy as np


def to_array(x) -> np.ndarray:
    """numpy arrays as they are; DLPack producers (torch, jax, ...) without a copy where possible."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (TypeError, RuntimeError, BufferError):
            pass
    return np.asarray(x)
