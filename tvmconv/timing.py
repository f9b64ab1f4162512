"""Timing compiled kernels with TVM's runtime alone (no compiler): its time evaluator, and rounds of tuning
candidates.

Kept apart from tvmconv.runtime, which loads and calls kernels; like it, this needs only `tvm_ffi`
and libtvm_runtime.so, so a GPU machine without apache-tvm times kernels with it (scripts/gpu_check.py,
and the rounds of tvmconv.rounds: `python -m tvmconv.timing ROUND_DIR`, which scripts/gpu_device.sh runs).

A round (written by tvmconv.rounds) is a folder holding ROUND_FILE and the kernels it names. Timing it
writes RESULTS_FILE beside them: per kernel, the seconds of each repeat, or why it has none (it failed
to load or run, or its output differs from its reference's). Kernels run in a worker process; one that
kills it (a crash, or a CUDA error that poisons the process's context) is reported as failed, and a new
worker goes on with the next. The round stops at its time limit: kernels not timed by then have no
result, and tuning proposes them again later.
"""
import argparse
import json
import math
import os
import platform
import struct
import subprocess
import sys
import time

import numpy as np
import tvm_ffi

from . import runtime

ROUND_FILE = "round.json"
RESULTS_FILE = "results.json"
ROUND_FORMAT = "tvmconv-round-2"
KERNELS = "kernels"  # the round's folder of libraries (and fatbins), which ROUND_FILE names
# Each kernel: REPEATS repeats of at least MIN_REPEAT_MS (TVM's evaluator raises the calls per repeat to
# get there), after one checked call. On a GPU a ResNet-50 layer at batch 1 takes 5-150 µs: a kernel then
# costs about REPEATS x MIN_REPEAT_MS plus its load, ~0.05 s, and ROUND_SECONDS bounds the whole round.
REPEATS = 3
MIN_REPEAT_MS = 10
ROUND_SECONDS = 150
_PARTIAL = "results.partial.jsonl"  # one line per kernel, written as the workers go
_CURRENT = "current"                # the kernel a worker is running


def time_evaluator(module, entry: str, device: str, number: int, repeat: int, min_repeat_ms: int = 0):
    """TVM's time evaluator: a function that runs `entry` of `module` on its arguments `number` times per
    repeat, synchronizing `device` ("cpu" or "cuda") around each repeat, and returns the `repeat` mean
    times in seconds."""
    dev = tvm_ffi.device(device, 0)
    evaluate = runtime.global_function("runtime.RPCTimeEvaluator")(
        module, entry, dev.dlpack_device_type(), dev.index, number, repeat, min_repeat_ms,
        100, 0, 1, 0, "")  # limit_zero_time_iterations, cooldown ms, repeats_to_cooldown, cache flush, f_preproc
    return lambda *args: list(struct.unpack(f"@{repeat}d", evaluate(*args)))


# ---------------------------------------------------------------- rounds


def read_round(directory: str) -> dict:
    """The round in `directory`, its kernel entries checked (the folder travels between machines: nothing in
    it is trusted); ValueError naming the file otherwise."""
    path = os.path.join(directory, ROUND_FILE)
    try:
        with open(path) as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory} holds no round of candidates: {path} is missing") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"damaged round file {path}: {err.msg}") from None
    if not isinstance(spec, dict) or spec.get("format") != ROUND_FORMAT:
        raise ValueError(f"{path} is not a round of tvmconv candidates (format {ROUND_FORMAT})")
    kernels = spec.get("kernels")
    if not isinstance(kernels, list) or not isinstance(spec.get("token"), str):
        raise ValueError(f"damaged round file {path}: no kernel list or token")
    seen = set()
    for kernel in kernels:
        if not _valid_kernel(kernel, directory, seen):
            raise ValueError(f"damaged round file {path}: bad kernel entry {json.dumps(kernel)[:200]}")
        seen.add(kernel["id"])
    return spec


