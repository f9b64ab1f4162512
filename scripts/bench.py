"""Benchmark tvmconv against the libraries people deploy convolutions with, per network stack and per layer.

Run from the repository root with the `bench` extra installed (pip install -e ".[bench]"):

    .venv/bin/python scripts/bench.py                                  # ResNet-50 and MobileNetV2, batch 1
    .venv/bin/python scripts/bench.py --batch 1 8 --markdown table.md  # both batch sizes, a Markdown report
    .venv/bin/python scripts/bench.py --quick                          # a few layers: a smoke run (~2 min)
    .venv/bin/python scripts/bench.py --peers tvmconv,tvmconv-defaults,torch-packed --networks resnet50

Peers, each in its own process, one after the other (thread pools of several runtimes in one process
fight over the cores), on the same inputs and weights, NHWC in and out, float32, `--threads` threads:
  tvmconv           `layer(x)`, the whole call. For the per-call overhead, the call, its kernel called from
                    Python and the kernel alone (TVM's time evaluator) are then timed again, taking turns;
                    the overhead is the median over the turns of each turn's call against its kernel.
                    Tuning records apply as in any build (`--log-dir` adds a root).
  tvmconv-defaults  the same with no tuning record: the templates' defaults.
  torch             torch.nn.functional.conv2d on channels_last tensors: oneDNN, which re-lays out the
                    weights on every call.
  torch-packed      oneDNN with the weights prepacked once: torch.ops.mkldnn._reorder_convolution_weight,
                    then torch.ops.mkldnn._convolution_pointwise per call, the ops torch.compile's
                    freezing emits for a CPU convolution.
  onnxruntime       a Transpose → Conv → Transpose ONNX graph (its optimizer folds the transposes into
                    its own layouts), run with IOBinding on the caller's arrays.
  openvino          the same ONNX graph compiled for the CPU, f32, latency hint, one stream.
Keras's "same" padding with stride 2 puts the odd pixel bottom/right; the ONNX graph says so in its
pads, and torch gets the input padded once, before timing, and a "valid" convolution.

Before timing a layer, each peer checks its output against a float64 numpy reference (tvmconv.reference,
rtol 1e-3 of the output's scale): every peer against the same reference, so against each other. A
mismatch is reported, its layer is not timed, and the exit status is 1.

Each timing is the median of `--repeat` repeats (default 30), each lasting at least 10 ms, after warm-up;
with `--rounds N` (default 2) every peer runs N times, the peers taking turns, and each layer keeps its
fastest round: this machine's speed drifts by 10-40% over minutes, and turns spread the drift over all.
The headline is per network stack: the time of all of its convolutions, each weighted by how often the
network runs it (ResNet-50: 53, MobileNetV2: 52), per peer; tvmconv's ratio to the best peer other than
itself (above 1: tvmconv is faster) and its share of the FMA peak (measured here by a TVM kernel of
independent FMAs). Per-layer rows keep the ratio to the best peer. Results: a JSON file (`--json`, default
bench_results/<llvm cpu>-<date>T<hhmm>.json), `--markdown PATH`, and a chart of the per-layer ratios next to
the JSON. Run on an idle machine: the run reports the CPU share other processes took.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import (  # noqa: E402
    DISTURBED_PCT,
    REPO_ROOT,
    OtherLoad,
    cpu_model_name,
    geomean,
    git_commit,
    keras_pads,
    measure_fma_peak,
    median,
    random_inputs,
    time_call,
    time_call_and_kernel,
    torch_layout,
)

from tvmconv.networks import ConvSpec, Workload, conv_workload, network_workloads  # noqa: E402

PEERS = ("tvmconv", "tvmconv-defaults", "torch", "torch-packed", "onnxruntime", "openvino")
DEFAULT_PEERS = ("tvmconv", "torch", "torch-packed", "onnxruntime", "openvino")
OURS = ("tvmconv", "tvmconv-defaults")
DEFAULT_NETWORKS = ("resnet50", "mobilenet_v2")
RTOL = 1e-3
QUICK_WORKLOADS = ("resnet50/conv3x3_56x56x64", "resnet50/conv1x1_14x14x1024_to256", "resnet50/conv3x3_7x7x512",
                   "mobilenet_v2/dwconv3x3_112x112x32", "mobilenet_v2/conv1x1_7x7x160_to960")
OVERHEAD_WORKLOAD = "resnet50/conv3x3_56x56x64"  # 1x56x56x64 -> 64 filters, 3x3, same


# ---------------------------------------------------------------- the peers (each runs in a worker process)


def _tvmconv(workload: Workload, x, weights, threads: int, defaults: bool) -> tuple:
    import tvmconv
    from tvmconv import records
    if defaults:  # no tuning record: what a CPU without records gets
        records.search_roots = lambda: []
    s = workload.spec
    layer = tvmconv.Conv2D(s.filters, s.kernel, strides=s.stride, padding=workload.padding, groups=s.groups,
                           use_bias=False, dtype="float32", threads=threads)
    layer.build(x.shape)
    layer.set_weights([weights])
    compiled = layer.compiled_kernel(x.shape)

    def extra(repeat: int) -> dict:
        calls = time_call_and_kernel(lambda: layer(x), compiled, layer.kernel_arguments(x), repeat)
        return {"overhead": {name: t.as_json() for name, t in calls.items()}, "schedule": compiled.schedule,
                "knobs": repr(compiled.knobs), "tuning": str(compiled.tuning) if compiled.tuning else None}
    return (lambda: layer(x)), (lambda: np.array(layer(x))), extra


def _torch_inputs(torch, workload: Workload, x, weights):
    """x as torch reads it (padded once where Keras's padding is asymmetric), the OIHW weights, torch's padding."""
    top, left, bottom, right = keras_pads(workload)
    x_t = torch_layout(torch, x)
    padding = [top, left]
    if (top, left) != (bottom, right):
        x_t = torch.nn.functional.pad(x_t, (left, right, top, bottom)).contiguous(memory_format=torch.channels_last)
        padding = [0, 0]
    return x_t, torch.from_numpy(np.ascontiguousarray(weights.transpose(3, 2, 0, 1))), padding


def _torch(workload: Workload, x, weights, threads: int, packed: bool) -> tuple:
    import torch
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    s = workload.spec
    x_t, w_t, padding = _torch_inputs(torch, workload, x, weights)
    stride, dilation = [s.stride, s.stride], [1, 1]
    if packed:
        w_packed = torch.ops.mkldnn._reorder_convolution_weight(w_t, padding, stride, dilation, s.groups,
                                                               list(x_t.shape))

        def run():
            return torch.ops.mkldnn._convolution_pointwise(x_t, w_packed, None, padding, stride, dilation, s.groups,
                                                           "none", [], "")
    else:
        w_t = w_t.contiguous(memory_format=torch.channels_last)

        def run():
            return torch.nn.functional.conv2d(x_t, w_t, None, stride, padding, dilation, s.groups)
    return run, (lambda: run().permute(0, 2, 3, 1).contiguous().numpy()), None


def _onnx_model(workload: Workload, x, weights) -> tuple[bytes, tuple]:
    """Transpose(NHWC → NCHW) → Conv → Transpose(NCHW → NHWC), the weights as an initializer; and the
    output's shape."""
    from onnx import TensorProto, helper, numpy_helper
    s = workload.spec
    top, left, bottom, right = keras_pads(workload)
    out_h = (s.height + top + bottom - s.kernel) // s.stride + 1
    out_w = (s.width + left + right - s.kernel) // s.stride + 1
    nodes = [helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["x_nchw", "w"], ["y_nchw"], kernel_shape=[s.kernel, s.kernel],
                              strides=[s.stride, s.stride], pads=[top, left, bottom, right], group=s.groups),
             helper.make_node("Transpose", ["y_nchw"], ["y"], perm=[0, 2, 3, 1])]
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.shape[0], out_h, out_w, s.filters])],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(weights.transpose(3, 2, 0, 1)), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), (x.shape[0], out_h, out_w, s.filters)


