"""Saved Keras models (.keras, .h5) as tvmconv models: the layer API built from Keras's own file."""
import importlib.util
import os

from .layer import Conv2D
from .model import Sequential, layer_input


def from_keras(path: str) -> Sequential:
    """A saved Keras model of Conv2D layers in a chain, as a tvmconv Sequential with its weights. Needs Keras
    and one of its backends (tensorflow, jax or torch: the first installed, unless KERAS_BACKEND says)."""
    if "KERAS_BACKEND" not in os.environ:  # Keras defaults to TensorFlow; use whichever backend is installed
        installed = [name for name in ("tensorflow", "jax", "torch") if importlib.util.find_spec(name)]
        if installed:
            os.environ["KERAS_BACKEND"] = installed[0]
    try:
        import keras
    except ImportError as err:
        raise ValueError(f"reading {path} needs Keras and one of its backends (tensorflow, jax or torch): "
                         f"{err}") from None
    source = keras.models.load_model(path, compile=False)
    model = Sequential(name=source.name)
    model.add(layer_input(tuple(source.inputs[0].shape[1:])))
    for layer in source.layers:
        kind = type(layer).__name__
        if kind == "InputLayer":
            continue
        if kind != "Conv2D":
            raise ValueError(f"{path}: layer '{layer.name}' is a {kind}; tvmconv handles models of Conv2D layers")
        model.add(Conv2D(layer.filters, layer.kernel_size, strides=layer.strides, padding=layer.padding,
                         data_format=layer.data_format, dilation_rate=layer.dilation_rate, groups=layer.groups,
                         activation=layer.activation.__name__, use_bias=layer.use_bias, name=layer.name))
        model.layers[-1].set_weights(layer.get_weights())
    if not model.layers:
        raise ValueError(f"{path} has no Conv2D layers")
    return model
