"""Keras 3's weight constraints, applied to a weight after each update (never in the forward pass)."""
import numpy as np

from . import serialization

EPSILON = 1e-7  # Keras's backend.epsilon(), added to norms in denominators


def _norms(w, axis):
    return np.sqrt(np.sum(np.square(w), axis=tuple(np.atleast_1d(axis)), keepdims=True))


def _axis_config(axis):
    return list(axis) if isinstance(axis, (list, tuple)) else axis


class Constraint(serialization.Serializable):
    pass


class MaxNorm(Constraint):
    def __init__(self, max_value=2, axis=0):
        self.max_value, self.axis = max_value, _axis_config(axis)

    def __call__(self, w):
        norms = _norms(w, self.axis)
        return (w * (np.clip(norms, 0, self.max_value) / (EPSILON + norms))).astype(w.dtype)


class MinMaxNorm(Constraint):
    def __init__(self, min_value=0.0, max_value=1.0, rate=1.0, axis=0):
        self.min_value, self.max_value, self.rate, self.axis = min_value, max_value, rate, _axis_config(axis)

    def __call__(self, w):
        norms = _norms(w, self.axis)
        desired = self.rate * np.clip(norms, self.min_value, self.max_value) + (1 - self.rate) * norms
        return (w * (desired / (EPSILON + norms))).astype(w.dtype)


class NonNeg(Constraint):
    def __call__(self, w):
        return (w * (w >= 0)).astype(w.dtype)


class UnitNorm(Constraint):
    def __init__(self, axis=0):
        self.axis = _axis_config(axis)

    def __call__(self, w):
        return (w / (EPSILON + _norms(w, self.axis))).astype(w.dtype)


max_norm, min_max_norm, non_neg, unit_norm = MaxNorm, MinMaxNorm, NonNeg, UnitNorm

NAMES = serialization.registry([MaxNorm, MinMaxNorm, NonNeg, UnitNorm])


def get(identifier, argument):
    return None if identifier is None else serialization.get(identifier, NAMES, "constraint", argument)


def serialize(obj):
    return serialization.serialize(obj, "keras.constraints")
