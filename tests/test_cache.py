"""Compiled kernels are reused: in memory within a process, from disk across processes; damage is rebuilt. The
cache fails soft, never open: an unwritable cache compiles elsewhere, a cache others can write is refused, and
two processes compiling one kernel leave one good entry."""
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from kernel_check import check_kernel

import tvmconv
from tvmconv import build, records, targets, tuning
from tvmconv.compute import ConvWorkload

HOST = targets.resolve(None)
# Compiled by no other test: a kernel in this process's memory cache would not reach the disk cache's checks.
FRESH = ConvWorkload(1, 3, 4, 5, 7, (2, 3))

# Compiles `layers` layers (4, 5, ... filters) on one input; prints where each kernel came from, the first
# output's sum, the largest error against float64 numpy, the libraries, and the warnings.
SCRIPT = """
import json, sys, warnings, numpy as np, tvmconv
from tvmconv import reference
x = np.random.default_rng(0).standard_normal((1, 7, 7, 3)).astype("float32")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    layers = [tvmconv.Conv2D(filters, 3, padding="same", activation="relu",
                             kernel_initializer=tvmconv.initializers.HeNormal(seed=1))
              for filters in range(4, 4 + int(sys.argv[1]))]
    ys = [layer(x) for layer in layers]
compiled = [layer.compiled_kernel(x.shape) for layer in layers]
errors = [float(np.abs(y - np.maximum(reference.conv2d(x, layer.kernel, layer.bias, padding="same"), 0)).max())
          for layer, y in zip(layers, ys)]
print(json.dumps({"origin": compiled[0].origin, "origins": [kernel.origin for kernel in compiled],
                  "sum": float(ys[0].sum()), "error": max(errors),
                  "libraries": [kernel.library for kernel in compiled], "warnings": [str(w.message) for w in caught]}))
"""


def _run_in_new_process(cache_dir, layers: int = 1, prefix=(), check=True):
    env = dict(os.environ, TVMCONV_CACHE_DIR=str(cache_dir))
    # cwd away from the checkout, so the installed package is imported, not the source folder
    out = subprocess.run([*prefix, sys.executable, "-c", SCRIPT, str(layers)], env=env, capture_output=True,
                         text=True, check=check, cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1]) if check else out


def test_second_process_loads_from_disk(tmp_path):
    first = _run_in_new_process(tmp_path)
    second = _run_in_new_process(tmp_path)
    assert first["origin"] == "compiled" and second["origin"] == "disk cache"
    assert second["sum"] == first["sum"] and first["sum"] > 0 and first["error"] < 1e-4
    libraries = glob.glob(str(tmp_path / "kernels" / "*" / "*.so"))
    assert len(libraries) == 1
    assert os.path.basename(os.path.dirname(libraries[0])) == tvmconv.targets.target_key(tvmconv.targets.resolve(None))
    assert not glob.glob(str(tmp_path / "kernels" / "*" / ".tmp-*"))  # no temporary file left behind
    for folder in (tmp_path / "kernels", os.path.dirname(libraries[0])):  # made private
        assert os.stat(folder).st_mode & 0o777 == 0o700


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


def test_one_trace_on_two_layouts_is_two_kernels_and_each_record_is_reported_as_itself():
    """A template trace replays on the PrimFuncs of several weight blocks: the memory cache keys a record's
    kernel by its layout too, and a kernel found there reports the record asked for."""
    wl = ConvWorkload(1, 5, 6, 8, 32, (3, 3), padding="same")
    contexts = [c for c in tuning.tasks(wl, HOST, "template") if not records.workload_of(c.mod["main"])[1][1]]
    assert len(contexts) >= 2
    trace = contexts[0].generate_design_space()[0].trace
    compiled = []
    for folder, context in (("a", contexts[0]), ("b", contexts[1]), ("c", contexts[1])):
        tuned = records.Tuned(folder, *records.workload_of(context.mod["main"])[1], trace, 1.0, 1, None)
        compiled.append(check_kernel(wl, record=tuned))
        assert compiled[-1].tuning.folder == folder and compiled[-1].weight_block == tuned.weight_block
    assert [c.origin == "memory cache" for c in compiled] == [False, False, True]
    assert compiled[0].weight_block != compiled[1].weight_block


# ---------------------------------------------------------------- failing soft, never open


