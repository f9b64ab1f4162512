"""Benchmark tvmconv's kernels against PyTorch's oneDNN convolution, side by side in one process.

Run from the repository root, in the dev environment with the `bench` extra installed:

    .venv/bin/python scripts/bench.py                    # every workload, batch 1 and 8 (long)
    .venv/bin/python scripts/bench.py --quick            # 5 workloads, batch 1, under 2 minutes
    .venv/bin/python scripts/bench.py --filter resnet50 --batch 1 --threads 2

What it measures, for each convolution of a set of real networks (the 23 distinct ResNet-50 v1.5
convolutions, MobileNetV2's depthwise and pointwise layers, ResNeXt-50 32x4d's grouped 3x3
convolutions and VGG-16's 3x3 convolutions), float32, channels_last, no bias:

  * tvmconv kernel: the compiled kernel alone, timed by TVM's time evaluator;
  * tvmconv call:   the whole `layer(x)` call (argument hand-over, output allocation, dispatch) on
                    a 64-byte aligned input, so that no copy can enter the timing;
  * torch:          `torch.nn.functional.conv2d` on channels_last tensors under inference_mode
                    (oneDNN where PyTorch has it). Where Keras's "same" padding is asymmetric
                    (stride 2: the odd pixel goes bottom/right) torch gets the input padded once,
                    before timing, and runs a "valid" convolution: same FLOPs, same output.

All three run in this one process on the host CPU with the same thread count (`--threads`,
default os.cpu_count()), from the same random weights; the outputs are checked against each other
once per workload before timing (rtol 1e-3) and a mismatch is reported loudly (and makes the exit
status 1). Every timer reports the median of `--repeat` repeats (default 30) after warm-up, each
repeat running the operation `number` times so that it lasts at least ~10 ms. Throughput is in
GFLOP/s with FLOPs = 2 x multiply-adds of the convolution (`CompiledKernel.workload.flops`), and
is set against the host's FMA peak, measured here with a small TVM kernel (`--peak`), or given with
`--peak-gflops`. Column "others %cpu" is the share of the CPUs other processes took while a
workload was timed: on a 2-core machine any of it ruins the timings, and the run says so.

Results: a table on stdout, a JSON file (`--json`, default
bench_results/<llvm cpu>-<date>[-quick].json) and a bar chart of the tvmconv/torch ratio per
workload (`--plot`, default next to the JSON); `--markdown PATH` also writes the table as Markdown
for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

from tvmconv.networks import Workload, all_workloads

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
REPEAT_SECONDS = 0.010      # each timed repeat runs the operation often enough to last this long
RTOL = 1e-3                 # agreement required between tvmconv and torch
PAUSE_BETWEEN_FRAMEWORKS = 0.05  # lets the other framework's spinning worker threads go to sleep
DISTURBED_PCT = 10.0        # other processes' CPU share above which a workload's timings are suspect
OVERHEAD_WORKLOAD = "resnet50/conv3x3_56x56x64"  # 1x56x56x64 -> 64 filters, 3x3, same
QUICK_WORKLOADS = (
    "resnet50/conv3x3_56x56x64",
    "resnet50/conv1x1_14x14x1024_to256",
    "resnet50/conv7x7s2_224x224x3_to64",
    "mobilenetv2/dwconv3x3_112x112x32",
    "resnext50/conv3x3g32_28x28x256",
)


# ---------------------------------------------------------------- workloads


def select_workloads(quick: bool, filters: list[str] | None) -> list[Workload]:
    workloads = all_workloads()
    if quick:
        by_name = {w.name: w for w in workloads}
        workloads = [by_name[name] for name in QUICK_WORKLOADS]
    if filters:
        workloads = [w for w in workloads if any(f in w.name for f in filters)]
    return workloads


# ---------------------------------------------------------------- timing


def median(values) -> float:
    return float(statistics.median(values))


def calls_per_repeat(call) -> int:
    """How many calls make one repeat last REPEAT_SECONDS (warms the operation up on the way)."""
    for _ in range(2):
        call()
    fastest = math.inf
    for _ in range(3):
        start = time.perf_counter()
        call()
        fastest = min(fastest, time.perf_counter() - start)
    return max(1, math.ceil(REPEAT_SECONDS / max(fastest, 1e-9)))


def time_python(call, number: int, repeat: int) -> list[float]:
    """Seconds per call, one value per repeat of `number` calls, timed with perf_counter."""
    results = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            call()
        results.append((time.perf_counter() - start) / number)
    return results


@dataclasses.dataclass
class Timing:
    number: int
    seconds: list[float]  # per call, one per repeat

    @property
    def median(self) -> float:
        return median(self.seconds)

    def as_json(self) -> dict:
        return {"median_s": self.median, "min_s": min(self.seconds), "max_s": max(self.seconds),
                "number": self.number, "repeat": len(self.seconds), "seconds": self.seconds}


def time_tvm_kernel(compiled, arguments, repeat: int) -> Timing:
    number = calls_per_repeat(lambda: compiled.kernel.function(*arguments))
    evaluator = compiled.time_evaluator(number=number, repeat=repeat)
    return Timing(number, evaluator(*arguments))


def time_call(call, repeat: int) -> Timing:
    number = calls_per_repeat(call)
    return Timing(number, time_python(call, number, repeat))


class OtherLoad:
    """Share of the CPUs that other processes used between start() and share().

    On a busy machine a thread of a parallel kernel waits for a scheduler tick (4 ms steps) and the
    timings mean nothing: with one of 2 cores taken, torch's 2-thread OpenMP conv3x3 fell from ~210 to
    ~15 GFLOP/s, a grouped one from ~130 to ~2. Busy time from /proc/stat minus this process's own CPU
    time says how much of that there was."""

    def __init__(self):
        self.start()

    @staticmethod
    def _busy_and_own() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        own = os.times()
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.user + own.system

    def start(self) -> None:
        self._wall, self._sample = time.perf_counter(), self._busy_and_own()

    def share(self) -> float | None:
        """Percent of all CPUs' time taken by other processes since start(), or None if unknown."""
        sample, wall = self._busy_and_own(), time.perf_counter() - self._wall
        if sample is None or self._sample is None or wall <= 0:
            return None
        others = (sample[0] - self._sample[0]) - (sample[1] - self._sample[1])
        return max(0.0, 100.0 * others / (wall * (os.cpu_count() or 1)))


