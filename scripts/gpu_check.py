"""Check tvmconv's CUDA kernels on a GPU and time them against cuDNN, on a machine without TVM's compiler.

The GPU machines of this project have PyTorch (with cuDNN) but no apache-tvm, and its wheel is too
large to carry there. So the work is split in two, and the GPU side needs only tvm_ffi, TVM's
runtime libraries (libtvm_runtime.so, libtvm_runtime_cuda.so) and `tvmconv.runtime`:

    # here, in the dev environment (nvcc on the PATH):
    .venv/bin/python scripts/gpu_check.py prepare .gpu/kernels --arch sm_90 --variants 32
    # on the GPU machine (see scripts/gpu_device.sh for the environment):
    python3 scripts/gpu_check.py run .gpu/kernels --out results/

`prepare` builds, with build.get_kernel, the kernel library and its fatbin for
  * the check set: every compute path (groups, depthwise, strides, dilation, "same" with an even
    kernel, channels_first, bias, activations incl. the softmax stages), small shapes;
  * the 23 distinct ResNet-50 convolutions at batch 1 (float32, channels_last, no bias): the
    template's default knobs, and up to `--variants` other knob settings of the CUDA template (a
    grid: the template has no MetaSchedule space yet, and the GPU machine cannot run the tuner);
and writes DIR/index.json describing each kernel (shapes, padding, knobs, FLOPs).

`run` loads each kernel with tvmconv.runtime alone (runtime.CudaKernel), and
  * checks its output against PyTorch in float64 on the GPU (max |error| / max |reference| < 1e-4,
    a failure makes the exit status 1);
  * times the ResNet-50 kernels with TVM's time evaluator (median of 30 repeats, each >= ~5 ms)
    and torch.nn.functional.conv2d on channels_last tensors with cudnn.benchmark on, timed with
    CUDA events the same way, both fp32 with TF32 off (also reported: cuDNN with TF32 on). Where
    Keras's "same" padding is asymmetric (stride 2), cuDNN gets the input padded before timing;
and writes DIR/results.json and a Markdown table (results.md) with the GPU named, its FP32 FMA
peak (SMs x 128 lanes x 2 x max SM clock) and the ratios tvmconv/cuDNN.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import math
import pathlib
import shutil
import statistics
import subprocess
import sys

import numpy as np

REPEAT_SECONDS = 0.005
REPEATS = 30
TOLERANCE = 1e-4  # max |error| / max |reference|, float32 kernels against float64


# ---------------------------------------------------------------------------------------- prepare

def _check_workloads():
    from tvmconv.compute import ConvWorkload
    return [
        ConvWorkload(1, 9, 9, 8, 16, (3, 3), padding="same", use_bias=True, activation="relu"),
        ConvWorkload(2, 10, 10, 8, 12, (3, 3), (2, 2), padding="same"),
        ConvWorkload(1, 9, 9, 8, 16, (3, 3), dilation=(2, 2), groups=4, use_bias=True),
        ConvWorkload(1, 8, 8, 16, 16, (3, 3), padding="same", groups=16, activation="relu6"),
        ConvWorkload(1, 8, 7, 6, 10, (2, 4), padding="same", use_bias=True, activation="tanh"),
        ConvWorkload(1, 6, 6, 4, 8, (3, 3), data_format="channels_first", use_bias=True, activation="relu"),
        ConvWorkload(1, 6, 6, 4, 8, (1, 1), activation="softmax"),
        ConvWorkload(1, 14, 14, 64, 48, (1, 1), (2, 2)),
    ]


def _knob_variants(wl, target) -> list:
    """The template's default knobs, then a grid around what won in earlier runs (docs/benchmarks.md):
    blocks of 4-8 pixels x 16-32 filter threads, 1-2 pixels x 4 filters per thread, 8-16 channels per
    stage, the stage holding the whole window or one tap."""
    from tvmconv.schedules import cuda
    default = cuda.RULE.default_knobs(wl, target)
    grid = [cuda.Knobs(px_t, f_t, px, 4, rc, window)
            for px_t, f_t, px, rc, window in itertools.product((4, 8), (16, 32), (1, 2), (8, 16), (True, False))
            if rc <= wl.group_in_channels and 4 * f_t <= 2 * wl.filters]
    return [default] + [knobs for knobs in grid if knobs != default]


def prepare(directory: pathlib.Path, arch: str, variants: int) -> None:
    from tvmconv import build, targets
    from tvmconv.networks import conv_workload, network_workloads
    from tvmconv.schedules import cuda

    target = targets.resolve(f"cuda-{arch}")
    directory.mkdir(parents=True, exist_ok=True)
    entries = []

    def add(wl, role, name, knobs=None, variant=0):
        compiled = build.get_kernel(wl, target, knobs=knobs)
        stem = f"{len(entries):03d}"
        shutil.copy(compiled.library, directory / f"{stem}.so")
        shutil.copy(compiled.device_code, directory / f"{stem}.fatbin")
        entries.append({
            "id": stem, "role": role, "name": name, "variant": variant, "schedule": compiled.schedule,
            "knobs": repr(compiled.knobs),
            "input_shape": list(wl.input_shape), "output_shape": list(wl.output_shape),
            "weights_shape": list(wl.weights_shape), "use_bias": wl.use_bias,
            "strides": list(wl.strides), "dilation": list(wl.dilation), "groups": wl.groups,
            "pads": list(wl.pads), "data_format": wl.data_format, "activation": wl.activation,
            "flops": wl.flops})

    for wl in _check_workloads():
        add(wl, "check", wl.label)
        default = cuda.RULE.default_knobs(wl, target)  # and the other way of staging the input
        add(wl, "check", wl.label, dataclasses.replace(default, window_stage=not default.window_stage))
    for workload in network_workloads("resnet50"):
        wl = conv_workload(workload)
        for variant, knobs in enumerate(_knob_variants(wl, target)[:variants + 1]):
            try:
                add(wl, "bench", workload.name, knobs, variant)
            except RuntimeError as err:  # e.g. more shared memory than a block may have: not a candidate
                if variant == 0:
                    raise
                reason = next((line for line in str(err).splitlines() if "error" in line), "build failed")
                print(f"skipped {workload.name} {knobs}: {reason.strip()[:120]}")
    _export_bundle(directory / "bundle", target)
    index = {"arch": arch, "target": str(target.export()), "made": datetime.datetime.now(datetime.UTC).isoformat(),
             "kernels": entries}
    (directory / "index.json").write_text(json.dumps(index, indent=1))
    print(f"{len(entries)} kernels for {arch} in {directory}")


def _export_bundle(path: pathlib.Path, target) -> None:
    """A three-layer model (a float64 layer in the middle: a dtype change on the way) exported for the
    GPU, with an input and the model's output computed here on the CPU by its own layers."""
    import tvmconv
    model = tvmconv.Sequential([tvmconv.Conv2D(16, 3, padding="same", activation="relu"),
                                tvmconv.Conv2D(8, 3, strides=2, groups=2, activation="tanh", dtype="float64"),
                                tvmconv.Conv2D(4, 1, activation="softmax")])
    x = np.random.default_rng(1).standard_normal((3, 12, 12, 8)).astype(np.float32)
    model(x)
    tvmconv.export(model, (2, 12, 12, 8), str(path), target=target)
    np.savez(path.parent / "bundle_check.npz", x=x, expected=model(x))


