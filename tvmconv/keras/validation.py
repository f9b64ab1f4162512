"""Argument standardization at the API edge, with Keras's wording: what was given, what is allowed."""
import math
import numbers

import numpy as np

from . import settings


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(value, name: str) -> int:
    if not is_int(value):
        raise ValueError(f"Invalid value for argument `{name}`. Expected a strictly positive integer. "
                         f"Received {name}={value!r}.")
    if value <= 0:
        raise ValueError(f"Invalid value for argument `{name}`. Expected a strictly positive value. "
                         f"Received {name}={value}.")
    return int(value)


def standardize_tuple(value, name: str, n: int = 2) -> tuple:
    """An int (square) or a list/tuple of n positive ints, as Keras's `standardize_tuple`.

    Like Keras, a numpy integer scalar is not taken for an int here (Keras rejects it too)."""
    if isinstance(value, int) and not isinstance(value, bool):
        values = (value,) * n
    elif isinstance(value, (tuple, list)) and len(value) == n and all(is_int(v) for v in value):
        values = tuple(int(v) for v in value)
    else:
        raise ValueError(f"The `{name}` argument must be a tuple of {n} integers. Received {name}={value!r}")
    bad = {v for v in values if v <= 0}
    if bad:
        raise ValueError(f"The `{name}` argument must be a tuple of {n} integers. Received {name}={value!r}, "
                         f"including values {bad} that do not satisfy `value > 0`")
    return values


def standardize_padding(value) -> str:
    padding = value.lower() if isinstance(value, str) else value
    if padding not in ("valid", "same"):
        raise ValueError(f"The `padding` argument must be one of {{'valid', 'same'}}. Received: padding={value!r}")
    return padding


def standardize_data_format(value) -> str:
    if value is None:
        value = settings.image_data_format()
    data_format = value.lower() if isinstance(value, str) else value
    if data_format not in ("channels_first", "channels_last"):
        raise ValueError("The `data_format` argument must be one of {'channels_first', 'channels_last'}. "
                         f"Received: data_format={value!r}")
    return data_format


def positive_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Argument `{name}` must be a positive number. Received: {name}={value!r}")
    return float(value)


def finite_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"Argument `{name}` must be a finite number. Received: {name}={value!r}")
    return float(value)


def fraction(value, name: str) -> float:
    """A number in [0, 1): momentum and decay rates."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"Argument `{name}` must be a number in [0, 1). Received: {name}={value!r}")
    return float(value)


def as_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"The `{name}` argument must be a bool. Received: {name}={value!r}")
    return bool(value)


def _shape_tuple(value, name: str, length: int):
    """None, or a tuple of `length` positive ints or None."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != length or not all(
            v is None or (is_int(v) and v > 0) for v in value):
        raise ValueError(f"The `{name}` argument must be a tuple of {length} positive integers or None. "
                         f"Received: {name}={value!r}")
    return tuple(None if v is None else int(v) for v in value)


def batch_input_shape(input_shape, batch_input_shape, batch_size):
    """R's input declaration (`input_shape` without the batch axis, or `batch_input_shape` with it, and
    `batch_size`) as one shape with the batch axis (None: any size), or None when nothing is declared."""
    input_shape = _shape_tuple(input_shape, "input_shape", 3)
    declared = _shape_tuple(batch_input_shape, "batch_input_shape", 4)
    if batch_size is not None:
        batch_size = positive_int(batch_size, "batch_size")
    if declared is None and input_shape is not None:
        declared = (batch_size, *input_shape)
    return declared


def check_conv_input(shape: tuple, layer: str, channel_axis: int, channels: int | None, groups: int) -> None:
    """Keras's input checks of a convolution `layer` (its InputSpec's and base_conv's): a 4D shape with a
    known channel axis, `channels` of them once built, divisible into `groups`."""
    if len(shape) != 4:
        raise ValueError(f"Input 0 of layer '{layer}' is incompatible with the layer: expected ndim=4, "
                         f"found ndim={len(shape)}. Full shape received: {shape}")
    found = shape[channel_axis]
    if found is None:
        raise ValueError(f"The channel dimension of the inputs (axis {channel_axis}) should be defined. "
                         f"Received input shape {shape}")
    if channels is not None and found != channels:
        raise ValueError(f"Input 0 of layer '{layer}' is incompatible with the layer: expected axis "
                         f"{channel_axis} of input shape to have value {channels}, but received input with shape "
                         f"{shape}")
    if found % groups:
        raise ValueError("The number of input channels must be evenly divisible by the number of groups. "
                         f"Received groups={groups}, but the input has {found} channels (full input shape is "
                         f"{shape}).")


def weight_list(value, name: str):
    """A list or tuple of arrays, like get_weights() returns (None passes)."""
    if value is not None and not isinstance(value, (list, tuple)):
        raise TypeError(f"The `{name}` argument must be a list of arrays like get_weights(). "
                        f"Received: {name} of type {type(value).__name__}")
    return value
