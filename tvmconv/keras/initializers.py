"""Keras 3's initializers: names, formulas, fans and seeds (numpy's generator stands in for Keras's RNG).

An int seed gives the same values on every call, as in Keras 3; seed=None draws fresh values.
"""
import numbers

import numpy as np

from . import serialization

_TRUNCATED_STDDEV_CORRECTION = 0.87962566103423978  # stddev of a unit normal truncated at ±2
_unseeded = np.random.default_rng()


def compute_fans(shape, input_axes=None, output_axes=None) -> tuple[float, float]:
    """Keras's fans: for a conv kernel (kh, kw, cin_g, filters), fan_in = kh*kw*cin_g, fan_out = kh*kw*filters,
    unless both `input_axes` and `output_axes` name the axes to multiply."""
    shape = tuple(shape)
    if input_axes is not None and output_axes is not None:
        return int(np.prod([shape[a] for a in input_axes])), int(np.prod([shape[a] for a in output_axes]))
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive_field = int(np.prod(shape[:-2]))
    return shape[-2] * receptive_field, shape[-1] * receptive_field


class Initializer(serialization.Serializable):
    seed = None

    def _rng(self):
        return np.random.default_rng(self.seed) if self.seed is not None else _unseeded

    def __call__(self, shape, dtype="float32"):
        return np.asarray(self.sample(tuple(shape)), dtype=dtype)


def _check_seed(seed):
    if seed is not None and not isinstance(seed, numbers.Integral):
        raise ValueError(f"Argument `seed` must be an integer or None. Received: seed={seed!r}")
    return seed


def _truncated_normal(rng, shape, mean, stddev):
    """N(mean, stddev) with every value within 2 stddev, by redrawing the ones outside."""
    values = rng.standard_normal(shape)
    outside = np.abs(values) > 2
    while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(values) > 2
    return mean + stddev * values


class Zeros(Initializer):
    def sample(self, shape):
        return np.zeros(shape)


class Ones(Initializer):
    def sample(self, shape):
        return np.ones(shape)


class Constant(Initializer):
    def __init__(self, value=0.0):
        self.value = value

    def sample(self, shape):
        return np.broadcast_to(np.asarray(self.value, dtype=np.float64), shape).copy()


class RandomNormal(Initializer):
    def __init__(self, mean=0.0, stddev=0.05, seed=None):
        self.mean, self.stddev, self.seed = mean, stddev, _check_seed(seed)

    def sample(self, shape):
        return self._rng().normal(self.mean, self.stddev, shape)


class RandomUniform(Initializer):
    def __init__(self, minval=-0.05, maxval=0.05, seed=None):
        self.minval, self.maxval, self.seed = minval, maxval, _check_seed(seed)

    def sample(self, shape):
        return self._rng().uniform(self.minval, self.maxval, shape)


class TruncatedNormal(Initializer):
    def __init__(self, mean=0.0, stddev=0.05, seed=None):
        self.mean, self.stddev, self.seed = mean, stddev, _check_seed(seed)

    def sample(self, shape):
        return _truncated_normal(self._rng(), shape, self.mean, self.stddev)


class VarianceScaling(Initializer):
    _MODES = ("fan_in", "fan_out", "fan_avg")
    _DISTRIBUTIONS = ("truncated_normal", "untruncated_normal", "uniform")

    def __init__(self, scale=1.0, mode="fan_in", distribution="truncated_normal", seed=None, input_axes=None,
                 output_axes=None):
        if not isinstance(scale, numbers.Real) or scale <= 0:
            raise ValueError(f"Argument `scale` must be positive float. Received: scale={scale!r}")
        if mode not in self._MODES:
            raise ValueError(f"Invalid `mode` argument: {mode!r}. Allowed: {', '.join(self._MODES)}")
        distribution = distribution.lower() if isinstance(distribution, str) else distribution
        if distribution not in self._DISTRIBUTIONS:
            raise ValueError(f"Invalid `distribution` argument: {distribution!r}. "
                             f"Allowed: {', '.join(self._DISTRIBUTIONS)}")
        self.scale, self.mode, self.distribution, self.seed = scale, mode, distribution, _check_seed(seed)
        self.input_axes, self.output_axes = input_axes, output_axes

    def sample(self, shape):
        fan_in, fan_out = compute_fans(shape, self.input_axes, self.output_axes)
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[self.mode]
        variance = self.scale / max(1.0, n)
        if self.distribution == "truncated_normal":
            return _truncated_normal(self._rng(), shape, 0.0, np.sqrt(variance) / _TRUNCATED_STDDEV_CORRECTION)
        if self.distribution == "untruncated_normal":
            return self._rng().normal(0.0, np.sqrt(variance), shape)
        limit = np.sqrt(3.0 * variance)
        return self._rng().uniform(-limit, limit, shape)


