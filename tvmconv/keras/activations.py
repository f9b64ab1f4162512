"""Keras 3's activation identifiers, resolved to a name our compute fuses, or a Python callable.

Named activations run inside the compiled kernel (`compute.ELEMENTWISE_ACTIVATIONS`) or as extra
blocks of it (`compute.LAST_AXIS_ACTIVATIONS`, along the output's last axis as Keras does).
A user's callable runs on the kernel's output array after the kernel.
"""
from ..compute import ELEMENTWISE_ACTIVATIONS, LAST_AXIS_ACTIVATIONS

ALIASES = {"swish": "silu", "hard_swish": "hard_silu"}
# Keras accepts the name "threshold", but the function needs two more arguments and fails when called.
UNCALLABLE = {"threshold"}
NAMES = set(ELEMENTWISE_ACTIVATIONS) | set(LAST_AXIS_ACTIVATIONS) | set(ALIASES) | UNCALLABLE


def get(identifier):
    """A canonical name (str) or a user callable; ValueError for anything else."""
    if identifier is None:
        return "linear"
    if isinstance(identifier, str):
        if identifier not in NAMES:
            raise ValueError(f"Could not interpret activation function identifier: {identifier!r} "
                             f"(argument `activation`). Allowed names: {', '.join(sorted(NAMES))}.")
        return ALIASES.get(identifier, identifier)
    if isinstance(identifier, dict) and "class_name" in identifier:  # Keras's serialized form of a function
        return get(identifier.get("config", identifier["class_name"]))
    if callable(identifier):
        # Keras's own activation functions are fused like their names; other callables run afterwards.
        name = getattr(identifier, "__name__", None)
        if str(getattr(identifier, "__module__", "")).startswith("keras") and name in NAMES:
            return ALIASES.get(name, name)
        return identifier
    raise ValueError(f"Could not interpret activation function identifier: {identifier!r} (argument `activation`).")


def serialize(activation):
    return activation if isinstance(activation, str) else getattr(activation, "__name__", repr(activation))
