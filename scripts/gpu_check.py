"""Check tvmconv's CUDA kernels on a GPU and time them against cuDNN, on a machine without TVM's compiler.

The GPU machines of this project have PyTorch (with cuDNN) but no apache-tvm, and its wheel is too
large to carry there. So the work is split in two, and the GPU side needs only tvm_ffi, TVM's
runtime libraries (libtvm_runtime.so, libtvm_runtime_cuda.so) and `tvmconv.runtime`:

    # here, in the dev environment (nvcc on the PATH):
    .venv/bin/python scripts/gpu_check.py prepare .gpu/kernels --arch sm_90
    # on the GPU machine (see scripts/gpu_device.sh for the environment):
    python3 scripts/gpu_check.py run .gpu/kernels --out results/

`prepare` builds, with build.get_kernel, the kernel library and its fatbin for
  * the check set: every compute path (groups, depthwise, strides, dilation, "same" with an even
    kernel, channels_first, bias, activations incl. the softmax stages) with both ways of staging the
    input; the tensor-core template in float16 and TF32 on the same kind of shapes;
  * the gradients of a few layers (float32, and float16 on the tensor cores): every kernel
    Conv2D.gradients runs, the forward convolutions of dx and dW as much as the kernels of their own,
    with seeded inputs and their expected outputs (float64 numpy for the convolutions, this CPU's build
    of the same kernel for the others, which tests/test_gradients.py checks against float64);
  * the distinct convolutions of `--networks` (default ResNet-50 and MobileNetV2; float32,
    channels_last, no bias) at each of `--batches` (default 1 and 8): the template's defaults in float32,
    TF32 and float16, and up to `--variants` other float32 knob settings (a grid);
and writes DIR/index.json describing each kernel (shapes, padding, precision, knobs, FLOPs).

`run` loads each kernel with tvmconv.runtime alone (runtime.CudaKernel), and
  * checks its output against PyTorch in float64 on the GPU (or against its stored expected output),
    max |error| / max |reference| below TOLERANCE for its precision; a failure makes the exit status 1;
  * times the network kernels with TVM's time evaluator (median of REPEATS repeats, each >= ~5 ms)
    and torch.nn.functional.conv2d on channels_last tensors with cudnn.benchmark on, timed with CUDA
    events the same way: cuDNN in float32 with TF32 off, with TF32 on, and in float16, beside tvmconv's
    kernels in the same three precisions. Where Keras's "same" padding is asymmetric (stride 2), cuDNN
    gets the input padded before timing;
and writes OUT/results.json and a Markdown table (results.md) with the GPU named, its FP32 FMA
peak (SMs x 128 lanes x 2 x max SM clock) and the ratios cuDNN/tvmconv time per precision.
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
REPEATS = 15
# max |error| / max |reference| against float64. float16 multiplies exactly and accumulates in float32, then
# rounds the output (2^-11); TF32 rounds each input to 10 bits of mantissa (2^-11), accumulates in float32.
TOLERANCE = {"fp32": 1e-4, "tf32": 2e-3, "fp16": 2e-3}
PRECISIONS = {"fp32": dict(dtype="float32"), "tf32": dict(dtype="float32", tf32=True), "fp16": dict(dtype="float16")}
# Layers whose gradients are checked: every route of dx and dW, on the CUDA templates and schedules.
GRADIENT_LAYERS = [
    (dict(filters=8, kernel_size=3, strides=2, padding="same", groups=2, activation="gelu"), (2, 9, 9, 4)),
    (dict(filters=8, kernel_size=3, padding="same", groups=8, activation="relu"), (2, 8, 8, 8)),
    (dict(filters=32, kernel_size=1, strides=2, activation="tanh"), (2, 8, 8, 16)),
    (dict(filters=8, kernel_size=1, groups=2), (2, 6, 6, 8)),
    (dict(filters=32, kernel_size=3, padding="same", dtype="float16", activation="relu"), (2, 8, 8, 16)),
]


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


def _tensor_core_workloads():
    """The check set's ungrouped shapes, and a bigger one, in float16 and TF32 (the tensor-core template)."""
    shapes = [wl for wl in _check_workloads() if wl.groups == 1]
    from tvmconv.compute import ConvWorkload
    shapes.append(ConvWorkload(2, 14, 14, 64, 96, (3, 3), padding="same", use_bias=True, activation="relu"))
    return [dataclasses.replace(wl, dtype="float16") for wl in shapes] + [
        dataclasses.replace(wl, tf32=True) for wl in shapes]