def _preset(name, scale, mode, distribution):
    """The named VarianceScaling presets (Glorot, He, LeCun): scale, mode and distribution are fixed."""

    def __init__(self, seed=None, input_axes=None, output_axes=None):
        VarianceScaling.__init__(self, scale, mode, distribution, seed, input_axes, output_axes)

    def get_config(self):
        return {"seed": self.seed, "input_axes": self.input_axes, "output_axes": self.output_axes}

    return type(name, (VarianceScaling,), {"__init__": __init__, "get_config": get_config})


GlorotUniform = _preset("GlorotUniform", 1.0, "fan_avg", "uniform")
GlorotNormal = _preset("GlorotNormal", 1.0, "fan_avg", "truncated_normal")
HeUniform = _preset("HeUniform", 2.0, "fan_in", "uniform")
HeNormal = _preset("HeNormal", 2.0, "fan_in", "truncated_normal")
LecunUniform = _preset("LecunUniform", 1.0, "fan_in", "uniform")
LecunNormal = _preset("LecunNormal", 1.0, "fan_in", "truncated_normal")


class Orthogonal(Initializer):
    def __init__(self, gain=1.0, seed=None):
        self.gain, self.seed = gain, _check_seed(seed)

    def sample(self, shape):
        if len(shape) < 2:
            raise ValueError(f"The tensor to initialize must be at least two-dimensional. Received: shape={shape}")
        rows, cols = int(np.prod(shape[:-1])), shape[-1]
        q, r = np.linalg.qr(self._rng().standard_normal((max(rows, cols), min(rows, cols))))
        q *= np.sign(np.diag(r))
        if rows < cols:
            q = q.T
        return self.gain * q.reshape(shape)


class Identity(Initializer):
    def __init__(self, gain=1.0):
        self.gain = gain

    def sample(self, shape):
        if len(shape) != 2:
            raise ValueError("Identity matrix initializer can only be used for 2D matrices. "
                             f"Received: shape={shape} of rank {len(shape)}.")
        return self.gain * np.eye(*shape)


class STFT(Initializer):
    """Keras's STFT initializer is for 3-D Conv1D kernels; a Conv2D kernel is 4-D, where Keras fails too."""

    def __init__(self, side="real", window="hann", scaling="density", periodic=False):
        self.side, self.window, self.scaling, self.periodic = side, window, scaling, periodic

    def sample(self, shape):
        raise ValueError(f"The STFT initializer only initializes 3-D kernels. Received: shape={shape}")


# Keras's function-style aliases.
zeros, ones, constant = Zeros, Ones, Constant
random_normal, random_uniform, truncated_normal = RandomNormal, RandomUniform, TruncatedNormal
variance_scaling, orthogonal, identity = VarianceScaling, Orthogonal, Identity
glorot_uniform, glorot_normal, he_uniform, he_normal = GlorotUniform, GlorotNormal, HeUniform, HeNormal
lecun_uniform, lecun_normal = LecunUniform, LecunNormal

NAMES = serialization.registry(
    [Zeros, Ones, Constant, RandomNormal, RandomUniform, TruncatedNormal, VarianceScaling, GlorotUniform,
     GlorotNormal, HeUniform, HeNormal, LecunUniform, LecunNormal, Orthogonal, Identity, STFT],
    aliases={"zero": Zeros, "one": Ones, "normal": RandomNormal, "uniform": RandomUniform,
             "IdentityInitializer": Identity, "OrthogonalInitializer": Orthogonal, "STFTInitializer": STFT})


def get(identifier, argument="kernel_initializer"):
    if identifier in ("constant", "Constant"):  # Keras fails on the bare name too (it has no value)
        raise ValueError(f"The initializer {identifier!r} needs a value (argument `{argument}`): pass "
                         "tvmconv.initializers.Constant(value) instead of the bare name.")
    # Keras's add_weight falls back to glorot_uniform for a float weight given no initializer.
    return serialization.get("glorot_uniform" if identifier is None else identifier, NAMES, "initializer",
                             argument)


def serialize(obj):
    return serialization.serialize(obj, "keras.initializers")