def _valid_kernel(kernel, directory: str, seen: set) -> bool:
    def file_inside(name):  # a file of the round, not a path out of it
        return (isinstance(name, str) and name == os.path.basename(name) and not name.startswith(".")
                and os.path.isfile(os.path.join(directory, KERNELS, name)))

    def argument(arg):
        return (isinstance(arg, dict) and isinstance(arg.get("shape"), list) and len(arg["shape"]) <= 8
                and all(type(d) is int and 0 < d < 2 ** 31 for d in arg["shape"])
                and math.prod(arg["shape"]) <= 2 ** 31 and arg.get("dtype") in ("float16", "float32", "float64"))

    return (isinstance(kernel, dict) and isinstance(kernel.get("id"), str) and kernel["id"] not in seen
            and file_inside(kernel.get("library"))
            and (kernel.get("device_code") is None or file_inside(kernel["device_code"]))
            and isinstance(kernel.get("arguments"), list) and len(kernel["arguments"]) >= 2
            and all(map(argument, kernel["arguments"]))
            and type(kernel.get("seed")) is int and 0 <= kernel["seed"] < 2 ** 32
            and (kernel.get("reference") is None or kernel["reference"] in seen)
            and isinstance(kernel.get("tolerance"), float) and 0 < kernel["tolerance"] < 1)


def time_round(directory: str, seconds: float = ROUND_SECONDS) -> dict:
    """Time the round in `directory` for at most `seconds` (kernels already timed by an earlier, interrupted
    call are kept) and write RESULTS_FILE there; returns its content."""
    spec = read_round(directory)
    partial = os.path.join(directory, _PARTIAL)
    current = os.path.join(directory, _CURRENT)
    start = time.monotonic()
    deadline = start + seconds
    while (left := deadline - time.monotonic()) > 0 and len(_results_so_far(partial)) < len(spec["kernels"]):
        if os.path.exists(current):
            os.remove(current)
        worker = subprocess.run([sys.executable, "-m", "tvmconv.timing", "--worker", directory, f"--seconds={left}"],
                                capture_output=True, text=True)
        if worker.returncode != 0:  # it died running a kernel: that kernel failed, the next worker goes on
            if not os.path.exists(current):
                raise RuntimeError(f"the timing worker failed before running any kernel:\n{worker.stderr[-2000:]}")
            with open(current) as f:
                kernel_id = f.read()
            reason = worker.stderr.strip().splitlines()[-1:] or [f"exit status {worker.returncode}"]
            _append(partial, {"id": kernel_id, "error": f"the process died running it: {reason[0][:300]}"})
    results = _results_so_far(partial)
    report = {"format": ROUND_FORMAT, "token": spec["token"], "device": _device_description(spec),
              "seconds_used": round(time.monotonic() - start, 3), "complete": len(results) == len(spec["kernels"]),
              "repeats": REPEATS, "min_repeat_ms": MIN_REPEAT_MS, "kernels": results}
    path = os.path.join(directory, RESULTS_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)
    for leftover in (partial, current):
        if os.path.exists(leftover):
            os.remove(leftover)
    return report


