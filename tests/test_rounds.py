"""Tuning in rounds (tvmconv.rounds), with this CPU standing in for the GPU machine: rounds written here, timed
by `python -m tvmconv.timing` in processes that cannot import TVM's compiler (as on the GPU machine), ingested
into the log, resumed, their records applied by builds; the timer's checks; damaged files refused."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tvmconv import (
    build,
    cli,
    records,
    reference,
    rounds,
    runtime,
    schedules,
    targets,
    timing,
    tuning,
)
from tvmconv.compute import ConvWorkload

HOST = targets.resolve(None)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WL = ConvWorkload(1, 8, 8, 8, 16, (3, 3), padding="same", use_bias=True, activation="relu")


def time_without_tvm(directory, tmp_path, *args) -> subprocess.CompletedProcess:
    """`python -m tvmconv.timing DIRECTORY ARGS` in processes (the timer and its workers) for which TVM's Python
    package and tvmconv's compiler side cannot be imported, as on the GPU machine; each process writes the tvm
    modules it loaded to tmp_path/loaded-<pid>."""
    site = tmp_path / "no-tvm"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import atexit, importlib.abc, os, sys
        BLOCKED = ("tvm.", "tvmconv.compute", "tvmconv.schedules", "tvmconv.build", "tvmconv.tuning",
                   "tvmconv.rounds", "tvmconv.records", "tvmconv.layer", "tvmconv.engine", "tvmconv.keras")
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "tvm" or name.startswith(BLOCKED):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        atexit.register(lambda: open(os.path.join({str(tmp_path)!r}, f"loaded-{{os.getpid()}}"), "w").write(
            " ".join(sorted(m for m in sys.modules if m.split(".")[0] in ("tvm", "tvmconv")))))
    """))
    environment = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    return subprocess.run([sys.executable, "-m", "tvmconv.timing", str(directory), *args], capture_output=True,
                          text=True, timeout=600, env=environment)


def _loaded(tmp_path) -> set[str]:
    return {module for path in tmp_path.glob("loaded-*") for module in path.read_text().split()}