def _onnxruntime(workload: Workload, x, weights, threads: int) -> tuple:
    import onnxruntime as ort
    model, y_shape = _onnx_model(workload, x, weights)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    y = np.empty(y_shape, np.float32)
    binding = session.io_binding()
    binding.bind_cpu_input("x", x)
    binding.bind_output("y", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)

    def run():
        session.run_with_iobinding(binding)
    return run, (lambda: (run(), y.copy())[1]), None


def _openvino(workload: Workload, x, weights, threads: int) -> tuple:
    import openvino as ov
    model, _ = _onnx_model(workload, x, weights)
    core = ov.Core()
    with tempfile.TemporaryDirectory(prefix="tvmconv-bench-") as folder:
        path = os.path.join(folder, "conv.onnx")
        with open(path, "wb") as f:
            f.write(model)
        compiled = core.compile_model(core.read_model(path), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
            "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()

    def run():
        request.infer({0: x}, share_inputs=True, share_outputs=True)
    return run, (lambda: (run(), np.array(request.get_output_tensor(0).data))[1]), None


def make_peer(peer: str, workload: Workload, x, weights, threads: int) -> tuple:
    """(run, output, extra): a zero-argument call of the peer's convolution, one returning its NHWC output,
    and a function of `repeat` timing what else the peer reports (None for none)."""
    if peer in OURS:
        return _tvmconv(workload, x, weights, threads, defaults=peer == "tvmconv-defaults")
    if peer in ("torch", "torch-packed"):
        return _torch(workload, x, weights, threads, packed=peer == "torch-packed")
    return {"onnxruntime": _onnxruntime, "openvino": _openvino}[peer](workload, x, weights, threads)


def check(y: np.ndarray, reference: np.ndarray) -> dict:
    """Max error relative to the output's scale, and whether it is within RTOL."""
    if y.shape != reference.shape:
        return {"ok": False, "max_rel_error": None, "shape": list(y.shape)}
    scale = max(float(np.abs(reference).max()), 1e-30)
    error = float(np.abs(y - reference).max()) / scale
    return {"ok": error <= RTOL, "max_rel_error": error}


def worker(spec_path: str, out_path: str) -> int:
    """One peer on every workload of the spec: check, then time. Writes its results as JSON."""
    from tvmconv import reference
    spec = json.loads(pathlib.Path(spec_path).read_text())
    peer, threads, repeat = spec["peer"], spec["threads"], spec["repeat"]
    results = []
    for item in spec["workloads"]:
        workload = _workload(item)
        x, weights = random_inputs(workload, item["batch"], spec["seed"])
        s = workload.spec
        expected = reference.conv2d(x, weights, None, (s.stride, s.stride), workload.padding, groups=s.groups)
        started = time.perf_counter()
        run, output, extra = make_peer(peer, workload, x, weights, threads)
        setup_s = time.perf_counter() - started
        row = {"name": workload.name, "batch": item["batch"], "setup_s": setup_s, **check(output(), expected)}
        if row["ok"]:
            load = OtherLoad()
            row["timing"] = time_call(run, repeat).as_json()
            if extra is not None:
                row.update(extra(repeat))
            row["other_load_pct"] = load.share()
        print(f"  {peer:16} {workload.name:40} b{item['batch']}: "
              + (f"{row['timing']['median_s'] * 1e3:8.3f} ms" if row["ok"] else
                 f"MISMATCH (max rel error {row['max_rel_error']})"), file=sys.stderr, flush=True)
        results.append(row)
    pathlib.Path(out_path).write_text(json.dumps({"peer": peer, "versions": _versions(peer), "results": results}))
    return 0


def _versions(peer: str) -> dict:
    import importlib.metadata
    names = {"tvmconv": ["apache-tvm"], "tvmconv-defaults": ["apache-tvm"], "torch": ["torch"],
             "torch-packed": ["torch"], "onnxruntime": ["onnxruntime"], "openvino": ["openvino"]}[peer]
    return {name: importlib.metadata.version(name) for name in names}


def fastest(runs: list[dict]) -> dict:
    """One peer's rounds as one result: per layer, the round whose median was lowest (mismatches kept)."""
    merged = dict(runs[0])
    merged["results"] = [min(rows, key=lambda r: r["timing"]["median_s"] if r["ok"] else float("inf"))
                         for rows in zip(*(run["results"] for run in runs), strict=True)]
    merged["rounds"] = len(runs)
    return merged


def _workload(item: dict) -> Workload:
    return Workload(item["name"], item["network"], item["kind"], ConvSpec(**item["spec"]), item["count"])


# ---------------------------------------------------------------- the driver


def run_peer(peer: str, items: list[dict], args, folder: pathlib.Path, round_: int) -> dict:
    spec = folder / f"spec-{peer}.json"
    out = folder / f"result-{peer}-{round_}.json"
    spec.write_text(json.dumps({"peer": peer, "threads": args.threads, "repeat": args.repeat, "seed": args.seed,
                                "workloads": items}))
    # numpy's BLAS runs the float64 reference on one thread: with more, its threads spin for ~0.1 s after each
    # product, and a peer's parallel kernel timed meanwhile shares a core with them (measured: calls of
    # conv1x1_7x7x960_to320 at batch 8 took 1.6-1.7 ms for 40 calls after a float64 product, 0.8 without).
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TVM_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS="1")
    if args.log_dir:
        env["TVMCONV_TUNING_LOGS"] = str(args.log_dir)
    print(f"{peer}: {len(items)} layers, round {round_ + 1} of {args.rounds}", flush=True)
    status = subprocess.run([sys.executable, __file__, "--worker", str(spec), str(out)], env=env).returncode
    if status:
        raise SystemExit(f"the {peer} worker failed (exit status {status})")
    return json.loads(out.read_text())