# ---------------------------------------------------------------------------------------- run

def _check_bundle(runtime, directory: pathlib.Path) -> float:
    """The exported model on the GPU (runtime.load, batch 3 in chunks of 2) against its CPU output."""
    with np.load(directory / "bundle_check.npz") as stored:
        x, expected = stored["x"], stored["expected"]
    predictor = runtime.load(str(directory / "bundle"))
    assert predictor.device == "cuda"
    return float(np.abs(predictor(x) - expected).max() / np.abs(expected).max())


def _torch_reference(torch, entry, x, kernel, bias):
    """The layer's output by PyTorch, in the precision of its inputs."""
    functional = torch.nn.functional
    channels_last = entry["data_format"] == "channels_last"
    x = x.permute(0, 3, 1, 2) if channels_last else x
    top, left, bottom, right = entry["pads"]
    x = functional.pad(x, (left, right, top, bottom))
    y = functional.conv2d(x, kernel.permute(3, 2, 0, 1), bias, tuple(entry["strides"]), 0,
                          tuple(entry["dilation"]), entry["groups"])
    y = {"linear": lambda v: v, "relu": torch.relu, "relu6": lambda v: v.clamp(0, 6), "tanh": torch.tanh,
         "softmax": lambda v: torch.softmax(v, dim=1)}[entry["activation"]](y)
    return y.permute(0, 2, 3, 1) if channels_last else y


def _median_cuda_ms(torch, function) -> float:
    """Median milliseconds of `function()` by CUDA events, REPEATS repeats of enough calls for ~5 ms."""
    for _ in range(10):
        function()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    function()
    end.record()
    torch.cuda.synchronize()
    number = max(1, int(REPEAT_SECONDS * 1e3 / max(start.elapsed_time(end), 1e-3)))
    times = []
    for _ in range(REPEATS):
        start.record()
        for _ in range(number):
            function()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / number)
    return statistics.median(times)


