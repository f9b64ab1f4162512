"""Backward kernels and a training step against PyTorch autograd (oneDNN), side by side in one process.

    .venv/bin/python scripts/bench_backward.py [--batch 1] [--threads 2]

For three ResNet-50 convolutions (float32, channels_last, no bias, linear): dX and dW by tvmconv's
gradient kernels (tvmconv.backward, TVM's time evaluator) against torch.nn.grad.conv2d_input /
conv2d_weight (oneDNN), and one SGD training step of a 3-conv model (tvmconv's train_on_batch
against torch's forward + backward + step). Outputs are compared before timing; results are
ratios (tvmconv GFLOP/s / torch GFLOP/s, above 1: tvmconv faster), medians, % of the FMA peak.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench import cpu_model_name, import_frameworks, measure_fma_peak, median, time_call  # noqa: E402

from tvmconv.networks import conv_workload, resnet50_workloads  # noqa: E402

LAYERS = ("resnet50/conv3x3_56x56x64", "resnet50/conv3x3_28x28x128", "resnet50/conv1x1_14x14x1024_to256")


def torch_layout(torch, array):
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last)


def bench_layer(env, workload, batch, repeat, rng):
    torch, tvm, tvmconv = env["torch"], env["tvm"], env["tvmconv"]
    from tvmconv import backward, build, runtime, targets
    wl = conv_workload(workload, batch)
    target = targets.resolve(None)
    x = rng.standard_normal(wl.input_shape).astype(np.float32)
    kernel = (rng.standard_normal(wl.kernel_shape) * 0.1).astype(np.float32)
    dz = rng.standard_normal(wl.output_shape).astype(np.float32)
    layer = tvmconv.Conv2D(wl.filters, wl.kernel_size, strides=wl.strides, padding=wl.padding, use_bias=False)
    layer.build(x.shape)
    layer.set_weights([kernel])
    grads = layer.gradients(x, dz)  # compiles every kernel it uses
    dx, dw = grads["input"], grads["kernel"]
    stride, pad = wl.strides[0], wl.kernel_size[0] // 2
    tx, tdz = torch_layout(torch, x), torch_layout(torch, dz)
    tw = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous()
    with torch.no_grad():
        t_dx = torch.nn.grad.conv2d_input(tx.shape, tw, tdz, stride=stride, padding=pad)
        t_dw = torch.nn.grad.conv2d_weight(tx, tw.shape, tdz, stride=stride, padding=pad)
    error_dx = float(np.abs(t_dx.permute(0, 2, 3, 1).numpy() - dx).max())
    error_dw = float(np.abs(t_dw.permute(2, 3, 1, 0).numpy() - dw).max())

    # dx and dW each timed as layer.gradients runs them: through forward kernels where the gradient is a
    # forward convolution (Conv2D._input_gradient, _kernel_gradient), else the gradient kernels.
    dx_part = layer._input_gradient if backward.input_gradient_workload(wl) else None
    input_kernel = build.get_backward_kernel("input", wl, target)
    weight_kernel = build.get_backward_kernel("weight", wl, target)
    w_aligned = runtime.as_aligned(kernel)
    out_dx, out_dw = runtime.aligned_empty(x.shape, np.float32), runtime.aligned_empty(kernel.shape, np.float32)
    args_dx = [runtime.to_tensor(runtime.as_aligned(a)) for a in (dz, w_aligned, out_dx)]
    args_dw = [runtime.to_tensor(runtime.as_aligned(a)) for a in (x, dz, out_dw)]

    def tvm_time(kernel_, args):
        evaluator = kernel_.module.time_evaluator(kernel_.entry, tvm.cpu(), number=1, repeat=repeat,
                                                  min_repeat_ms=20)
        return median(evaluator(*args).results)

    dx_seconds = (time_call(lambda: dx_part(wl, dz), repeat).median if dx_part else tvm_time(input_kernel, args_dx))
    dw_part = layer._kernel_gradient if backward.kernel_gradient_workload(wl) else None
    dw_seconds = (time_call(lambda: dw_part(wl, x, dz), repeat).median if dw_part else tvm_time(weight_kernel, args_dw))
    with torch.no_grad():
        torch_dx = time_call(lambda: torch.nn.grad.conv2d_input(tx.shape, tw, tdz, stride=stride, padding=pad),
                             repeat).median
        torch_dw = time_call(lambda: torch.nn.grad.conv2d_weight(tx, tw.shape, tdz, stride=stride, padding=pad),
                             repeat).median
    flops = wl.flops
    return {"name": workload.name, "batch": batch, "flops": flops,
            "dx": {"tvm_s": dx_seconds, "torch_s": torch_dx, "max_abs_error": error_dx,
                   "path": "forward kernel" if dx_part else "gradient kernel"},
            "dw": {"tvm_s": dw_seconds, "torch_s": torch_dw, "max_abs_error": error_dw,
                   "path": ("forward kernel, matrix product" if wl.kernel_size == (1, 1) else
                            "forward kernel, samples as channels") if dw_part else "gradient kernel"}}


def bench_training_step(env, batch, repeat, rng):
    """One SGD step of conv3x3(64→64, relu) → conv3x3(64→64, relu) → conv1x1(64→256) on 28x28x64."""
    torch, tvmconv = env["torch"], env["tvmconv"]
    x = rng.standard_normal((batch, 28, 28, 64)).astype(np.float32)
    y = rng.standard_normal((batch, 28, 28, 256)).astype(np.float32)
    model = tvmconv.Sequential()
    tvmconv.layer_conv_2d(model, 64, 3, padding="same", activation="relu", input_shape=(28, 28, 64))
    tvmconv.layer_conv_2d(model, 64, 3, padding="same", activation="relu")
    tvmconv.layer_conv_2d(model, 256, 1)
    model.compile(optimizer=tvmconv.training.SGD(learning_rate=1e-4), loss="mse")
    layers = [torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.Conv2d(64, 256, 1)]
    net = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1], torch.nn.ReLU(), layers[2]).to(
        memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4)
    tx, ty = torch_layout(torch, x), torch_layout(torch, y)

    def torch_step():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(net(tx), ty)
        loss.backward()
        optimizer.step()

    return {"tvm_s": time_call(lambda: model.train_on_batch(x, y), repeat).median,
            "torch_s": time_call(torch_step, repeat).median}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)
    env = import_frameworks(args.threads)
    target = env["tvmconv"].targets.resolve(None)
    peak = measure_fma_peak(args.threads, target, env["tvmconv"].targets.vector_bits(target))["gflops"]
    print(f"{cpu_model_name()} ({env['codegen'].llvm_get_system_cpu()}), {args.threads} threads, FMA peak "
          f"{peak:.1f} GFLOP/s; torch {env['torch'].__version__}, batch {args.batch}")
    rng = np.random.default_rng(0)
    workloads = {w.name: w for w in resnet50_workloads()}
    print("| workload | grad | tvmconv GF/s | torch GF/s | ratio | tvmconv %peak | max abs error |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in LAYERS:
        result = bench_layer(env, workloads[name], args.batch, args.repeat, rng)
        for part in ("dx", "dw"):
            r = result[part]
            mine, theirs = result["flops"] / r["tvm_s"] / 1e9, result["flops"] / r["torch_s"] / 1e9
            print(f"| {name} | {part} ({r.get('path', 'gradient kernel')}) | {mine:.1f} | {theirs:.1f} | {mine / theirs:.3f} | {100 * mine / peak:.1f} | "
                  f"{r['max_abs_error']:.1e} |", flush=True)
    step = bench_training_step(env, args.batch, args.repeat, rng)
    print(f"\ntraining step, 3-conv model at {args.batch}x28x28x64: tvmconv {step['tvm_s'] * 1e3:.2f} ms, torch "
          f"{step['torch_s'] * 1e3:.2f} ms, ratio (torch time / tvmconv time) {step['torch_s'] / step['tvm_s']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