# ---------------------------------------------------------------- FMA peak


def build_fma_peak_kernel(threads: int, accumulators: int, lanes: int, target):
    """A TVM kernel that does nothing but independent vector FMAs on registers, one task per thread.

    acc = acc * c + d on `accumulators` vectors of `lanes` floats: enough independent dependency
    chains to cover FMA latency times the number of FMA pipes, few enough to stay in registers
    with the two constants beside them."""
    import tvm
    from tvm.script import tirx as T

    @T.prim_func
    def fma_peak(out: T.Buffer((threads, accumulators, lanes), "float32"), iterations: T.int32):
        for t in T.parallel(threads):
            acc = T.alloc_buffer((accumulators, lanes), "float32", scope="local")
            for a in T.unroll(accumulators):
                for lane in T.vectorized(lanes):
                    acc[a, lane] = T.Cast("float32", a + lane) * T.float32(0.001)
            for _ in range(iterations):
                for a in T.unroll(accumulators):
                    for lane in T.vectorized(lanes):
                        # Converges to 1: no overflow, no denormals, whatever the iteration count.
                        acc[a, lane] = acc[a, lane] * T.float32(0.9999) + T.float32(0.0001)
            for a in T.unroll(accumulators):
                for lane in T.vectorized(lanes):
                    out[t, a, lane] = acc[a, lane]

    return tvm.compile(tvm.IRModule({"main": fma_peak}), target=target).mod


