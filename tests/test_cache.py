"""Compiled kernels are reused: in memory within a process, from disk across processes; damage is rebuilt."""
import glob
import json
import os
import subprocess
import sys

import numpy as np

import tvmconv

SCRIPT = """
import json, warnings, numpy as np, tvmconv
layer = tvmconv.Conv2D(4, 3, padding="same", activation="relu", kernel_initializer=tvmconv.initializers.HeNormal(seed=1))
x = np.random.default_rng(0).standard_normal((1, 7, 7, 3)).astype("float32")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = layer(x)
print(json.dumps({"origin": layer.compiled_kernel(x.shape).origin, "sum": float(y.sum()),
                  "warnings": [str(w.message) for w in caught]}))
"""


def _run_in_new_process(cache_dir):
    env = dict(os.environ, TVMCONV_CACHE_DIR=str(cache_dir))
    # cwd away from the checkout, so the installed package is imported, not the source folder
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True,
                         cwd=cache_dir)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_loads_from_disk(tmp_path):
    first = _run_in_new_process(tmp_path)
    second = _run_in_new_process(tmp_path)
    assert first["origin"] == "compiled" and second["origin"] == "disk cache"
    assert second["sum"] == first["sum"] and first["sum"] > 0
    libraries = glob.glob(str(tmp_path / "kernels" / "*" / "*.so"))
    assert len(libraries) == 1
    assert os.path.basename(os.path.dirname(libraries[0])) == tvmconv.targets.target_key(tvmconv.targets.resolve(None))
    assert not glob.glob(str(tmp_path / "kernels" / "*" / ".tmp-*"))  # no temporary file left behind


def test_corrupt_entry_is_reported_and_rebuilt(tmp_path):
    first = _run_in_new_process(tmp_path)
    (library,) = glob.glob(str(tmp_path / "kernels" / "*" / "*.so"))
    with open(library, "r+b") as f:  # a half-written library
        f.truncate(os.path.getsize(library) // 2)
    rebuilt = _run_in_new_process(tmp_path)
    assert rebuilt["origin"] == "compiled" and rebuilt["sum"] == first["sum"]
    assert any("corrupt kernel cache entry" in w for w in rebuilt["warnings"])
    sidecar = library[:-3] + ".json"
    with open(sidecar, "w") as f:  # a damaged sidecar
        f.write("{")
    assert _run_in_new_process(tmp_path)["origin"] == "compiled"
    assert _run_in_new_process(tmp_path)["origin"] == "disk cache"
    with open(sidecar) as f:
        assert json.load(f)["workload"]["filters"] == 4


def test_same_workload_in_another_layer_comes_from_memory():
    x = np.ones((1, 5, 5, 2), np.float32)
    first, second = tvmconv.Conv2D(3, 3, name="cache_a"), tvmconv.Conv2D(3, 3, name="cache_b")
    first(x)
    second(x)
    assert second.compiled_kernel(x.shape).origin == "memory cache"
    assert second.compiled_kernel(x.shape).workload == first.compiled_kernel(x.shape).workload