def select(args) -> list[dict]:
    items = []
    for batch in args.batch:
        for network in args.networks:
            for workload in network_workloads(network):
                if args.quick and workload.name not in QUICK_WORKLOADS:
                    continue
                if args.filter and not any(f in workload.name for f in args.filter):
                    continue
                items.append({**dataclasses.asdict(workload), "batch": batch})
    return items


def summarize(items: list[dict], peers: dict, peak: float) -> dict:
    """Per layer: each peer's median, the best peer other than tvmconv and the ratio to it; per network and
    batch: the stack's time per peer (each layer weighted by its count), ratios, % of peak."""
    times = {peer: {(r["name"], r["batch"]): r["timing"]["median_s"] for r in data["results"] if r["ok"]}
             for peer, data in peers.items()}
    others = [p for p in peers if p not in OURS]
    layers = []
    for item in items:
        key = (item["name"], item["batch"])
        flops = conv_workload(_workload(item), item["batch"]).flops
        row = {"name": item["name"], "network": item["network"], "kind": item["kind"], "batch": item["batch"],
               "count": item["count"], "flops": flops,
               "seconds": {peer: t[key] for peer, t in times.items() if key in t}}
        measured = {p: row["seconds"][p] for p in others if p in row["seconds"]}
        if measured:
            row["best_peer"] = min(measured, key=measured.get)
            for ours in OURS:
                if ours in row["seconds"]:
                    row[f"{ours}_ratio"] = measured[row["best_peer"]] / row["seconds"][ours]
        layers.append(row)
    stacks = []
    for network in dict.fromkeys(item["network"] for item in items):
        for batch in dict.fromkeys(item["batch"] for item in items):
            rows = [r for r in layers if r["network"] == network and r["batch"] == batch]
            if not rows:
                continue
            flops = sum(r["count"] * r["flops"] for r in rows)
            totals = {peer: sum(r["count"] * r["seconds"][peer] for r in rows)
                      for peer in peers if all(peer in r["seconds"] for r in rows)}
            stack = {"network": network, "batch": batch, "layers": len(rows), "convolutions": sum(r["count"] for r in rows),
                     "flops": flops, "seconds": totals,
                     "gflops": {peer: flops / t / 1e9 for peer, t in totals.items()},
                     "pct_peak": {peer: 100 * flops / t / 1e9 / peak for peer, t in totals.items()}}
            candidates = {p: t for p, t in totals.items() if p not in OURS}
            if candidates:
                stack["best_peer"] = min(candidates, key=candidates.get)
                for ours in OURS:
                    if ours in totals:
                        stack[f"{ours}_ratio"] = candidates[stack["best_peer"]] / totals[ours]
                        stack[f"{ours}_min_layer_ratio"] = min(r[f"{ours}_ratio"] for r in rows)
            stacks.append(stack)
    return {"layers": layers, "stacks": stacks}