def measure_fma_peak(threads: int, target, vector_bits: int) -> dict:
    """The host's float32 FMA throughput in GFLOP/s, measured with TVM (best of 7 runs of ~50 ms).

    The best run, not the median: a peak is what the cores can do, and other work only slows it."""
    import tvm

    lanes = max(vector_bits // 32, 1)
    accumulators = 12 if vector_bits >= 512 else 10  # 32 zmm registers with AVX-512, 16 below
    module = build_fma_peak_kernel(threads, accumulators, lanes, target)
    out = tvm.runtime.tensor(np.zeros((threads, accumulators, lanes), np.float32))
    flops_per_iteration = 2 * threads * accumulators * lanes

    load = OtherLoad()
    probe_iterations = 200_000
    probe = module.time_evaluator("main", tvm.cpu(), number=1, repeat=3)(out, probe_iterations).results
    iterations = max(probe_iterations, int(probe_iterations * 0.05 / min(probe)))
    seconds = module.time_evaluator("main", tvm.cpu(), number=1, repeat=7)(out, iterations).results
    return {"gflops": flops_per_iteration * iterations / min(seconds) / 1e9, "source": "measured (TVM FMA kernel)",
            "threads": threads, "lanes": lanes, "accumulators": accumulators, "iterations": iterations,
            "other_load_pct": load.share()}


# ---------------------------------------------------------------- one workload


def torch_padding(workload: Workload, same_padding) -> tuple[tuple[int, int, int, int], tuple[int, int] | None]:
    """Keras "same" pads (top, bottom, left, right) and torch's equivalent symmetric padding, or None.

    With stride 2 Keras/TF put the odd extra pixel at the bottom/right while torch pads symmetrically;
    there torch gets the input padded once, before timing, and runs a "valid" convolution: the same
    FLOPs, the same output, and close to what oneDNN's in-kernel padding costs."""
    s = workload.spec
    if workload.padding == "valid":
        return (0, 0, 0, 0), (0, 0)
    top, bottom = same_padding(s.height, s.kernel, s.stride, 1)
    left, right = same_padding(s.width, s.kernel, s.stride, 1)
    symmetric = (top, left) if (top, left) == (bottom, right) else None
    return (top, bottom, left, right), symmetric


def random_inputs(workload: Workload, batch: int, seed: int, aligned_empty):
    """Input (NHWC, 64-byte aligned: never copied) and Keras-layout kernel, scaled for ~unit outputs."""
    s = workload.spec
    rng = np.random.default_rng(seed)
    x = aligned_empty((batch, s.height, s.width, s.in_channels), np.float32)
    x[...] = rng.uniform(-1.0, 1.0, x.shape)
    fan_in = s.kernel * s.kernel * (s.in_channels // s.groups)
    kernel = rng.uniform(-1.0, 1.0, (s.kernel, s.kernel, s.in_channels // s.groups, s.filters))
    return x, (kernel * math.sqrt(3.0 / fan_in)).astype(np.float32)


def torch_conv(torch, workload: Workload, x: np.ndarray, kernel: np.ndarray, same_padding):
    """A zero-argument callable running torch's conv2d on channels_last tensors prepared once."""
    s = workload.spec
    pads, symmetric = torch_padding(workload, same_padding)
    x_t = torch.from_numpy(x).permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: already channels_last
    if symmetric is None:
        top, bottom, left, right = pads
        x_t = torch.nn.functional.pad(x_t, (left, right, top, bottom))
        padding = (0, 0)
    else:
        padding = symmetric
    x_t = x_t.contiguous(memory_format=torch.channels_last)
    # Keras (kh, kw, in/groups, filters) -> torch (filters, in/groups, kh, kw).
    w_t = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    w_t = w_t.contiguous(memory_format=torch.channels_last)
    conv2d = torch.nn.functional.conv2d
    return lambda: conv2d(x_t, w_t, None, s.stride, padding, 1, s.groups), (
        "symmetric" if symmetric is not None else "pre-padded (asymmetric same)")


def check_agreement(name: str, batch: int, y_tvm: np.ndarray, y_torch: np.ndarray) -> dict:
    """Max error relative to the output's scale; a mismatch is printed loudly and recorded."""
    if y_tvm.shape != y_torch.shape:
        print(f"\n!!! MISMATCH {name} batch {batch}: shape {y_tvm.shape} (tvmconv) vs {y_torch.shape} (torch)\n",
              flush=True)
        return {"ok": False, "max_rel_error": None}
    scale = max(float(np.abs(y_torch).max()), 1e-30)
    max_rel_error = float(np.abs(y_tvm - y_torch).max()) / scale
    ok = bool(np.allclose(y_tvm, y_torch, rtol=RTOL, atol=RTOL * scale))
    if not ok:
        print(f"\n!!! MISMATCH {name} batch {batch}: tvmconv and torch differ, max |diff| / max |torch| = "
              f"{max_rel_error:.2e} (rtol {RTOL})\n", flush=True)
    return {"ok": ok, "max_rel_error": max_rel_error}


def describe_knobs(knobs) -> str:
    if dataclasses.is_dataclass(knobs):
        return ",".join(f"{k}={v}" for k, v in dataclasses.asdict(knobs).items())
    return str(knobs)


def describe_tuning(env, compiled, target) -> str:
    if compiled.tuning is not None:
        return str(compiled.tuning)
    passed_over = env["tvmconv"].records.best(compiled.workload, target, keep_slower=True)
    return f"defaults (record of {passed_over.trials} trials re-timed slower)" if passed_over else "untuned"


def kernel_arguments(env, compiled, x: np.ndarray, kernel: np.ndarray) -> list:
    """The arguments of a bare kernel without bias: the input, the weights packed for it, an output."""
    runtime = env["tvmconv"].runtime
    packed = env["tvmconv"].compute.pack_weights(kernel, compiled.weight_block)
    out = runtime.aligned_empty(compiled.workload.output_shape, np.float32)
    return [runtime.input_tensor(x), *compiled.kernel.weights([packed]), runtime.to_tensor(out)]


def untuned_kernel(env, layer, compiled, x):
    """The template's defaults for the same workload, and its arguments: the peer of a tuned kernel."""
    tvmconv = env["tvmconv"]
    wl, target = compiled.workload, layer.target
    untuned = tvmconv.build.get_kernel(wl, target, record=False)
    return untuned, kernel_arguments(env, untuned, x, layer.get_weights()[0])


@dataclasses.dataclass
class Prepared:
    """One workload at one batch size, ready to time: both frameworks set up, outputs compared."""

    layer: object
    x: np.ndarray
    compiled: object      # tvmconv's CompiledKernel for x.shape
    kernel_ready_s: float
    run_torch: object     # zero-argument callable
    torch_padding: str
    agreement: dict


def prepare_workload(env, workload: Workload, batch: int, seed: int) -> Prepared:
    """tvmconv's layer and torch's conv from the same weights; their outputs compared once."""
    torch, tvmconv = env["torch"], env["tvmconv"]
    s = workload.spec
    x, kernel = random_inputs(workload, batch, seed, tvmconv.runtime.aligned_empty)

    layer = tvmconv.Conv2D(s.filters, s.kernel, strides=s.stride, padding=workload.padding, groups=s.groups,
                           use_bias=False, data_format="channels_last", dtype="float32")
    layer.build(x.shape)
    layer.set_weights([kernel])
    start = time.perf_counter()
    compiled = layer.compiled_kernel(x.shape)
    kernel_ready_s = time.perf_counter() - start

    with torch.inference_mode():
        run_torch, torch_pad = torch_conv(torch, workload, x, kernel, tvmconv.compute.same_padding)
        y_torch = run_torch().permute(0, 2, 3, 1).numpy()
    agreement = check_agreement(workload.name, batch, layer(x), y_torch)
    return Prepared(layer, x, compiled, kernel_ready_s, run_torch, torch_pad, agreement)


def bench_workload(env, workload: Workload, batch: int, repeat: int, peak_gflops: float, seed: int) -> dict:
    """Check tvmconv against torch on one workload, then time tvmconv's kernel, its call, and torch."""
    torch = env["torch"]
    prepared = prepare_workload(env, workload, batch, seed)
    layer, x, compiled, run_torch = prepared.layer, prepared.x, prepared.compiled, prepared.run_torch

    load = OtherLoad()
    kernel_timing = time_tvm_kernel(compiled, layer.kernel_arguments(x), repeat)
    untuned_timing = kernel_timing
    if compiled.tuning is not None:
        untuned_timing = time_tvm_kernel(*untuned_kernel(env, layer, compiled, x), repeat)
    call_timing = time_call(lambda: layer(x), repeat)
    time.sleep(PAUSE_BETWEEN_FRAMEWORKS)
    with torch.inference_mode():
        torch_timing = time_call(run_torch, repeat)
    other_load_pct = load.share()
    time.sleep(PAUSE_BETWEEN_FRAMEWORKS)

    flops = compiled.workload.flops
    gflops = {key: flops / t.median / 1e9 for key, t in
              (("tvm_kernel", kernel_timing), ("tvm_call", call_timing), ("torch", torch_timing),
               ("tvm_untuned", untuned_timing))}
    return {
        "name": workload.name, "network": workload.network, "kind": workload.kind, "batch": batch,
        "spec": dataclasses.asdict(workload.spec), "padding": workload.padding,
        "torch_padding": prepared.torch_padding,
        "flops": flops,
        "gflops": gflops,
        "ratio": gflops["tvm_kernel"] / gflops["torch"],
        "untuned_ratio": gflops["tvm_untuned"] / gflops["torch"],
        "pct_peak": {key: 100.0 * value / peak_gflops for key, value in gflops.items()},
        "call_overhead_pct": 100.0 * (call_timing.median / kernel_timing.median - 1.0),
        "timings": {"tvm_kernel": kernel_timing.as_json(), "tvm_call": call_timing.as_json(),
                    "torch": torch_timing.as_json(), "tvm_untuned": untuned_timing.as_json()},
        "schedule": str(compiled.schedule), "knobs": describe_knobs(compiled.knobs),
        "tuned": compiled.tuning is not None, "tuning": describe_tuning(env, compiled, layer.target),
        "kernel_origin": compiled.origin,
        "kernel_ready_s": prepared.kernel_ready_s, "other_load_pct": other_load_pct,
        **prepared.agreement,
    }


# ---------------------------------------------------------------- report


def geomean(values) -> float | None:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summarize(results: list[dict], overhead: dict) -> dict:
    resnet_b1 = [r["ratio"] for r in results if r["network"] == "resnet50" and r["batch"] == 1]
    resnet_b1_untuned = [r["untuned_ratio"] for r in results if r["network"] == "resnet50" and r["batch"] == 1]
    depthwise = [r["ratio"] for r in results if r["kind"] == "depthwise"]
    worst = min(results, key=lambda r: r["ratio"]) if results else None
    per_batch = {str(b): geomean(r["ratio"] for r in results if r["batch"] == b)
                 for b in sorted({r["batch"] for r in results})}
    return {
        "resnet50_batch1_geomean_ratio": geomean(resnet_b1), "resnet50_batch1_count": len(resnet_b1),
        "resnet50_batch1_untuned_geomean_ratio": geomean(resnet_b1_untuned),
        "resnet50_batch1_min_ratio": min(resnet_b1) if resnet_b1 else None,
        "tuned_count": sum(r["tuned"] for r in results),
        "min_ratio": worst["ratio"] if worst else None,
        "min_ratio_workload": f"{worst['name']} batch {worst['batch']}" if worst else None,
        "depthwise_geomean_ratio": geomean(depthwise), "depthwise_count": len(depthwise),
        "geomean_ratio_per_batch": per_batch,
        "call_overhead_pct_1x56x56x64": overhead["pct"], "call_overhead_source": overhead["source"],
        "mismatches": [f"{r['name']} batch {r['batch']}" for r in results if not r["ok"]],
        "disturbed": [f"{r['name']} batch {r['batch']}" for r in results
                      if (r["other_load_pct"] or 0.0) > DISTURBED_PCT],
    }


def format_ratio(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary_lines(summary: dict) -> list[str]:
    lines = [
        (f"ResNet-50 batch 1 geomean ratio tvmconv/torch: {format_ratio(summary['resnet50_batch1_geomean_ratio'])} "
         f"({summary['resnet50_batch1_count']} of 23 workloads; "
         f"min {format_ratio(summary['resnet50_batch1_min_ratio'])}"
         f"; template defaults: {format_ratio(summary['resnet50_batch1_untuned_geomean_ratio'])})"),
        f"workloads built from a tuning record: {summary['tuned_count']}",
        f"min ratio: {format_ratio(summary['min_ratio'])} ({summary['min_ratio_workload']})",
        (f"depthwise geomean ratio: {format_ratio(summary['depthwise_geomean_ratio'])} "
         f"({summary['depthwise_count']} workloads)"),
    ]
    for batch, value in summary["geomean_ratio_per_batch"].items():
        lines.append(f"geomean ratio, all selected workloads, batch {batch}: {format_ratio(value)}")
    lines.append(f"per-call overhead at 1x56x56x64 -> 64 3x3 same (layer(x) / bare kernel - 1): "
                 f"{summary['call_overhead_pct_1x56x56x64']:+.1f}% ({summary['call_overhead_source']})")
    if summary["disturbed"]:
        lines.append(f"WARNING: other processes used more than {DISTURBED_PCT:.0f}% of the CPUs while "
                     f"{len(summary['disturbed'])} of the workloads were timed (column 'others %cpu'): "
                     "their numbers are not reliable; rerun on an idle machine")
    if summary["mismatches"]:
        lines.append(f"!!! OUTPUT MISMATCH tvmconv vs torch: {', '.join(summary['mismatches'])}")
    else:
        lines.append(f"outputs: tvmconv and torch agree on every workload (rtol {RTOL})")
    return lines


TABLE_COLUMNS = [  # header, width, value
    ("workload", 38, lambda r: r["name"]),
    ("batch", 5, lambda r: str(r["batch"])),
    ("GFLOP", 7, lambda r: f"{r['flops'] / 1e9:.3f}"),
    ("kernel GF/s", 11, lambda r: f"{r['gflops']['tvm_kernel']:.1f}"),
    ("call GF/s", 9, lambda r: f"{r['gflops']['tvm_call']:.1f}"),
    ("torch GF/s", 10, lambda r: f"{r['gflops']['torch']:.1f}"),
    ("ratio", 6, lambda r: f"{r['ratio']:.3f}"),
    ("untuned ratio", 13, lambda r: f"{r['untuned_ratio']:.3f}"),
    ("kernel %peak", 12, lambda r: f"{r['pct_peak']['tvm_kernel']:.1f}"),
    ("torch %peak", 11, lambda r: f"{r['pct_peak']['torch']:.1f}"),
    ("others %cpu", 11, lambda r: "?" if r["other_load_pct"] is None else f"{r['other_load_pct']:.0f}"),
    ("check", 8, lambda r: "ok" if r["ok"] else "MISMATCH"),
    ("tuning", 40, lambda r: r["tuning"]),
    ("schedule", 12, lambda r: r["schedule"]),
    ("knobs", 0, lambda r: r["knobs"]),  # last: its width varies with the schedule
]
LEFT_ALIGNED = {"workload", "check", "tuning", "schedule", "knobs"}


def plain_table(results: list[dict]) -> str:
    def row(cells):
        return "  ".join(cell.ljust(width) if header in LEFT_ALIGNED else cell.rjust(width)
                         for cell, (header, width, _) in zip(cells, TABLE_COLUMNS, strict=True)).rstrip()

    lines = [row([header for header, _, _ in TABLE_COLUMNS])]
    lines.append("-" * len(lines[0]))
    lines += [row([value(r) for _, _, value in TABLE_COLUMNS]) for r in results]
    return "\n".join(lines)


def markdown_table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(header for header, _, _ in TABLE_COLUMNS) + " |",
             "|" + "|".join("---" if header in LEFT_ALIGNED else "---:" for header, _, _ in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(value(r).replace("|", "/") for _, _, value in TABLE_COLUMNS) + " |" for r in results]
    return "\n".join(lines)


def header_lines(meta: dict) -> list[str]:
    peak = meta["peak"]
    return [
        f"tvmconv vs PyTorch conv2d, {meta['date']} ({'quick run' if meta['quick'] else 'run'})",
        f"CPU: {meta['cpu_model']}  (LLVM: {meta['llvm_cpu']}, {meta['vector_bits']}-bit vectors)",
        f"tvmconv target key: {meta['target_key']}   tvmconv commit: {meta['tvmconv_commit']}",
        (f"threads: {meta['threads']} (torch and TVM)   torch {meta['torch_version']} "
         f"(mkldnn available: {meta['torch_mkldnn']})   tvm {meta['tvm_version']}   tvmconv {meta['tvmconv_version']}"),
        f"FMA peak: {peak['gflops']:.1f} GFLOP/s ({peak['source']}"
        + (f"; other processes used {peak['other_load_pct']:.0f}% of the CPUs meanwhile)"
           if peak.get("other_load_pct") is not None else ")"),
        f"timers: median of {meta['repeat']} repeats of >= {REPEAT_SECONDS * 1e3:.0f} ms each, after warm-up"
        + ("  [fewer than 20 repeats: a smoke test, not a measurement]" if meta["repeat"] < 20 else ""),
        "ratio = tvmconv kernel GFLOP/s / torch GFLOP/s; %peak of the FMA peak above",
    ]


def plot_ratios(results: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt

    labels = [f"{r['name']}  b{r['batch']}" for r in results]
    ratios = [r["ratio"] for r in results]
    colors = {"resnet50": "tab:blue", "mobilenetv2": "tab:orange", "resnext50": "tab:green", "vgg16": "tab:purple"}
    fig, ax = plt.subplots(figsize=(10, 1.8 + 0.28 * len(results)))
    positions = list(range(len(results)))[::-1]  # first workload on top
    # Bars grow from parity (1.0) to the ratio, on a log axis: 0.5x and 2x sit equally far from 1.
    ax.barh(positions, [ratio - 1.0 for ratio in ratios], left=1.0,
            color=[colors.get(r["network"], "tab:gray") for r in results])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(positions, labels, fontsize=8)
    ax.legend(handles=[matplotlib.patches.Patch(color=c, label=n) for n, c in colors.items()
                       if any(r["network"] == n for r in results)], fontsize=7, loc="best")
    for y, ratio in zip(positions, ratios, strict=True):
        outside = ("left", f" {ratio:.2f}") if ratio >= 1.0 else ("right", f"{ratio:.2f} ")
        ax.text(ratio, y, outside[1], ha=outside[0], va="center", fontsize=7)
    ax.set_xlabel("tvmconv kernel / torch conv2d throughput (higher is better; 1.0 = parity)")
    ax.set_title(title, fontsize=9)
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- environment


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def import_frameworks(threads: int) -> dict:
    """torch and tvm(conv) with `threads` threads each (TVM_NUM_THREADS is set before TVM is imported)."""
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import torch
    torch.set_num_threads(threads)
    import tvm
    from tvm.target import codegen

    import tvmconv
    import tvmconv.compute
    import tvmconv.records
    import tvmconv.runtime

    return {"torch": torch, "tvm": tvm, "codegen": codegen, "tvmconv": tvmconv}


def environment(env: dict, threads: int, quick: bool, repeat: int) -> dict:
    torch, tvm, tvmconv = env["torch"], env["tvm"], env["tvmconv"]
    target = tvmconv.targets.resolve(None)
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu_model": cpu_model_name(), "llvm_cpu": env["codegen"].llvm_get_system_cpu(),
        "vector_bits": tvmconv.targets.vector_bits(target), "target_key": tvmconv.targets.target_key(target),
        "target": str(target), "threads": threads, "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__, "torch_mkldnn": bool(torch.backends.mkldnn.is_available()),
        "tvm_version": tvm.__version__, "tvmconv_version": getattr(tvmconv, "__version__", "unknown"),
        "python": platform.python_version(), "quick": quick, "repeat": repeat,
        "repeat_seconds": REPEAT_SECONDS, "rtol": RTOL, "dtype": "float32", "data_format": "channels_last",
        "tvmconv_commit": git_commit(),
    }


def git_commit() -> str | None:
    """The checkout's commit, "+dirty" with uncommitted changes; read-only (no index refresh)."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "--no-optional-locks", "-C", str(REPO_ROOT), *args], check=False,
                              capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode:
            return None
        dirty = git("diff", "--quiet", "HEAD", "--").returncode == 1
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def call_overhead(env, results: list[dict], repeat: int, seed: int) -> dict:
    """Per-call overhead at 1x56x56x64 -> 64 3x3 same, from this run's results or measured on its own."""
    for r in results:
        if r["name"] == OVERHEAD_WORKLOAD and r["batch"] == 1:
            return {"pct": r["call_overhead_pct"], "source": f"{OVERHEAD_WORKLOAD} batch 1 above"}
    tvmconv = env["tvmconv"]
    workload = next(w for w in all_workloads() if w.name == OVERHEAD_WORKLOAD)
    x, kernel = random_inputs(workload, 1, seed, tvmconv.runtime.aligned_empty)
    layer = tvmconv.Conv2D(64, 3, padding="same", use_bias=False, dtype="float32")
    layer.build(x.shape)
    layer.set_weights([kernel])
    kernel_timing = time_tvm_kernel(layer.compiled_kernel(x.shape), layer.kernel_arguments(x), repeat)
    call_timing = time_call(lambda: layer(x), repeat)
    return {"pct": 100.0 * (call_timing.median / kernel_timing.median - 1.0),
            "source": "measured separately: workload not selected"}


# ---------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads for torch and TVM alike (default: os.cpu_count())")
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help="batch sizes (default: 1 8; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"only {len(QUICK_WORKLOADS)} representative workloads at batch 1 (under 2 minutes)")
    parser.add_argument("--filter", action="append", metavar="SUBSTRING",
                        help="only workloads whose name contains SUBSTRING (repeatable: any of them)")
    parser.add_argument("--repeat", type=int, default=30, help="timed repeats per timer; the median is reported "
                        "(default 30; at least 20 for a real measurement)")
    parser.add_argument("--peak", action="store_true", help="measure the host's FMA peak (the default unless "
                        "--peak-gflops is given)")
    parser.add_argument("--peak-gflops", type=float, help="FMA peak to use instead of measuring it")
    parser.add_argument("--json", type=pathlib.Path, help="results file "
                        "(default: bench_results/<llvm cpu>-<date>[-quick].json in the repository)")
    parser.add_argument("--plot", type=pathlib.Path, help="ratio bar chart, PNG (default: next to the JSON)")
    parser.add_argument("--markdown", type=pathlib.Path, help="also write the table as Markdown here")
    parser.add_argument("--seed", type=int, default=0, help="random inputs and weights (default 0)")
    parser.add_argument("--list", action="store_true", help="list the selected workloads and exit")
    parser.add_argument("--check-only", action="store_true",
                        help="only compare tvmconv's outputs with torch's on the selected workloads; no timing")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeat < 1:
        parser.error("--threads and --repeat must be positive")
    if args.batch is None:
        args.batch = [1] if args.quick else [1, 8]
    return args


def check_only(env, workloads: list[Workload], batches: list[int], seed: int) -> int:
    """Compare tvmconv's output with torch's on every workload, without timing anything."""
    failed = []
    for batch in batches:
        for workload in workloads:
            prepared = prepare_workload(env, workload, batch, seed)
            error = prepared.agreement["max_rel_error"]
            print(f"{workload.name} batch {batch}: {'ok' if prepared.agreement['ok'] else 'MISMATCH'} "
                  f"(max |diff| / max |torch| = {'n/a' if error is None else f'{error:.1e}'}, "
                  f"torch padding {prepared.torch_padding})", flush=True)
            if not prepared.agreement["ok"]:
                failed.append(f"{workload.name} batch {batch}")
    print(f"\n{len(failed)} mismatches in {len(workloads) * len(batches)} checks" + (": " + ", ".join(failed)
                                                                                     if failed else ""))
    return 1 if failed else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    workloads = select_workloads(args.quick, args.filter)
    if args.list:
        for w in workloads:
            print(f"{w.name:40s} {w.kind:10s} {dataclasses.asdict(w.spec)}")
        return 0
    if not workloads:
        print("no workload matches the filter; --list shows them", file=sys.stderr)
        return 2

    started, run_load = time.perf_counter(), OtherLoad()
    env = import_frameworks(args.threads)
    if args.check_only:
        return check_only(env, workloads, args.batch, args.seed)
    meta = environment(env, args.threads, args.quick, args.repeat)
    if args.peak or args.peak_gflops is None:
        target = env["tvmconv"].targets.resolve(None)
        meta["peak"] = measure_fma_peak(args.threads, target, meta["vector_bits"])
    else:
        meta["peak"] = {"gflops": args.peak_gflops, "source": "given with --peak-gflops"}
    print("\n".join(header_lines(meta)), "\n", flush=True)

    results = []
    for batch in args.batch:
        for workload in workloads:
            result = bench_workload(env, workload, batch, args.repeat, meta["peak"]["gflops"], args.seed)
            results.append(result)
            print(f"{workload.name} batch {batch}: kernel {result['gflops']['tvm_kernel']:.1f}, "
                  f"call {result['gflops']['tvm_call']:.1f}, torch {result['gflops']['torch']:.1f} GFLOP/s, "
                  f"ratio {result['ratio']:.3f}  [{result['kernel_origin']} in {result['kernel_ready_s']:.2f} s]"
                  + ("" if result["ok"] else "  !!! MISMATCH"), flush=True)

    summary = summarize(results, call_overhead(env, results, args.repeat, args.seed))
    meta["wall_s"] = time.perf_counter() - started
    meta["other_load_pct"] = run_load.share()
    print()
    print(plain_table(results))
    print()
    print("\n".join(summary_lines(summary)))
    if meta["other_load_pct"] is not None:
        print(f"other processes used {meta['other_load_pct']:.0f}% of the CPUs during the run")

    stem = f"{meta['llvm_cpu']}-{datetime.date.today().isoformat()}{'-quick' if args.quick else ''}"
    json_path = args.json or REPO_ROOT / "bench_results" / f"{stem}.json"
    plot_path = args.plot or json_path.with_suffix(".png")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, "summary": summary, "results": results}, indent=1) + "\n")
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot_ratios(results, plot_path, f"tvmconv / torch, {meta['llvm_cpu']}, {args.threads} threads, {meta['date']}")
    if args.markdown:
        args.markdown.write_text(markdown_table(results) + "\n\n" + "\n".join(f"- {line}" for line in
                                 summary_lines(summary)) + "\n")
    print(f"\nwrote {json_path} and {plot_path}" + (f" and {args.markdown}" if args.markdown else "")
          + f" in {meta['wall_s']:.0f} s")
    return 1 if summary["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
