"""tvmconv: a Keras-compatible Conv2D whose kernels TVM compiles from our own tensor-expression compute.

Names are imported on first use, so that `import tvmconv.runtime` (an inference service loading an
exported bundle) loads TVM's runtime and none of the compiler side.
"""
import importlib

__version__ = "0.1.0"
_ATTRIBUTES = {"Conv2D": "layer", "Model": "model", "Sequential": "model", "layer_conv_2d": "model",
               "layer_input": "model", "tune": "tuning", "export": "bundle", "from_keras": "keras_file"}
# Keras's helper modules, public under their Keras names (they live in tvmconv.keras).
_KERAS_MODULES = {"activations", "constraints", "initializers", "regularizers"}
_MODULES = {"targets", "runtime"}
__all__ = sorted([*_ATTRIBUTES, *_KERAS_MODULES, *_MODULES])


def __getattr__(name):
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(f".{_ATTRIBUTES[name]}", __name__), name)
    elif name in _KERAS_MODULES:
        value = importlib.import_module(f".keras.{name}", __name__)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'tvmconv' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *__all__])