def overhead(peers: dict) -> dict:
    """tvmconv's per-call overhead, from its call and kernel timed in turns (benchlib.time_call_and_kernel):
    at 1x56x56x64 -> 64 3x3 (%), over MobileNetV2's layers at batch 1 (kernel / call throughput), and where
    their time goes (medians over those layers, µs): the FFI call of the kernel from Python, and the rest of
    the call over that FFI call: tvmconv's Python around it (the DLPack tensors, the thread count, the output
    pool, the layer's shortcut), which right after a kernel runs on caches the kernel filled, and the kernel
    running slower in a call than in the evaluator's loop (docs/benchmark_history.md, Sapphire Rapids: from the call's
    start to a 330 µs kernel 6-14 µs, 1.1-1.3 back to back; the kernel 2-3% slower).

    Each figure is the median over the turns of what one turn measured (the call over the kernel timed next to
    it), not a ratio of medians: the machine's speed drifts between turns, and on Zen 4 the 56x56x64 kernel ran
    395-855 µs within one layer's turns, where the ratio of its medians read -13.5% (the call faster than its
    own kernel)."""
    if "tvmconv" not in peers:
        return {}
    turns = {(r["name"], r["batch"]): {step: t["seconds"] for step, t in r["overhead"].items()}
             for r in peers["tvmconv"]["results"] if r["ok"]}

    def per_turn(steps: dict, value) -> float:
        return median(value(*turn) for turn in zip(steps["kernel"], steps["kernel_from_python"], steps["call"]))
    found = {}
    if (OVERHEAD_WORKLOAD, 1) in turns:
        found["pct_at_56x56x64_3x3"] = 100 * (per_turn(turns[(OVERHEAD_WORKLOAD, 1)], lambda k, f, c: c / k) - 1)
    mobilenet = [s for (name, batch), s in turns.items() if name.startswith("mobilenet_v2/") and batch == 1]
    if mobilenet:
        ratios = [per_turn(s, lambda k, f, c: k / c) for s in mobilenet]
        found["mobilenet_v2_call_over_kernel_min"] = min(ratios)
        found["mobilenet_v2_call_over_kernel_geomean"] = geomean(ratios)
        found["mobilenet_v2_ffi_call_us"] = 1e6 * median(per_turn(s, lambda k, f, c: f - k) for s in mobilenet)
        found["mobilenet_v2_call_over_ffi_us"] = 1e6 * median(per_turn(s, lambda k, f, c: c - f) for s in mobilenet)
    return found


