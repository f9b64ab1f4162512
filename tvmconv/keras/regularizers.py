"""Keras 3's weight regularizers: l1, l2, l1_l2, orthogonal_regularizer, with Keras's formulas."""
import numbers

import numpy as np

from . import serialization


def _non_negative(value, name):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not np.isfinite(value) or value < 0:
        raise ValueError(f"Invalid value for argument {name}: expected a non-negative float. Received: {name}={value!r}")
    return float(value)


class Regularizer(serialization.Serializable):
    """A penalty on a weight or an output: __call__ gives it, `gradient` its derivative (for training)."""


class L1(Regularizer):
    def __init__(self, l1=0.01):
        self.l1 = _non_negative(l1, "l1")

    def __call__(self, x):
        return self.l1 * np.sum(np.abs(np.asarray(x, np.float64)))

    def gradient(self, x):
        return self.l1 * np.sign(x)


class L2(Regularizer):
    def __init__(self, l2=0.01):
        self.l2 = _non_negative(l2, "l2")

    def __call__(self, x):
        return self.l2 * np.sum(np.square(np.asarray(x, np.float64)))  # no factor 1/2, as Keras

    def gradient(self, x):
        return 2 * self.l2 * np.asarray(x)


class L1L2(Regularizer):
    def __init__(self, l1=0.0, l2=0.0):
        self.l1, self.l2 = _non_negative(l1, "l1"), _non_negative(l2, "l2")

    def __call__(self, x):
        x = np.asarray(x, np.float64)
        return self.l1 * np.sum(np.abs(x)) + self.l2 * np.sum(np.square(x))

    def gradient(self, x):
        return self.l1 * np.sign(x) + 2 * self.l2 * np.asarray(x)


class OrthogonalRegularizer(Regularizer):
    def __init__(self, factor=0.01, mode="rows"):
        self.factor = _non_negative(factor, "factor")
        if mode not in ("rows", "columns"):
            raise ValueError(f'Invalid value for argument `mode`. Expected one of {{"rows", "columns"}}. Received: mode={mode!r}')
        self.mode = mode

    def _rows(self, x):
        """The rows (mode "rows") or columns of x as rows, their norms clamped as Keras's l2_normalize does,
        and the penalty's scale: factor/2 over the count of off-diagonal pairs."""
        x = np.asarray(x, np.float64)
        if x.ndim != 2:
            raise ValueError(f"Inputs to OrthogonalRegularizer must have rank 2. Received: inputs.shape={x.shape}")
        rows = x if self.mode == "rows" else x.T
        norms = np.maximum(np.sqrt(np.sum(np.square(rows), axis=1, keepdims=True)), 1e-12)
        size = rows.shape[0]
        return rows, norms, self.factor * 0.5 / (size * (size - 1.0) / 2.0)

    def __call__(self, x):
        rows, norms, scale = self._rows(x)
        unit = rows / norms
        product = unit @ unit.T
        return scale * np.abs(product * (1.0 - np.eye(len(product)))).sum()

    def gradient(self, x):
        # P = scale·Σ_{i≠j} |u_i·u_j| with u = rows / norms: dP/du = 2·S·u for S = scale·sign(u uᵀ) off the
        # diagonal; through the normalization, dP/dx_i = (g_i - (g_i·u_i)·u_i) / |x_i| (a clamped norm is
        # a constant: g_i / 1e-12).
        rows, norms, scale = self._rows(x)
        unit = rows / norms
        signs = np.sign(unit @ unit.T) * (1.0 - np.eye(len(unit)))
        g = 2 * scale * signs @ unit
        clamped = norms <= 1e-12
        grad = np.where(clamped, g, g - np.sum(g * unit, axis=1, keepdims=True) * unit) / norms
        grad = grad if self.mode == "rows" else grad.T
        return grad.astype(np.asarray(x).dtype)


l1, l2, l1_l2, orthogonal_regularizer = L1, L2, L1L2, OrthogonalRegularizer

NAMES = serialization.registry([L1, L2, L1L2, OrthogonalRegularizer])


def get(identifier, argument):
    return None if identifier is None else serialization.get(identifier, NAMES, "regularizer", argument)


def serialize(obj):
    return serialization.serialize(obj, "keras.regularizers")