def _precision(wl) -> str:
    return "tf32" if wl.tf32 else {"float32": "fp32", "float16": "fp16", "float64": "fp64"}[wl.dtype]


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


def _gradient_arrays(workload, host) -> dict:
    """Seeded inputs of a gradient kernel (by its PrimFunc's parameters, Keras's weight layout for a
    convolution), its expected output (float64 for a convolution) and the output's dtype."""
    from tvmconv import build, reference, runtime
    from tvmconv.compute import ConvWorkload
    rng = np.random.default_rng(3)
    *params, out = workload.prim_func(0).params
    inputs = [rng.standard_normal([int(d) for d in p.shape]).astype(str(p.dtype)) for p in params]
    if isinstance(workload, ConvWorkload):  # the forward pass and its pre-activation, dx's phases and dW
        x, kernel, *bias = inputs
        expected = reference.ACTIVATIONS[workload.activation](reference.conv2d(
            x, kernel, bias[0] if bias else None, workload.strides, workload.padding, workload.dilation,
            workload.groups, workload.channels_last))
    else:
        compiled = build.get_kernel(workload, host)
        expected = runtime.aligned_empty([int(d) for d in out.shape], str(out.dtype))
        compiled.kernel.call(*inputs, out=expected)
    return {**{f"input{i}": a for i, a in enumerate(inputs)}, "expected": expected, "output_dtype": str(out.dtype)}


