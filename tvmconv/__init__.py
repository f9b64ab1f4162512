"""tvmconv: a Keras-compatible Conv2D whose kernels TVM compiles from our own tensor-expression compute."""
from . import activations, constraints, initializers, regularizers, targets
from .layer import Conv2D
from .model import Model, Sequential, layer_conv_2d, layer_input
from .tuning import tune

__version__ = "0.1.0"
__all__ = ["Conv2D", "Model", "Sequential", "layer_conv_2d", "layer_input", "activations", "constraints",
           "initializers", "regularizers", "targets", "tune"]
