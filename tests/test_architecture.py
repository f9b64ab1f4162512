"""The package's layers (docs/architecture.md): imports flow one way, from the API down to the runtime.

Read from the source with `ast`, every import (module level or inside a function) counts."""
import ast
import pathlib

import pytest

import tvmconv

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Bottom first, as docs/architecture.md draws them. A module imports from its own tier or the tiers below.
TIERS = [
    ("runtime", {"runtime", "timing"}),
    ("targets and devices", {"targets", "rpc_devices"}),
    ("compute", {"compute", "backward", "graph", "networks", "reference"}),
    ("keras compatibility", {"keras"}),
    ("schedules", {"schedules"}),
    ("build", {"records", "lowering", "build"}),
    ("beside build", {"tuning", "rounds", "engine"}),
    ("layer API", {"layer", "training", "model"}),
    ("on top", {"bundle", "keras_file", "serving", "protocol", "batching", "cli"}),
]
PACKAGE_DATA = {"tuning_logs"}  # the shipped records: data, imported for its location
# The package's public names (its lazy __init__) by the module that defines them.
_PUBLIC = {**tvmconv._ATTRIBUTES, **{name: "keras" for name in tvmconv._KERAS_MODULES}}


def _module_files() -> dict[str, pathlib.Path]:
    files = {}
    for path in [*ROOT.glob("tvmconv/*.py"), *ROOT.glob("tvmconv/keras/*.py"), *ROOT.glob("schedules/*.py")]:
        parts = path.relative_to(ROOT).with_suffix("").parts
        parts = parts[1:] if parts[0] == "tvmconv" else parts
        files[".".join(p for p in parts if p != "__init__")] = path
    return files


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """The tvmconv modules `name` imports (as top-level names of the package: "build", "keras", ...)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = [*package[:len(package) - node.level + 1], *(node.module.split(".") if node.module else [])]
                base = base[1:] if name.startswith("schedules") and base[:1] == ["schedules"] else base
                targets = [base[0]] if base else [alias.name for alias in node.names]
            elif node.module and node.module.split(".")[0] == "tvmconv":
                rest = node.module.split(".")[1:]
                targets = rest[:1] or [_PUBLIC.get(alias.name, alias.name) for alias in node.names]
            else:
                continue
            found.update(targets)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("tvmconv.") and alias.name.count("."))
    if name.startswith("schedules"):
        found = {f for f in found if f not in ("arm", "cpu", "cuda", "tensor_cores", "x86")}  # its own modules
    return found - {""}


def _tier(top_level: str) -> int | None:
    return next((i for i, (_, members) in enumerate(TIERS) if top_level in members), None)


@pytest.mark.parametrize("name", sorted(_module_files()))
def test_imports_flow_down(name):
    path = _module_files()[name]
    if name == "":  # the package's lazy __init__: names resolve on first use
        return
    tier = _tier(name.split(".")[0])
    assert tier is not None, f"tvmconv.{name} is in no tier of docs/architecture.md"
    for imported in _imports(name, path) - PACKAGE_DATA - {"__version__"}:
        imported_tier = _tier(imported)
        assert imported_tier is not None, f"tvmconv.{name} imports tvmconv.{imported}, which is in no tier"
        assert imported_tier <= tier, (f"tvmconv.{name} ({TIERS[tier][0]}) imports tvmconv.{imported} "
                                       f"({TIERS[imported_tier][0]}), a tier above it")


def test_tuning_and_the_engine_stay_apart():
    """Beside build, not on each other: tuning (and its rounds) compiles and measures workloads, the engine runs
    a layer's."""
    files = _module_files()
    assert "engine" not in _imports("tuning", files["tuning"]) | _imports("rounds", files["rounds"])
    assert not {"tuning", "rounds"} & _imports("engine", files["engine"])


def test_the_runtime_imports_nothing_of_the_compiler():
    files = _module_files()
    for name in TIERS[0][1]:
        assert _imports(name, files[name]) <= TIERS[0][1], name
        assert "import tvm\n" not in files[name].read_text() and "from tvm " not in files[name].read_text()


def test_the_layer_hands_calls_to_the_engine():
    """Conv2D stays what Keras's base_conv is: a thin layer (the architecture issue's bound)."""
    source = (ROOT / "tvmconv" / "layer.py").read_text()
    (cls,) = [node for node in ast.parse(source).body if isinstance(node, ast.ClassDef) and node.name == "Conv2D"]
    assert cls.end_lineno - cls.lineno + 1 <= 250
