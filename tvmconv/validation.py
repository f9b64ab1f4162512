"""Argument standardization at the API edge, with Keras's wording: what was given, what is allowed."""
import math
import numbers

import numpy as np
from tvm import rpc

from . import keras_config


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
        value = keras_config.image_data_format()
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


def _address(value: str) -> bool:
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def remote(value, argument: str = "remote"):
    """None, "HOST:PORT" (an RPC server), {"tracker": "HOST:PORT", "key": KEY} or an RPC session."""
    if value is None or (isinstance(value, str) and _address(value)):
        return value
    if isinstance(value, dict) and set(value) == {"tracker", "key"} and isinstance(value["tracker"], str) \
            and _address(value["tracker"]) and isinstance(value["key"], str) and value["key"]:
        return dict(value)
    if isinstance(value, rpc.RPCSession):
        return value
    raise ValueError(f"The `{argument}` argument must be None, 'HOST:PORT' of a TVM RPC server, "
                     "{'tracker': 'HOST:PORT', 'key': KEY} for a device from an RPC tracker, or a "
                     f"tvm.rpc session. Received: {argument}={value!r}")