# ~3.5 minutes on 2 cores (a whole round built, timed and ingested): behind the marker, as the
# other end-to-end round checks are, to keep the default run near 15 minutes.
@pytest.mark.slow
def test_a_round_on_this_cpu_from_candidates_to_the_record_a_build_uses(tmp_path, rng):
    """Two trials in one round: written (candidates, their references), timed without TVM's compiler, ingested
    (records, the cost model beside them, summary.json); then no round is left, and a build applies the best
    record, checked against float64."""
    logs, directory = str(tmp_path / "logs"), str(tmp_path / "round")
    summary = rounds.write_round([(WL, 2)], HOST, directory, logs, size=2)
    spec = timing.read_round(directory)
    assert summary.round == 1 and summary.workloads == 1 and len(spec["candidates"]) == 2
    references = {k["id"] for k in spec["kernels"] if k["reference"] is None}
    assert spec["defaults"]["0"] in references
    assert all(k["reference"] in references for k in spec["kernels"] if k["id"] not in references)

    timed = time_without_tvm(directory, tmp_path)
    assert timed.returncode == 0, timed.stderr
    assert _loaded(tmp_path) == {"tvmconv", "tvmconv.runtime"}  # tvmconv.timing runs as __main__
    results = json.loads((tmp_path / "round" / timing.RESULTS_FILE).read_text())
    assert results["complete"] and results["device"]["kind"] == "cpu"
    assert all(len(r["seconds"]) == timing.REPEATS and min(r["seconds"]) > 0 for r in results["kernels"].values())
    candidate_means = sorted(np.mean(results["kernels"][c["kernel"]]["seconds"]) for c in spec["candidates"])

    # A forged round (a trace of another workload, a target that is not its key's) commits nothing.
    round_file = tmp_path / "round" / timing.ROUND_FILE
    good = round_file.read_text()
    other = {**spec, "candidates": [{**spec["candidates"][0], "workload": 0,
                                     "trace": [[["GetBlock", [], ["no_such_block", "main"], ["b0"]]], []]}]}
    for forged, message in ((other, "does not replay"),
                            ({**spec, "target": {"kind": "llvm", "mcpu": "cortex-a72",
                                                 "mtriple": "aarch64-linux-gnu"}}, "not a round's"),
                            ({**spec, "plan": [{"fields": {"filters": "many"}, "trials": 2}]}, "damaged round file"),
                            ({**spec, "candidates": [{**spec["candidates"][0], "workload": 5}]}, "not a round's"),
                            ({**spec, "candidates": [{**spec["candidates"][0], "flat_tile": -1}]}, "not a round's"),
                            # A layout that is not the trace's: the flat tile names another PrimFunc.
                            ({**spec, "candidates": [{**spec["candidates"][0], "flat_tile": 3}]}, "does not replay")):
        round_file.write_text(json.dumps(forged))
        with pytest.raises(ValueError, match=message):
            rounds.ingest(directory, logs)
        assert not records.Log(records.folder(logs, HOST)).get_all_tuning_records()
    round_file.write_text(good)

    (ingested,), following = rounds.ingest(directory, logs)
    folder = records.folder(logs, HOST)
    assert following is None and not os.path.exists(os.path.join(directory, timing.ROUND_FILE))
    assert (ingested.trials, ingested.budget, ingested.measured, ingested.errors) == (2, 2, 2, 0)
    assert ingested.gflops > 0 and ingested.default_gflops > 0
    assert os.path.exists(os.path.join(folder, rounds.COST_MODEL_FILE))
    noted = records.read_summary(folder)[WL.key]
    assert (noted["trials"], noted["retimed_gflops"], noted["default_gflops"]) == (2, ingested.gflops,
                                                                                 ingested.default_gflops)
    times = [records.seconds(r) for r in records.Log(folder).get_all_tuning_records()]
    np.testing.assert_allclose(sorted(times), candidate_means, rtol=1e-12)  # the round's times, as timed there
    # What the saved model was trained on (a group of costs per task): those times.
    trained = sorted(cost for group in rounds._cost_model(folder).data.values() for cost in group.costs)
    np.testing.assert_allclose(trained, sorted(np.median(results["kernels"][c["kernel"]]["seconds"])
                                               for c in spec["candidates"]), rtol=1e-6)
    tuned = records.best(WL, HOST, [logs], keep_slower=True)
    assert len(times) == 2 and tuned.trials == 2 and tuned.seconds == min(times)
    compiled = build.get_kernel(WL, HOST, record=tuned)
    assert compiled.schedule == "tuning record"
    x = rng.standard_normal(WL.input_shape).astype(np.float32)
    w = rng.standard_normal(WL.weights_shape).astype(np.float32)
    b = rng.standard_normal(WL.filters).astype(np.float32)
    y = runtime.aligned_empty(WL.output_shape, np.float32)
    compiled.kernel(x, compiled.kernel.weights([compiled.pack(w), b]), y)
    np.testing.assert_allclose(y, np.maximum(reference.conv2d(x, w, b, padding="same"), 0), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_rounds_resume_without_measuring_a_candidate_twice(tmp_path):
    """Three trials in rounds of two, through the command line as across sessions: round 2 proposes one
    candidate, none measured in round 1, with the cost model round 1 trained; a round is ingested once."""
    logs, directory = str(tmp_path / "logs"), str(tmp_path / "round")
    assert cli.main(["tune", "8x8x8:16:3x3:padding=same:activation=relu:use_bias=true", "--trials", "3",
                     "--round-size", "2", "--runner", f"batch:{directory}", "--log-dir", logs]) == 0
    first = {json.dumps(c["trace"]) for c in timing.read_round(directory)["candidates"]}
    assert len(first) == 2
    assert time_without_tvm(directory, tmp_path).returncode == 0
    assert cli.main(["tune", "--ingest", directory, "--log-dir", logs]) == 0
    spec = timing.read_round(directory)
    assert spec["round"] == 2 and len(spec["candidates"]) == 1
    assert not first & {json.dumps(c["trace"]) for c in spec["candidates"]}
    with pytest.raises(FileNotFoundError, match="was not timed"):
        rounds.ingest(directory, logs)
    assert time_without_tvm(directory, tmp_path).returncode == 0
    (ingested,), following = rounds.ingest(directory, logs)
    assert following is None and ingested.trials == 3 and ingested.measured == 1


def _arguments(compiled) -> list[dict]:
    return [{"shape": [int(d) for d in b.shape], "dtype": str(b.dtype)}
            for b in compiled.workload.prim_func(*compiled.layout).params]


def _round_of(kernels: dict, directory) -> str:
    """A round folder of hand-made kernels: name -> (library, reference name or None, arguments)."""
    os.makedirs(directory / timing.KERNELS)
    entries = []
    for name, (library, reference_name, arguments) in kernels.items():
        shutil.copy(library, directory / timing.KERNELS / f"{name}.so")
        entries.append({"id": name, "library": f"{name}.so", "device_code": None, "arguments": arguments,
                        "seed": 7, "reference": reference_name, "tolerance": 1e-4})
    (directory / timing.ROUND_FILE).write_text(json.dumps({"format": timing.ROUND_FORMAT, "token": "t",
                                                           "kernels": entries}))
    return str(directory)


def test_the_timer_checks_outputs_and_outlives_a_crash(tmp_path):
    """A candidate whose output differs from its reference's, and one whose library kills the process that
    loads it, are failures with their reason; the others are timed, by a new worker after the crash."""
    default = build.get_kernel(WL, HOST, record=False)
    other = build.get_kernel(ConvWorkload(1, 8, 8, 8, 16, (3, 3), padding="same", use_bias=True), HOST,
                             knobs=default.knobs)  # no relu: another output for the same arguments
    arguments = _arguments(default)
    crash_source = tmp_path / "crash.c"
    crash_source.write_text("#include <stdlib.h>\n__attribute__((constructor)) static void die(void) { abort(); }\n")
    subprocess.run(["g++", "-shared", "-fPIC", "-x", "c", str(crash_source), "-o", str(tmp_path / "crash.so")],
                   check=True)
    directory = _round_of({"ref": (default.library, None, arguments), "same": (default.library, "ref", arguments),
                           "wrong": (other.library, "ref", arguments),
                           "crash": (str(tmp_path / "crash.so"), "ref", arguments),
                           "after": (default.library, "ref", arguments)}, tmp_path / "round")
    timed = time_without_tvm(directory, tmp_path)
    assert timed.returncode == 0, timed.stderr
    results = json.loads((tmp_path / "round" / timing.RESULTS_FILE).read_text())["kernels"]
    assert set(results) == {"ref", "same", "wrong", "crash", "after"}
    assert "seconds" in results["same"] and "seconds" in results["after"]
    assert "differs from its reference's" in results["wrong"]["error"]
    assert "the process died running it" in results["crash"]["error"]
    assert _loaded(tmp_path) == {"tvmconv", "tvmconv.runtime"}  # tvmconv.timing runs as __main__


def test_the_time_limit_ends_a_round_and_untimed_kernels_have_no_result(tmp_path):
    compiled = build.get_kernel(WL, HOST, record=False)
    directory = _round_of({f"k{i}": (compiled.library, None, _arguments(compiled)) for i in range(3)},
                          tmp_path / "round")
    report = timing.time_round(directory, seconds=1e-6)
    assert not report["complete"] and len(report["kernels"]) < 3


def test_damaged_rounds_and_results_are_refused(tmp_path):
    library = build.get_kernel(WL, HOST, record=False).library
    arguments = [{"shape": [1, 8, 8, 8], "dtype": "float32"}, {"shape": [16], "dtype": "float32"}]
    directory = _round_of({"a": (library, None, arguments)}, tmp_path / "round")
    path = tmp_path / "round" / timing.ROUND_FILE
    good = json.loads(path.read_text())
    for damage, message in (
            ({"format": "other"}, "is not a round"),
            ({"kernels": [{**good["kernels"][0], "library": "../a.so"}]}, "bad kernel entry"),
            ({"kernels": [{**good["kernels"][0], "arguments": [{"shape": [-1], "dtype": "float32"}] * 2}]},
             "bad kernel entry"),
            ({"kernels": [{**good["kernels"][0], "reference": "nowhere"}]}, "bad kernel entry")):
        path.write_text(json.dumps({**good, **damage}))
        with pytest.raises(ValueError, match=f"{path}.*{message}|{message}.*"):
            timing.read_round(directory)
    path.write_text("{")
    with pytest.raises(ValueError, match=f"damaged round file {path}"):
        timing.read_round(directory)
    path.write_text(json.dumps(good))
    results = tmp_path / "round" / timing.RESULTS_FILE
    for report, message in (({"token": "other", "kernels": {}}, "another round"),
                            ({"token": "t", "kernels": {"b": {"seconds": [1.0]}}}, "not the round's"),
                            ({"token": "t", "kernels": {"a": {"seconds": [-1.0]}}}, "kernel a"),
                            ({"token": "t", "kernels": {"a": {"seconds": "fast"}}}, "kernel a"),
                            ({"token": "t", "kernels": {"a": {"seconds": [float("nan")]}}}, "kernel a"),
                            ({"token": "t", "kernels": {"a": {"seconds": []}}}, "kernel a"),
                            ({"token": "t", "kernels": {"a": 3}}, "kernel a"),
                            ({"token": "t", "kernels": ["a"]}, "not the round's")):
        results.write_text(json.dumps(report))
        with pytest.raises(ValueError, match=message):
            rounds.ingest(directory, str(tmp_path / "logs"))


def test_cli_round_arguments_are_checked(tmp_path, capsys):
    for argv, message in ((["tune", "6x6x4:8:3x3", "--runner", "gpu"], "--runner must be 'local' or 'batch:DIR'"),
                          (["tune", "6x6x4:8:3x3", "--round-size", "8"], "--round-size is the size of a round"),
                          (["tune", "6x6x4:8:3x3", "--runner", f"batch:{tmp_path}", "--rpc", "h:1"], "--rpc"),
                          (["tune", "--ingest", str(tmp_path), "6x6x4:8:3x3"], "--ingest DIR takes the round's"),
                          (["tune"], "tune needs workloads"),
                          (["tune", "--ingest", str(tmp_path)], "holds no round")):
        assert cli.main(argv) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_a_cuda_round_holds_libraries_and_fatbins(tmp_path, capsys):
    """`tvmconv tune ... --target cuda-sm_90 --runner batch:DIR`: tensor-core and SIMT candidates of a float16
    layer, each library with its fatbin, under the CUDA target's key."""
    directory = tmp_path / "round"
    assert cli.main(["tune", "14x14x32:48:3x3:padding=same:dtype=float16", "--target", "cuda-sm_90", "--trials",
                     "12", "--round-size", "12", "--runner", f"batch:{directory}", "--log-dir",
                     str(tmp_path / "logs")]) == 0
    assert "round 1 in" in capsys.readouterr().out
    spec = timing.read_round(str(directory))
    assert spec["target_key"].startswith("cuda-sm_90-") and spec["kernels"]
    for kernel in spec["kernels"]:
        with open(directory / timing.KERNELS / kernel["device_code"], "rb") as f:
            assert int.from_bytes(f.read(4), "little") == 0xBA55ED50
    assert any("Tensorize" in json.dumps(c["trace"]) for c in spec["candidates"])


def test_a_workload_s_first_round_holds_the_defaults_and_their_neighbours(tmp_path):
    """As `tune` does, a round for a workload with no records starts from the defaults' program and its
    neighbours (tuning.first_round), in the defaults' layout; the search's candidates fill the rest."""
    logs, directory = str(tmp_path / "logs"), str(tmp_path / "round")
    rounds.write_round([(WL, 64)], HOST, directory, logs, size=5)
    spec = timing.read_round(directory)
    _, nearby = tuning.first_round(WL, HOST, tuning.tasks(WL, HOST, "template"), 3)
    assert len(nearby) == 3
    candidates = spec["candidates"]
    assert len(candidates) == 5 and not any("error" in c for c in candidates)
    assert [c["trace"] for c in candidates[:3]] == [rounds._trace_json(c.sch.trace) for c in nearby]
    defaults = build.layout(schedules.find_rule(HOST).default_knobs(WL, HOST))
    assert {tuple(c[name] for name in rounds.LAYOUT_FIELDS) for c in candidates[:3]} == {defaults}
    # The search's two are other programs.
    assert all(c["trace"] not in [n["trace"] for n in candidates[:3]] for c in candidates[3:])