def _gpu_description(torch) -> dict:
    props = torch.cuda.get_device_properties(0)
    query = subprocess.run(["nvidia-smi", "--query-gpu=name,clocks.max.sm,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, check=True).stdout.strip().split(", ")
    max_mhz = float(query[1].split()[0])
    return {"name": props.name, "sms": props.multi_processor_count, "max_sm_mhz": max_mhz, "driver": query[2],
            "compute_capability": f"{props.major}.{props.minor}",
            "fp32_peak_gflops": props.multi_processor_count * 128 * 2 * max_mhz / 1e3,
            "torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}


def run(directory: pathlib.Path, out: pathlib.Path) -> int:
    import torch

    from tvmconv import runtime

    index = json.loads((directory / "index.json").read_text())
    if not runtime.cuda_available():
        sys.exit("no CUDA GPU that TVM's CUDA runtime can use")
    gpu = _gpu_description(torch)
    print(f"GPU: {gpu}", flush=True)
    torch.backends.cudnn.benchmark = True
    generator = np.random.default_rng(0)
    failures, results = [], []
    for entry in index["kernels"]:
        try:
            results.append(_check_and_time(torch, runtime, directory, entry, generator))
        except Exception as err:  # one broken kernel must not hide the others' results
            failures.append(f"{entry['id']} {entry['name']} {entry['knobs']}: {type(err).__name__}: {err}")
            print("FAILED", failures[-1], flush=True)
            continue
        if not results[-1]["relative_error"] < TOLERANCE:
            failures.append(f"{entry['id']} {entry['name']} {entry['knobs']}: relative error "
                            f"{results[-1]['relative_error']:.2e}")
    try:
        bundle_error = _check_bundle(runtime, directory)
        print(f"bundle (3 layers, batch 3 in chunks of 2) against the CPU: relative error {bundle_error:.1e}")
        if not bundle_error < TOLERANCE:
            failures.append(f"bundle: relative error {bundle_error:.2e}")
    except Exception as err:
        bundle_error = None
        failures.append(f"bundle: {type(err).__name__}: {err}")
    out.mkdir(parents=True, exist_ok=True)
    report = {"gpu": gpu, "bundle_relative_error": bundle_error, "index": {k: v for k, v in index.items() if k != "kernels"}, "kernels": results,
              "failures": failures}
    (out / "results.json").write_text(json.dumps(report, indent=1))  # kept should the comparison fail
    table = report["table"] = _compare_with_cudnn(torch, results, gpu)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(_markdown(gpu, table))
    print(_markdown(gpu, table))
    for failure in failures:
        print("MISMATCH", failure)
    return 1 if failures else 0


def _check_and_time(torch, runtime, directory, entry, generator) -> dict:
    """One kernel: its output against PyTorch in float64, and for the ResNet-50 set its median time."""
    from tvmconv import timing
    kernel_module = runtime.CudaKernel(runtime.load_module(str(directory / f"{entry['id']}.so"),
                                                           str(directory / f"{entry['id']}.fatbin")))
    x = generator.standard_normal(entry["input_shape"]).astype(np.float32)
    w = (generator.standard_normal(entry["weights_shape"]) / math.sqrt(math.prod(entry["weights_shape"][:3])))
    w = w.astype(np.float32)
    b = generator.standard_normal(entry["weights_shape"][-1]).astype(np.float32) if entry["use_bias"] else None
    weights = kernel_module.weights([w] + ([b] if b is not None else []))
    y = np.empty(entry["output_shape"], np.float32)
    kernel_module(x, weights, y)
    as_torch = lambda a, dtype: None if a is None else torch.from_numpy(a).to("cuda", dtype)  # noqa: E731
    reference = _torch_reference(torch, entry, *(as_torch(a, torch.float64) for a in (x, w, b))).cpu().numpy()
    error = float(np.abs(y - reference).max() / max(np.abs(reference).max(), 1e-30))
    row = {**entry, "relative_error": error}
    if entry["role"] == "bench":
        arguments = [runtime.to_device(x, "cuda"), *weights, runtime.device_empty(y.shape, y.dtype, "cuda")]
        probe = timing.time_evaluator(kernel_module.module, kernel_module.entry, "cuda", 1, 1)(*arguments)[0]
        number = max(1, int(REPEAT_SECONDS / max(probe, 1e-7)))
        seconds = timing.time_evaluator(kernel_module.module, kernel_module.entry, "cuda", number, REPEATS)(*arguments)
        row["tvmconv_ms"] = statistics.median(seconds) * 1e3
    print(f"{entry['id']} {entry['role']:5} {entry['name'][:40]:40} {entry['knobs'][:60]:60} err {error:.1e}"
          + (f" {row['tvmconv_ms']:.4f} ms" if "tvmconv_ms" in row else ""), flush=True)
    return row


def _compare_with_cudnn(torch, results, gpu) -> list[dict]:
    """Per ResNet-50 workload: cuDNN fp32 (TF32 off, then on) against tvmconv's defaults and best variant."""
    table = []
    for name, rows in itertools.groupby([r for r in results if r["role"] == "bench"], key=lambda r: r["name"]):
        rows = list(rows)
        first = rows[0]
        x = torch.randn(first["input_shape"], device="cuda").permute(0, 3, 1, 2)  # NHWC memory, NCHW view
        top, left, bottom, right = first["pads"]
        x = torch.nn.functional.pad(x, (left, right, top, bottom)).contiguous(memory_format=torch.channels_last)
        kh, kw, cin, filters = first["weights_shape"]
        w = torch.randn(filters, cin, kh, kw, device="cuda").contiguous(memory_format=torch.channels_last)
        conv = lambda: torch.nn.functional.conv2d(x, w, None, tuple(first["strides"]), 0, 1, first["groups"])  # noqa: E731
        timings = {}
        for tf32 in (False, True):
            torch.backends.cudnn.allow_tf32 = tf32
            with torch.inference_mode():
                timings[tf32] = _median_cuda_ms(torch, conv)
        torch.backends.cudnn.allow_tf32 = False
        default = next((r for r in rows if r["variant"] == 0), None)
        if default is None:  # its failure is listed; no comparison without it
            continue
        best = min(rows, key=lambda r: r["tvmconv_ms"])
        flops = first["flops"]
        table.append({"workload": name, "gflop": flops / 1e9, "cudnn_ms": timings[False], "cudnn_tf32_ms": timings[True],
                      "default_ms": default["tvmconv_ms"], "best_ms": best["tvmconv_ms"], "best_knobs": best["knobs"],
                      "variants": len(rows),
                      "default_vs_cudnn": timings[False] / default["tvmconv_ms"],
                      "best_vs_cudnn": timings[False] / best["tvmconv_ms"],
                      "best_pct_peak": 100 * flops / (best["tvmconv_ms"] * 1e-3) / 1e9 / gpu["fp32_peak_gflops"],
                      "cudnn_pct_peak": 100 * flops / (timings[False] * 1e-3) / 1e9 / gpu["fp32_peak_gflops"]})
    return table


def _markdown(gpu, table) -> str:
    lines = [f"GPU: {gpu['name']} (sm_{gpu['compute_capability'].replace('.', '')}, {gpu['sms']} SMs, max SM clock "
             f"{gpu['max_sm_mhz']:.0f} MHz, FP32 FMA peak {gpu['fp32_peak_gflops'] / 1e3:.1f} TFLOP/s), driver "
             f"{gpu['driver']}, torch {gpu['torch']}, cuDNN {gpu['cudnn']}", "",
             "| workload (batch 1) | GFLOP | cuDNN fp32 ms (% peak) | cuDNN TF32 ms | tvmconv defaults ms (x cuDNN) "
             "| tvmconv best of N ms (x cuDNN, % peak) | best knobs |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in table:
        lines.append(f"| {row['workload']} | {row['gflop']:.3f} | {row['cudnn_ms']:.4f} ({row['cudnn_pct_peak']:.0f}%) "
                     f"| {row['cudnn_tf32_ms']:.4f} | {row['default_ms']:.4f} ({row['default_vs_cudnn']:.2f}x) "
                     f"| {row['best_ms']:.4f} of {row['variants']} ({row['best_vs_cudnn']:.2f}x, {row['best_pct_peak']:.0f}%) "
                     f"| {row['best_knobs']} |")
    if table:
        geomean = lambda key: math.exp(statistics.fmean(math.log(r[key]) for r in table))  # noqa: E731
        lines += ["", f"Geometric mean against cuDNN fp32: defaults {geomean('default_vs_cudnn'):.3f}x, "
                      f"best variant {geomean('best_vs_cudnn'):.3f}x."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("prepare", help="build the kernels (needs apache-tvm and nvcc)")
    build_parser.add_argument("directory", type=pathlib.Path)
    build_parser.add_argument("--arch", default="sm_90", help="the GPU's arch (default sm_90: H100, H200)")
    build_parser.add_argument("--variants", type=int, default=32, help="other knob settings per ResNet-50 layer")
    run_parser = commands.add_parser("run", help="check and time them on the GPU (needs tvm_ffi, torch)")
    run_parser.add_argument("directory", type=pathlib.Path)
    run_parser.add_argument("--out", type=pathlib.Path, default=None, help="where results go (default: DIRECTORY)")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.directory, args.arch, args.variants)
        return 0
    return run(args.directory, args.out or args.directory)


if __name__ == "__main__":
    sys.exit(main())
