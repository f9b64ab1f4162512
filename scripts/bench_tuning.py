"""Tuning from scratch against oneDNN: a few trials into an empty log, then the record, the template's
defaults and PyTorch timed side by side in one process.

    .venv/bin/python scripts/bench_tuning.py [--trials 64] [--filter resnet50/conv3x3] [--threads 2]

For each selected workload (default: ResNet-50's 3x3 convolutions, batch 1, float32, channels_last, no
bias) it tunes `--trials` trials with `tvmconv.tuning.tune_workloads` into a fresh temporary log dir, so
no shipped or user record takes part. Then it times, on the same inputs: the best record of that run
(rebuilt from the log, whether or not builds would prefer the defaults), the template's defaults, and
`torch.nn.functional.conv2d` (oneDNN). Outputs are checked against torch first. Reported: ratios to
torch, medians, % of the FMA peak, the tuner's own figure, and the minutes the tuning took.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench import (  # noqa: E402
    OtherLoad,
    check_agreement,
    cpu_model_name,
    geomean,
    import_frameworks,
    kernel_arguments,
    measure_fma_peak,
    random_inputs,
    time_call,
    time_tvm_kernel,
    torch_conv,
)

from tvmconv import build, compute, records, runtime, targets, tuning  # noqa: E402
from tvmconv.networks import all_workloads, conv_workload  # noqa: E402

DEFAULT_FILTER = "resnet50/conv3x3"


def tune_and_time(env, workload, trials: int, repeat: int, seed: int) -> dict:
    torch = env["torch"]
    target = targets.resolve(None)
    wl = conv_workload(workload)
    with tempfile.TemporaryDirectory(prefix="tvmconv-scratch-") as log_dir:
        started = time.perf_counter()
        (result,) = tuning.tune_workloads([wl], trials=trials, min_trials=trials, log_dir=log_dir, progress=False)
        tuning_minutes = (time.perf_counter() - started) / 60
        record = records.best(wl, target, [log_dir], keep_slower=True)
    if record is None:  # without this check, get_kernel would look for records in the other logs
        raise SystemExit(f"{workload.name}: no valid record after {trials} trials ({result.errors} failed)")
    kernels = {"record": build.get_kernel(wl, target, record=record),
               "defaults": build.get_kernel(wl, target, record=False)}
    x, kernel = random_inputs(workload, 1, seed, runtime.aligned_empty)
    with torch.inference_mode():
        run_torch, _ = torch_conv(torch, workload, x, kernel, compute.same_padding)
        y_torch = run_torch().permute(0, 2, 3, 1).numpy()
    load, seconds, agreement = OtherLoad(), {}, True
    for name, compiled in kernels.items():
        arguments = kernel_arguments(env, compiled, x, kernel)
        compiled.kernel.function(*arguments)
        agreement &= check_agreement(f"{workload.name} ({name})", 1, np.from_dlpack(arguments[-1]), y_torch)["ok"]
        seconds[name] = time_tvm_kernel(compiled, arguments, repeat).median
    time.sleep(0.05)
    with torch.inference_mode():
        seconds["torch"] = time_call(run_torch, repeat).median
    return {"name": workload.name, "trials": result.trials, "errors": result.errors, "minutes": tuning_minutes,
            "tuner_gflops": result.tuner_gflops, "ok": agreement, "other_load_pct": load.share(),
            "gflops": {name: wl.flops / s / 1e9 for name, s in seconds.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=64, help="trials per workload, from scratch (default 64)")
    parser.add_argument("--filter", action="append", metavar="SUBSTRING",
                        help=f"workloads whose name contains SUBSTRING (repeatable; default {DEFAULT_FILTER})")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for torch and TVM")
    parser.add_argument("--repeat", type=int, default=30, help="timed repeats per timer (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.trials < 1 or args.threads < 1 or args.repeat < 1:
        parser.error("--trials, --threads and --repeat must be positive")
    filters = args.filter or [DEFAULT_FILTER]
    workloads = [w for w in all_workloads() if any(f in w.name for f in filters)]
    if not workloads:
        parser.error(f"no workload matches {filters}")

    env = import_frameworks(args.threads)
    target = targets.resolve(None)
    peak = measure_fma_peak(args.threads, target, targets.vector_bits(target))["gflops"]
    print(f"tuning from scratch, {args.trials} trials per workload, batch 1; CPU {cpu_model_name()} "
          f"(LLVM {env['codegen'].llvm_get_system_cpu()}), {args.threads} threads, torch {env['torch'].__version__}, "
          f"FMA peak {peak:.1f} GFLOP/s; medians of {args.repeat} repeats", flush=True)
    header = (f"| workload | trials (errors) | tuning min | tuner GF/s | record GF/s (%peak) | defaults GF/s | "
              f"torch GF/s | record / torch | defaults / torch | others %cpu |")
    rows = []
    for workload in workloads:
        r = tune_and_time(env, workload, args.trials, args.repeat, args.seed)
        rows.append(r)
        g = r["gflops"]
        print(f"{r['name']}: record {g['record']:.1f}, defaults {g['defaults']:.1f}, torch {g['torch']:.1f} GFLOP/s"
              + ("" if r["ok"] else "  !!! MISMATCH"), flush=True)
    print("\n" + header + "\n" + "|---" * 10 + "|")
    for r in rows:
        g = r["gflops"]
        print(f"| {r['name']} | {r['trials']} ({r['errors']}) | {r['minutes']:.1f} | {r['tuner_gflops']:.1f} | "
              f"{g['record']:.1f} ({100 * g['record'] / peak:.0f}%) | {g['defaults']:.1f} | {g['torch']:.1f} | "
              f"{g['record'] / g['torch']:.3f} | {g['defaults'] / g['torch']:.3f} | {r['other_load_pct']:.0f} |")
    ratios = [r["gflops"]["record"] / r["gflops"]["torch"] for r in rows]
    print(f"\nrecord / torch: geometric mean {geomean(ratios):.3f}, minimum {min(ratios):.3f}; defaults / torch: "
          f"geometric mean {geomean(r['gflops']['defaults'] / r['gflops']['torch'] for r in rows):.3f}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
