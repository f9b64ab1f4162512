"""Keras-style identifiers for initializers, regularizers and constraints: names, configs, objects."""
import inspect
import re


def snake_case(name: str) -> str:
    """Keras's rule for the lowercase alias of a class name ("GlorotUniform" → "glorot_uniform", "L1L2" → "l1l2")."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


class Serializable:
    """Objects whose constructor arguments are their config, as Keras's initializers and friends."""

    def get_config(self) -> dict:
        parameters = inspect.signature(type(self).__init__).parameters.values()
        return {p.name: getattr(self, p.name) for p in parameters
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def registry(classes, aliases=None) -> dict:
    """Names Keras accepts: each class name and its snake_case, plus explicit aliases."""
    names = {}
    for cls in classes:
        names[cls.__name__] = cls
        names[snake_case(cls.__name__)] = cls
    names.update(aliases or {})
    return names


def serialize(obj, module: str):
    if obj is None:
        return None
    if isinstance(obj, Serializable):
        return {"module": module, "class_name": type(obj).__name__, "config": obj.get_config(),
                "registered_name": None}
    return getattr(obj, "__name__", repr(obj))


def get(identifier, names: dict, kind: str, argument: str):
    """An object from a name, a {"class_name", "config"} dict, a class, or a callable; else a ValueError."""
    if isinstance(identifier, str):
        cls = names.get(identifier)
        if cls is None:
            raise ValueError(f"Could not interpret {kind} identifier: {identifier!r} (argument `{argument}`). "
                             f"Allowed names: {', '.join(sorted(n for n in names if n.islower()))}.")
        return cls()
    if isinstance(identifier, dict) and "class_name" in identifier:
        cls = names.get(identifier["class_name"])
        if cls is None:
            raise ValueError(f"Could not interpret {kind} identifier: {identifier!r} (argument `{argument}`).")
        return cls.from_config(identifier.get("config") or {})
    if inspect.isclass(identifier) and callable(identifier):
        return identifier()
    if callable(identifier):
        return identifier
    raise ValueError(f"Could not interpret {kind} identifier: {identifier!r} (argument `{argument}`): expected "
                     f"a name, a config dict, or a callable.")