def headline_peer(peers: list[str]) -> str:
    """Whose ratios the report heads with: tvmconv with its records, else its defaults where only they ran."""
    return next((p for p in OURS if p in peers), OURS[0])


def markdown(meta: dict, summary: dict, peers: list[str], extra: dict) -> str:
    lines = [f"CPU: **{meta['cpu_model']}** (LLVM `{meta['llvm_cpu']}`, {meta['vector_bits']}-bit vectors), "
             f"{meta['threads']} threads; FMA peak {meta['peak']['gflops']:.0f} GFLOP/s (measured); fastest of "
             f"{meta['rounds']} rounds; "
             f"{meta['date']}, tvmconv commit {meta['tvmconv_commit']}; "
             + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".", ""]
    ours = headline_peer(peers)
    lines += ["| stack | batch | " + " | ".join(peers) + f" | {ours} / best peer | {ours} % of peak |",
              "|---|---:|" + "---:|" * len(peers) + "---:|---:|"]
    for s in summary["stacks"]:
        cells = [f"{s['seconds'][p] * 1e3:.2f} ms" if p in s["seconds"] else "-" for p in peers]
        best = s.get("best_peer")
        cells = [f"**{c}**" if p == best else c for p, c in zip(peers, cells)]
        ratio = (f"{s[f'{ours}_ratio']:.3f}x (min layer {s[f'{ours}_min_layer_ratio']:.2f}x)"
                 if f"{ours}_ratio" in s else "-")  # no other peer ran
        lines.append(f"| {s['network']} ({s['convolutions']} convolutions) | {s['batch']} | " + " | ".join(cells)
                     + f" | {ratio} | {s['pct_peak'].get(ours, float('nan')):.0f}% |")
    if extra:
        lines += ["", "Per-call overhead of `layer(x)` over the bare kernel: "
                  + "; ".join(f"{k} {v:.3f}" for k, v in extra.items()) + "."]
    for network in dict.fromkeys(r["network"] for r in summary["layers"]):
        for batch in dict.fromkeys(r["batch"] for r in summary["layers"]):
            rows = [r for r in summary["layers"] if r["network"] == network and r["batch"] == batch]
            if not rows:
                continue
            lines += ["", f"{network}, batch {batch} (times in µs, median):", "",
                      "| layer | × | GFLOP | " + " | ".join(peers) + f" | {ours} GF/s | best peer | {ours} / best |",
                      "|---|---:|---:|" + "---:|" * len(peers) + "---:|---|---:|"]
            for r in rows:
                cells = [f"{r['seconds'][p] * 1e6:.0f}" if p in r["seconds"] else "-" for p in peers]
                gflops = r["flops"] / r["seconds"][ours] / 1e9 if ours in r["seconds"] else float("nan")
                lines.append(f"| {r['name'].split('/', 1)[1]} | {r['count']} | {r['flops'] / 1e9:.3f} | "
                             + " | ".join(cells) + f" | {gflops:.0f} | {r.get('best_peer', '-')} | "
                             + (f"{r[f'{ours}_ratio']:.2f} |" if f"{ours}_ratio" in r else "- |"))
    return "\n".join(lines) + "\n"


