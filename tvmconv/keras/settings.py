"""Keras's global defaults: keras.json's image_data_format and floatx, dtype policies, automatic names."""
import itertools
import json
import os
import threading

import numpy as np


def _keras_json() -> dict:
    # Keras looks under $KERAS_HOME, else ~/.keras; an absent or unreadable file means defaults.
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def image_data_format() -> str:
    return _keras_json().get("image_data_format", "channels_last")


def floatx() -> str:
    return _keras_json().get("floatx", "float32")


# ---------------------------------------------------------------- dtype policies and automatic names

SUPPORTED_DTYPES = ("float16", "float32", "float64")


def dtype_policy(dtype) -> tuple[str, str]:
    """(variable dtype, compute dtype) from a dtype, a dtype name, a Keras policy name, object or config;
    None means keras.json's floatx."""
    if dtype is None:
        dtype = floatx()
    if isinstance(dtype, dict):  # Keras's serialized DTypePolicy
        dtype = dtype.get("config", {}).get("name", dtype)
    name = getattr(dtype, "name", dtype)  # a Keras DTypePolicy or a numpy dtype
    if not isinstance(name, str):
        try:
            name = np.dtype(name).name
        except TypeError:
            name = repr(dtype)
    if name == "mixed_float16":
        return "float32", "float16"
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"Invalid `dtype` argument: {dtype!r}. tvmconv supports "
                         f"{', '.join(SUPPORTED_DTYPES)} and the policy 'mixed_float16'.")
    return name, name


_name_counters: dict[str, itertools.count] = {}
_name_lock = threading.Lock()


def unique_name(prefix: str) -> str:
    """Keras's automatic names: "conv2d", then "conv2d_1", "conv2d_2", ... per process."""
    with _name_lock:
        n = next(_name_counters.setdefault(prefix, itertools.count()))
    return prefix if n == 0 else f"{prefix}_{n}"