@pytest.fixture
def read_only(tmp_path):
    """A command prefix under which a folder is read-only (chmod for a user; for root, whom permissions do not
    stop, a read-only bind mount in a mount namespace of its own)."""
    changed = []

    def prefix(folder) -> list[str]:
        if os.geteuid() != 0:
            for root, dirs, files in os.walk(folder):
                for name in [root, *(os.path.join(root, f) for f in files)]:
                    changed.append(name)
                    os.chmod(name, os.stat(name).st_mode & ~0o222)
            return []
        mount = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
        if subprocess.run(["unshare", "-m", "sh", "-c", mount, str(tmp_path), "true"],
                          capture_output=True).returncode != 0:
            pytest.skip("as root, a read-only folder takes a read-only bind mount (unshare -m, mount): not allowed "
                        "here")
        return ["unshare", "-m", "sh", "-c", mount, str(folder)]
    yield prefix
    for name in changed:  # so that pytest can remove them
        os.chmod(name, os.stat(name).st_mode | 0o200)


def test_a_read_only_cache_compiles_elsewhere_and_warns_once(tmp_path, read_only):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    result = _run_in_new_process(cache, layers=2, prefix=read_only(cache))
    assert result["origin"] == "compiled" and result["error"] < 1e-4
    warned = [w for w in result["warnings"] if "cannot be written" in w]
    assert len(warned) == 1 and str(cache) in warned[0]
    assert all(not library.startswith(str(cache)) for library in result["libraries"])
    assert not any(os.path.exists(library) for library in result["libraries"])  # removed when the process ended


def test_a_read_only_cache_serves_its_entries_and_survives_a_damaged_one(tmp_path, read_only):
    cache = tmp_path / "cache"
    first = _run_in_new_process(cache, layers=2)
    damaged = first["libraries"][1]
    with open(damaged, "r+b") as f:  # under the read-only cache it cannot be removed
        f.truncate(os.path.getsize(damaged) // 2)
    again = _run_in_new_process(cache, layers=2, prefix=read_only(cache))
    assert again["origins"] == ["disk cache", "compiled"] and again["error"] < 1e-4
    assert again["libraries"][0] == first["libraries"][0] and not again["libraries"][1].startswith(str(cache))
    assert [w.split(" (")[0] for w in again["warnings"]] == [f"tvmconv: corrupt kernel cache entry {damaged}",
                                                             f"tvmconv: the kernel cache {cache} cannot be written"]


def test_a_cache_path_that_cannot_be_made_compiles_elsewhere(tmp_path):
    (tmp_path / "a-file").write_text("")
    result = _run_in_new_process(tmp_path / "a-file" / "cache", layers=2)
    assert result["origins"] == ["compiled", "compiled"] and result["error"] < 1e-4
    assert len([w for w in result["warnings"] if "cannot be written" in w]) == 1


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
def test_a_cache_others_can_write_is_refused(tmp_path, monkeypatch, mode):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(mode)
    monkeypatch.setenv("TVMCONV_CACHE_DIR", str(cache))
    with pytest.raises(PermissionError, match=f"the kernel cache folder {cache} is writable by .*chmod go-w {cache}"):
        build.get_kernel(FRESH, HOST)
    cache.chmod(0o700)
    (cache / "kernels").mkdir()
    (cache / "kernels").chmod(0o777)  # a folder below it, too
    with pytest.raises(PermissionError, match=f"{cache / 'kernels'} is writable by its group and all users "
                                              r"\(mode 777\)"):
        build.get_kernel(FRESH, HOST)


def test_a_cache_of_another_user_is_refused(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("giving a folder to another user takes root")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    os.chown(cache, 65534, 65534)
    monkeypatch.setenv("TVMCONV_CACHE_DIR", str(cache))
    with pytest.raises(PermissionError, match=f"the kernel cache folder {cache} belongs to user id 65534"):
        build.get_kernel(FRESH, HOST)


def test_two_processes_compiling_one_kernel_leave_one_good_entry(tmp_path):
    env = dict(os.environ, TVMCONV_CACHE_DIR=str(tmp_path / "cache"))
    racers = [subprocess.Popen([sys.executable, "-c", SCRIPT, "1"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path) for _ in range(2)]
    results = []
    for racer in racers:
        out, err = racer.communicate(timeout=300)
        assert racer.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    # One compiled it, the other waited for the folder's lock and loaded the entry.
    assert sorted(r["origin"] for r in results) == ["compiled", "disk cache"]
    assert not any(r["warnings"] for r in results) and results[0]["sum"] == results[1]["sum"]
    library = results[0]["libraries"][0]
    assert sorted(os.listdir(os.path.dirname(library))) == sorted(
        [records.LOCK_FILE, os.path.basename(library), os.path.basename(library)[:-3] + ".json"])
    with open(library[:-3] + ".json") as f:
        assert json.load(f)["sha256"] == tvmconv.runtime.file_sha256(library)
    assert results[0]["error"] < 1e-4