def prepare(directory: pathlib.Path, arch: str, variants: int, networks: list[str], batches: list[int]) -> None:
    import tvmconv
    from tvmconv import backward, build, targets, tuning
    from tvmconv.networks import conv_workload, network_workloads
    from tvmconv.schedules import cuda

    target, host = targets.resolve(f"cuda-{arch}"), targets.resolve(None)
    directory.mkdir(parents=True, exist_ok=True)
    entries = []

    def add(wl, role, name, knobs=None, variant=0, batch=1, count=1):
        compiled = build.get_kernel(wl, target, knobs=knobs, record=False)
        stem = f"{len(entries):03d}"
        shutil.copy(compiled.library, directory / f"{stem}.so")
        shutil.copy(compiled.device_code, directory / f"{stem}.fatbin")
        entry = {"id": stem, "role": role, "name": name, "variant": variant, "batch": batch, "count": count,
                 "schedule": compiled.schedule, "knobs": repr(compiled.knobs), "label": wl.label}
        if role == "gradient":
            arrays = _gradient_arrays(wl, host)
            np.savez(directory / f"{stem}.npz", **arrays)
            entry["precision"] = _precision(wl.workload if isinstance(wl, backward.GradientKernel) else wl)
            entry["output_dtype"] = arrays.pop("output_dtype")
        else:
            entry.update({
                "precision": _precision(wl), "dtype": wl.dtype,
                "input_shape": list(wl.input_shape), "output_shape": list(wl.output_shape),
                "weights_shape": list(wl.weights_shape), "use_bias": wl.use_bias,
                "strides": list(wl.strides), "dilation": list(wl.dilation), "groups": wl.groups,
                "pads": list(wl.pads), "data_format": wl.data_format, "activation": wl.activation,
                "flops": wl.flops})
        entries.append(entry)

    for wl in _check_workloads():
        add(wl, "check", wl.label)
        default = cuda.RULE.default_knobs(wl, target)  # and the other way of staging the input
        add(wl, "check", wl.label, dataclasses.replace(default, window_stage=not default.window_stage))
    for wl in _tensor_core_workloads():
        add(wl, "check", wl.label)
    for config, shape in GRADIENT_LAYERS:
        layer = tvmconv.Conv2D(target=target, **config)
        for wl in tuning.conv_workloads(layer, shape, gradients=True):
            add(wl, "gradient", f"{config} {wl.label}")
    for network, batch in itertools.product(networks, batches):
        for workload in network_workloads(network):
            base = conv_workload(workload, batch)
            for precision, fields in PRECISIONS.items():
                wl = dataclasses.replace(base, **fields)
                knob_list = _knob_variants(wl, target)[:variants + 1] if precision == "fp32" else [None]
                for variant, knobs in enumerate(knob_list):
                    try:
                        add(wl, "bench", workload.name, knobs, variant, batch, workload.count)
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
    """Median milliseconds of one call of `function`, replayed from a CUDA graph of enough calls for ~5 ms,
    REPEATS replays: the GPU's time without PyTorch's dispatch on the host, 10-15 µs a call, which is longer
    than many of these kernels run (tvmconv's times include TVM's launch from C++, a few µs)."""
    for _ in range(10):  # warm-up: cudnn.benchmark chooses its algorithm here, outside the graph
        function()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    function()
    end.record()
    torch.cuda.synchronize()
    number = max(1, int(REPEAT_SECONDS * 1e3 / max(start.elapsed_time(end), 1e-3)))
    def calls():
        for _ in range(number):
            function()
    replay = calls
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            calls()
        replay = graph.replay
    except RuntimeError as err:  # not capturable here: the calls themselves, dispatch included, and say so
        print(f"CUDA graph capture failed, timing the calls: {err}", flush=True)
    times = []
    for _ in range(REPEATS):
        start.record()
        replay()
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
            check = _check_arrays if entry["role"] == "gradient" else _check_and_time
            results.append(check(torch, runtime, directory, entry, generator))
        except Exception as err:  # one broken kernel must not hide the others' results
            failures.append(f"{entry['id']} {entry['name']} {entry['knobs']}: {type(err).__name__}: {err}")
            print("FAILED", failures[-1], flush=True)
            continue
        if not results[-1]["relative_error"] < TOLERANCE[entry["precision"]]:
            failures.append(f"{entry['id']} {entry['name']} {entry['knobs']} ({entry['precision']}): relative "
                            f"error {results[-1]['relative_error']:.2e}")
    try:
        bundle_error = _check_bundle(runtime, directory)
        print(f"bundle (3 layers, batch 3 in chunks of 2) against the CPU: relative error {bundle_error:.1e}")
        if not bundle_error < TOLERANCE["fp32"]:
            failures.append(f"bundle: relative error {bundle_error:.2e}")
    except Exception as err:
        bundle_error = None
        failures.append(f"bundle: {type(err).__name__}: {err}")
    out.mkdir(parents=True, exist_ok=True)
    report = {"gpu": gpu, "bundle_relative_error": bundle_error, "tolerance": TOLERANCE,
              "index": {k: v for k, v in index.items() if k != "kernels"}, "kernels": results, "failures": failures}
    (out / "results.json").write_text(json.dumps(report, indent=1))  # kept should the comparison fail
    table = report["table"] = _compare_with_cudnn(torch, results, gpu)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(_markdown(gpu, table))
    print(_markdown(gpu, table))
    for failure in failures:
        print("MISMATCH", failure)
    return 1 if failures else 0


def _module(runtime, directory, entry):
    return runtime.CudaKernel(runtime.load_module(str(directory / f"{entry['id']}.so"),
                                                  str(directory / f"{entry['id']}.fatbin")))


def _check_arrays(torch, runtime, directory, entry, generator) -> dict:
    """A gradient kernel on its stored inputs, against its stored expected output."""
    with np.load(directory / f"{entry['id']}.npz") as stored:
        expected = stored["expected"]
        inputs = [stored[f"input{i}"] for i in range(len(stored.files) - 1)]
    y = np.empty(expected.shape, entry["output_dtype"])
    _module(runtime, directory, entry).call(*inputs, out=y)
    error = float(np.abs(y.astype(np.float64) - expected).max() / max(np.abs(expected).max(), 1e-30))
    print(f"{entry['id']} gradient {entry['name'][:90]:90} err {error:.1e}", flush=True)
    return {**entry, "relative_error": error}