def _append(path: str, entry: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _results_so_far(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        entries = [json.loads(line) for line in f if line.endswith("\n")]
    return {entry.pop("id"): entry for entry in entries}


def _device_description(spec) -> dict:
    if any(k["device_code"] for k in spec["kernels"]):
        if not runtime.cuda_available():
            return {"kind": "cuda", "name": "none found"}
        attribute = runtime.global_function("runtime.GetDeviceAttr")
        return {"kind": "cuda", "name": str(attribute(runtime.CUDA, 0, 5)),  # 5: kDeviceName
                "compute_version": runtime.cuda_compute_version()}
    name = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return {"kind": "cpu", "name": name, "threads": runtime.default_threads()}


def _worker(directory: str, seconds: float) -> None:
    """Run and time the round's kernels that have no result yet, references first, until `seconds` pass."""
    deadline = time.monotonic() + seconds
    spec = read_round(directory)
    partial = os.path.join(directory, _PARTIAL)
    done = _results_so_far(partial)
    outputs: dict[str, np.ndarray] = {}  # the references' outputs, by kernel id
    runtime.use_threads(None)
    for kernel in spec["kernels"]:
        reference = kernel["reference"]
        if reference is not None and reference not in outputs and "error" not in done.get(reference, {"error": 1}):
            # Its reference was timed by an earlier worker: run it again for its output (if that fails now,
            # its candidates fail for want of a reference).
            try:
                outputs[reference] = _run(directory, next(k for k in spec["kernels"] if k["id"] == reference))[1]
            except Exception:  # noqa: BLE001
                pass
        if kernel["id"] in done:
            continue
        if time.monotonic() >= deadline:
            return
        with open(os.path.join(directory, _CURRENT), "w") as f:
            f.write(kernel["id"])
        try:
            timed, output = _run(directory, kernel, timed=True)
            entry = {"seconds": timed}
            if reference is not None:
                if reference not in outputs:
                    raise ValueError(f"its reference {reference} has no output")
                expected = outputs[reference]
                error = float(np.abs(output.astype(np.float64) - expected).max() / max(np.abs(expected).max(), 1e-30))
                if not error <= kernel["tolerance"]:  # NaN too
                    raise ValueError(f"its output differs from its reference's: relative error {error:.2e}")
            else:
                outputs[kernel["id"]] = output.astype(np.float64)
        except Exception as err:  # noqa: BLE001 - a failing kernel is a result, not the end of the round
            entry = {"error": f"{type(err).__name__}: {str(err).strip()[:300]}"}
        _append(partial, {"id": kernel["id"], **entry})


def _run(directory: str, kernel: dict, timed: bool = False) -> tuple[list[float] | None, np.ndarray]:
    """One checked call of the kernel on its seeded inputs (and its timing): (seconds per repeat, output)."""
    folder = os.path.join(directory, KERNELS)
    device_code = kernel["device_code"] and os.path.join(folder, kernel["device_code"])
    module = runtime.load_module(os.path.join(folder, kernel["library"]), device_code)
    device = "cuda" if device_code else "cpu"
    rng = np.random.default_rng(kernel["seed"])
    *inputs, output = kernel["arguments"]
    arguments = [runtime.to_device(rng.standard_normal(a["shape"]).astype(a["dtype"]), device) for a in inputs]
    out = runtime.device_empty(tuple(output["shape"]), output["dtype"], device)
    module["main"](*arguments, out)
    result = runtime.copy_to_host(out, runtime.aligned_empty(tuple(output["shape"]), output["dtype"])) \
        if device != "cpu" else np.from_dlpack(out).copy()
    seconds = time_evaluator(module, "main", device, 1, REPEATS, MIN_REPEAT_MS)(*arguments, out) if timed else None
    return seconds, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tvmconv.timing",
                                     description="Time a round of tuning candidates (tvmconv.rounds) on this "
                                                 "machine's GPU or CPU, with TVM's runtime alone.")
    parser.add_argument("directory", help="the round's folder (tvmconv tune ... --runner batch:DIR)")
    parser.add_argument("--seconds", type=float, default=ROUND_SECONDS,
                        help=f"stop after this long (default {ROUND_SECONDS}); untimed kernels have no result")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.seconds > 0:
        parser.error("--seconds must be positive")
    if args.worker:
        _worker(args.directory, args.seconds)
        return 0
    try:
        report = time_round(args.directory, args.seconds)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"timing: {err}", file=sys.stderr)
        return 2
    failed = sum("error" in r for r in report["kernels"].values())
    print(f"{args.directory}: {len(report['kernels'])} kernels timed or failed ({failed} failed) in "
          f"{report['seconds_used']:.1f} s on {report['device']['name']}"
          f"{'' if report['complete'] else ', stopped at the time limit'}; results in {RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
