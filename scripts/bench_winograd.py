"""Winograd F(4, 3) against the direct sum, on the 3x3 stride-1 layers of ResNet-50 (or any network's).

tvmconv computes float32 channels-last 3x3 stride-1 layers of 16 channels and filters or more by Winograd
(schedules/cpu.py, `_winograd_choice`). This times, per layer and batch, the compiled kernel of the
defaults (Winograd) and of the direct sum's defaults (`default_knobs(..., winograd=False)`), taking
turns in one process (the machine's speed drifts over minutes; turns spread it over both), with TVM's
time evaluator (as bench.py's "kernel" column), and checks both against the float64 reference first,
reporting the largest error relative to the largest output. Tuning records do not apply: templates only.
Run on an idle machine, from the repository root:

    .venv/bin/python scripts/bench_winograd.py                  # ResNet-50, batch 1
    .venv/bin/python scripts/bench_winograd.py --batch 1 8 --markdown winograd.md
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import statistics
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from benchlib import cpu_model_name, git_commit, random_inputs

from tvmconv import build, reference, runtime, schedules, targets
from tvmconv.compute import ConvWorkload
from tvmconv.networks import NETWORKS, network_workloads
from tvmconv.schedules import cpu

TURNS = 7


def _kernel(wl: ConvWorkload, target, knobs, x: np.ndarray, weights: np.ndarray) -> tuple:
    """(compiled kernel, its arguments, its largest error relative to the largest float64 output)."""
    compiled = build.get_kernel(wl, target, knobs=knobs)
    packed = compiled.kernel.weights([compiled.pack(weights)])
    out = runtime.aligned_empty(wl.output_shape, wl.dtype)
    arguments = [runtime.to_device(x, "cpu"), *packed, runtime.output_tensor(out)]
    compiled.kernel.function(*arguments)
    expected = reference.conv2d(x, weights, None, wl.strides, wl.padding)
    return compiled, arguments, float(np.abs(out - expected).max() / np.abs(expected).max())


def compare(wl: ConvWorkload, target, x: np.ndarray, weights: np.ndarray) -> dict:
    rule = schedules.find_rule(target)
    direct = cpu.default_knobs(wl, rule.core(target), winograd=False)
    kernels = {"winograd": _kernel(wl, target, rule.default_knobs(wl, target), x, weights),
               "direct": _kernel(wl, target, direct, x, weights)}
    times = {name: [] for name in kernels}
    for turn in range(TURNS):
        for name in list(kernels)[turn % 2:] + list(kernels)[:turn % 2]:
            compiled, arguments, _ = kernels[name]
            times[name].append(statistics.median(compiled.time_evaluator(number=10, repeat=5)(*arguments)))
    result = {}
    for name, (_, _, error) in kernels.items():
        seconds = statistics.median(times[name])
        result[name] = {"us": seconds * 1e6, "gflops": wl.flops / seconds / 1e9, "error": error}
    result["speedup"] = result["direct"]["us"] / result["winograd"]["us"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", default="resnet50", choices=sorted(NETWORKS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    target = targets.resolve(None)
    runtime.use_threads(None)
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [(f"CPU: **{cpu_model_name()}** (LLVM `{target.attrs.get('mcpu', '?')}`), {runtime.default_threads()} "
             f"threads; median of {TURNS} turns; {when}, tvmconv commit {git_commit()}"), "",
             ("| layer | batch | Winograd µs | direct µs | Winograd / direct speed | Winograd effective GF/s "
             "| direct GF/s | error, Winograd | error, direct |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for batch in args.batch:
        for workload in network_workloads(args.network):
            s = workload.spec
            wl = ConvWorkload(batch, s.height, s.width, s.in_channels, s.filters, (s.kernel, s.kernel),
                              (s.stride, s.stride), padding=workload.padding, groups=s.groups, use_bias=False)
            if not wl.winograd_applies:
                continue
            x, weights = random_inputs(workload, batch, seed=0)
            r = compare(wl, target, x, weights)
            w, d = r["winograd"], r["direct"]
            line = (f"| {workload.name} | {batch} | {w['us']:.0f} | {d['us']:.0f} | {r['speedup']:.2f}x | "
                    f"{w['gflops']:.0f} | {d['gflops']:.0f} | {w['error']:.1e} | {d['error']:.1e} |")
            lines.append(line)
            print(line, flush=True)
    if args.markdown:
        pathlib.Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