def _check_and_time(torch, runtime, directory, entry, generator) -> dict:
    """One kernel: its output against PyTorch in float64, and for the network set its median time."""
    from tvmconv import timing
    kernel_module = _module(runtime, directory, entry)
    dtype = np.dtype(entry["dtype"])
    x = generator.standard_normal(entry["input_shape"]).astype(dtype)
    w = (generator.standard_normal(entry["weights_shape"]) / math.sqrt(math.prod(entry["weights_shape"][:3])))
    w = w.astype(dtype)
    b = generator.standard_normal(entry["weights_shape"][-1]).astype(dtype) if entry["use_bias"] else None
    weights = kernel_module.weights([w] + ([b] if b is not None else []))
    y = np.empty(entry["output_shape"], dtype)
    kernel_module(x, weights, y)
    as_torch = lambda a, torch_dtype: None if a is None else torch.from_numpy(a).to("cuda", torch_dtype)  # noqa: E731
    reference = _torch_reference(torch, entry, *(as_torch(a, torch.float64) for a in (x, w, b))).cpu().numpy()
    error = float(np.abs(y.astype(np.float64) - reference).max() / max(np.abs(reference).max(), 1e-30))
    row = {**entry, "relative_error": error}
    if entry["role"] == "bench":
        arguments = [runtime.to_device(x, "cuda"), *weights, runtime.device_empty(y.shape, y.dtype, "cuda")]
        probe = timing.time_evaluator(kernel_module.module, kernel_module.entry, "cuda", 1, 1)(*arguments)[0]
        number = max(1, int(REPEAT_SECONDS / max(probe, 1e-7)))
        seconds = timing.time_evaluator(kernel_module.module, kernel_module.entry, "cuda", number, REPEATS)(*arguments)
        row["tvmconv_ms"] = statistics.median(seconds) * 1e3
    print(f"{entry['id']} {entry['role']:5} {entry['precision']} {entry['name'][:40]:40} {entry['knobs'][:60]:60} "
          f"err {error:.1e}" + (f" {row['tvmconv_ms']:.4f} ms" if "tvmconv_ms" in row else ""), flush=True)
    return row


def _compare_with_cudnn(torch, results, gpu) -> list[dict]:
    """Per network workload and batch: cuDNN in float32 (TF32 off), TF32 and float16, against tvmconv's
    defaults in the same precisions (and its best float32 variant)."""
    table = []
    bench = sorted((r for r in results if r["role"] == "bench"), key=lambda r: (r["batch"], r["id"]))
    for (batch, name), rows in itertools.groupby(bench, key=lambda r: (r["batch"], r["name"])):
        rows = list(rows)
        first = rows[0]
        top, left, bottom, right = first["pads"]
        kh, kw, cin, filters = first["weights_shape"]
        cudnn = {}
        for precision in ("fp32", "tf32", "fp16"):
            dtype = torch.float16 if precision == "fp16" else torch.float32
            x = torch.randn(first["input_shape"], device="cuda", dtype=dtype).permute(0, 3, 1, 2)  # NHWC memory
            x = torch.nn.functional.pad(x, (left, right, top, bottom)).contiguous(memory_format=torch.channels_last)
            w = torch.randn(filters, cin, kh, kw, device="cuda", dtype=dtype).contiguous(
                memory_format=torch.channels_last)
            torch.backends.cudnn.allow_tf32 = precision == "tf32"
            with torch.inference_mode():
                cudnn[precision] = _median_cuda_ms(torch, lambda x=x, w=w: torch.nn.functional.conv2d(
                    x, w, None, tuple(first["strides"]), 0, 1, first["groups"]))
        torch.backends.cudnn.allow_tf32 = False
        ours = {p: next((r for r in rows if r["precision"] == p and r["variant"] == 0), None)
                for p in ("fp32", "tf32", "fp16")}
        if any(row is None for row in ours.values()):  # a failure is listed; no comparison without it
            continue
        best = min((r for r in rows if r["precision"] == "fp32"), key=lambda r: r["tvmconv_ms"])
        flops = first["flops"]
        table.append({"workload": name, "batch": batch, "count": first["count"], "gflop": flops / 1e9,
                      **{f"cudnn_{p}_ms": cudnn[p] for p in cudnn},
                      **{f"tvmconv_{p}_ms": ours[p]["tvmconv_ms"] for p in ours},
                      **{f"{p}_vs_cudnn": cudnn[p] / ours[p]["tvmconv_ms"] for p in ours},
                      "best_fp32_ms": best["tvmconv_ms"], "best_knobs": best["knobs"],
                      "variants": sum(r["precision"] == "fp32" for r in rows),
                      "best_fp32_vs_cudnn": cudnn["fp32"] / best["tvmconv_ms"],
                      "tvmconv_fp32_pct_peak": 100 * flops / (ours["fp32"]["tvmconv_ms"] * 1e-3) / 1e9
                      / gpu["fp32_peak_gflops"]})
    return table