def plot(summary: dict, peers: list[str], path: pathlib.Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ours = headline_peer(peers)
    rows = [r for r in summary["layers"] if f"{ours}_ratio" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(10, 1.8 + 0.25 * len(rows)))
    positions = list(range(len(rows)))[::-1]
    ratios = [r[f"{ours}_ratio"] for r in rows]
    ax.barh(positions, [v - 1.0 for v in ratios], left=1.0,
            color=["tab:blue" if r["network"] == "resnet50" else "tab:orange" for r in rows])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(positions, [f"{r['name']} b{r['batch']} ×{r['count']}" for r in rows], fontsize=7)
    ax.set_xlabel(f"{ours} layer(x) / best peer, throughput (higher is better; 1.0 = parity)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                        help=f"comma-separated, from {', '.join(PEERS)} (default: {','.join(DEFAULT_PEERS)})")
    parser.add_argument("--networks", nargs="+", default=list(DEFAULT_NETWORKS), help="network stacks (default: "
                        f"{' '.join(DEFAULT_NETWORKS)})")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    parser.add_argument("--quick", action="store_true", help="only a few layers: a smoke run, not a stack")
    parser.add_argument("--filter", action="append", metavar="SUBSTRING", help="only layers whose name contains it")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads for every peer (default: every CPU)")
    parser.add_argument("--repeat", type=int, default=30, help="timed repeats; the median is reported (default 30)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every peer, taking turns; each layer keeps "
                        "its fastest (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="inputs and weights (default 0)")
    parser.add_argument("--log-dir", type=pathlib.Path, help="tvmconv's tuning-log root (default: $TVMCONV_TUNING_LOGS)")
    parser.add_argument("--json", type=pathlib.Path, help="results (default bench_results/<cpu>-<date>T<hhmm>.json)")
    parser.add_argument("--markdown", type=pathlib.Path, help="also write the report as Markdown here")
    parser.add_argument("--list", action="store_true", help="list the selected layers and exit")
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    peers = [p for p in args.peers.split(",") if p]
    unknown = [p for p in peers if p not in PEERS]
    if unknown or not peers:
        parser.error(f"--peers: unknown {unknown} (known: {', '.join(PEERS)})")
    args.peers = peers
    unknown = [n for n in args.networks if n not in ("resnet50", "mobilenet_v2", "resnext50", "vgg16")]
    if unknown:
        parser.error(f"--networks: unknown {unknown}")
    if min(args.threads, args.repeat, args.rounds, *args.batch) < 1:
        parser.error("--threads, --repeat, --rounds and --batch must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    items = select(args)
    if args.list or not items:
        for item in items:
            print(f"{item['name']:44} ×{item['count']:<3} batch {item['batch']}")
        return 0 if items else 2
    started, run_load = time.perf_counter(), OtherLoad()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its pool: the peak's kernel runs on all
    import tvm

    from tvmconv import targets
    target = targets.resolve(None)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_model": cpu_model_name(), "llvm_cpu": targets.host()["mcpu"],
            "vector_bits": targets.vector_bits(target), "target_key": targets.target_key(target),
            "threads": args.threads, "repeat": args.repeat, "tvm": tvm.__version__, "tvmconv_commit": git_commit(),
            "peers": args.peers, "quick": args.quick, "rounds": args.rounds}
    meta["peak"] = measure_fma_peak(args.threads, target, meta["vector_bits"])
    print(f"{meta['cpu_model']} ({meta['llvm_cpu']}), {args.threads} threads, FMA peak "
          f"{meta['peak']['gflops']:.1f} GFLOP/s; {len(items)} layers x {len(args.peers)} peers", flush=True)
    with tempfile.TemporaryDirectory(prefix="tvmconv-bench-") as folder:
        rounds = [{peer: run_peer(peer, items, args, pathlib.Path(folder), r) for peer in args.peers}
                  for r in range(args.rounds)]
    results = {peer: fastest([r[peer] for r in rounds]) for peer in args.peers}
    meta["versions"] = {k: v for data in results.values() for k, v in data["versions"].items()}
    summary = summarize(items, results, meta["peak"]["gflops"])
    extra = overhead(results)
    meta["wall_s"], meta["other_load_pct"] = time.perf_counter() - started, run_load.share()
    mismatches = [f"{peer}: {r['name']} b{r['batch']}" for peer, data in results.items()
                  for r in data["results"] if not r["ok"]]
    disturbed = [f"{peer}: {r['name']} b{r['batch']}" for peer, data in results.items() for r in data["results"]
                 if (r.get("other_load_pct") or 0) > DISTURBED_PCT]
    report = markdown(meta, summary, args.peers, extra)
    print("\n" + report)
    if mismatches:
        print(f"!!! OUTPUT MISMATCH against the float64 reference: {', '.join(mismatches)}")
    if disturbed:
        print(f"WARNING: other processes took more than {DISTURBED_PCT:.0f}% of the CPUs while these were timed: "
              f"{', '.join(disturbed)}; rerun on an idle machine")
    # to the minute: a second run the same day must not overwrite the first's
    stem = f"{meta['llvm_cpu']}-{datetime.datetime.now().strftime('%Y-%m-%dT%H%M')}{'-quick' if args.quick else ''}"
    json_path = args.json or REPO_ROOT / "bench_results" / f"{stem}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, "summary": summary, "overhead": extra, "peers": results,
                                     "mismatches": mismatches, "disturbed": disturbed}, indent=1) + "\n")
    plot(summary, args.peers, json_path.with_suffix(".png"),
         f"{headline_peer(args.peers)} / best peer, {meta['llvm_cpu']}, {args.threads} threads")
    if args.markdown:
        args.markdown.write_text(report)
    print(f"wrote {json_path}" + (f" and {args.markdown}" if args.markdown else "") + f" in {meta['wall_s']:.0f} s")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