def _markdown(gpu, table) -> str:
    lines = [f"GPU: {gpu['name']} (sm_{gpu['compute_capability'].replace('.', '')}, {gpu['sms']} SMs, max SM clock "
             f"{gpu['max_sm_mhz']:.0f} MHz, FP32 FMA peak {gpu['fp32_peak_gflops'] / 1e3:.1f} TFLOP/s), driver "
             f"{gpu['driver']}, torch {gpu['torch']}, cuDNN {gpu['cudnn']}. Times in µs; the ratio is cuDNN's "
             "time over tvmconv's in the same precision (> 1: tvmconv faster). cuDNN's time is a call "
             "replayed from a CUDA graph (no PyTorch dispatch); tvmconv's, TVM's time evaluator (its launch from C++ "
             "included).", ""]
    geomean = lambda rows, key: math.exp(statistics.fmean(math.log(r[key]) for r in rows))  # noqa: E731
    for batch, rows in itertools.groupby(table, key=lambda r: r["batch"]):
        rows = list(rows)
        lines += [f"Batch {batch}:", "",
                  "| workload | GFLOP | cuDNN fp32 | tvmconv fp32 | x | cuDNN TF32 | tvmconv TF32 | x "
                  "| cuDNN fp16 | tvmconv fp16 | x | tvmconv fp32 best of N (x) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            cells = [f"{row[f'cudnn_{p}_ms'] * 1e3:.1f} | {row[f'tvmconv_{p}_ms'] * 1e3:.1f} | "
                     f"{row[f'{p}_vs_cudnn']:.2f}" for p in ("fp32", "tf32", "fp16")]
            lines.append(f"| {row['workload']} | {row['gflop']:.3f} | {' | '.join(cells)} | "
                         f"{row['best_fp32_ms'] * 1e3:.1f} of {row['variants']} ({row['best_fp32_vs_cudnn']:.2f}) |")
        lines += ["", f"Geometric means, batch {batch}: fp32 {geomean(rows, 'fp32_vs_cudnn'):.3f}x, "
                      f"TF32 {geomean(rows, 'tf32_vs_cudnn'):.3f}x, fp16 {geomean(rows, 'fp16_vs_cudnn'):.3f}x "
                      f"cuDNN in the same precision; best fp32 variant {geomean(rows, 'best_fp32_vs_cudnn'):.3f}x.",
                  ""]
        # A stack: all of a network's convolutions, each as often as the network runs it.
        for network, layers in itertools.groupby(rows, key=lambda r: r["workload"].split("/")[0]):
            layers = list(layers)
            stack = {key: sum(r["count"] * r[key] for r in layers) * 1e3 for key in layers[0] if key.endswith("_ms")}
            lines.append(f"Stack {network}, batch {batch}: " + "; ".join(
                f"{p} cuDNN {stack[f'cudnn_{p}_ms']:.1f} µs, tvmconv {stack[f'tvmconv_{p}_ms']:.1f} µs "
                f"({stack[f'cudnn_{p}_ms'] / stack[f'tvmconv_{p}_ms']:.3f}x)" for p in ("fp32", "tf32", "fp16")))
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("prepare", help="build the kernels (needs apache-tvm and nvcc)")
    build_parser.add_argument("directory", type=pathlib.Path)
    build_parser.add_argument("--arch", default="sm_90", help="the GPU's arch (default sm_90: H100, H200)")
    build_parser.add_argument("--variants", type=int, default=0, help="other float32 knob settings per network layer")
    build_parser.add_argument("--networks", nargs="+", default=["resnet50", "mobilenet_v2"],
                              help="named workload sets (default resnet50 mobilenet_v2)")
    build_parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="batch sizes (default 1 8)")
    run_parser = commands.add_parser("run", help="check and time them on the GPU (needs tvm_ffi, torch)")
    run_parser.add_argument("directory", type=pathlib.Path)
    run_parser.add_argument("--out", type=pathlib.Path, default=None, help="where results go (default: DIRECTORY)")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.directory, args.arch, args.variants, args.networks, args.batches)
        return 0
    return run(args.directory, args.out or args.directory)


if __name__ == "__main__":
    sys.exit(main())
