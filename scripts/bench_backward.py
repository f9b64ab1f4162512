"""Backward kernels and a training step against PyTorch autograd (oneDNN), side by side in one process.

    .venv/bin/python scripts/bench_backward.py [--batch 1] [--threads 2]

For five ResNet-50 convolutions (stride 1 and 2, 3x3 and 1x1) and a MobileNetV2 depthwise one (float32,
channels_last, no bias, linear): dX and dW as Conv2D.gradients runs them (forward kernels of
tvmconv.backward's rearrangements, numpy copies included) against torch.nn.grad.conv2d_input /
conv2d_weight (oneDNN), and one SGD training step of a 3-conv model (tvmconv's train_on_batch
against torch's forward + backward + step). Outputs are compared before timing; results are
ratios (tvmconv GFLOP/s / torch GFLOP/s, above 1: tvmconv faster), medians, % of the FMA peak.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import cpu_model_name, measure_fma_peak, time_call, torch_layout  # noqa: E402

from tvmconv import backward  # noqa: E402
from tvmconv.networks import conv_workload, network_workloads  # noqa: E402

LAYERS = ("resnet50/conv3x3_56x56x64", "resnet50/conv3x3_28x28x128", "resnet50/conv1x1_14x14x1024_to256",
          "resnet50/conv3x3s2_28x28x256", "resnet50/conv1x1s2_28x28x512_to1024", "mobilenet_v2/dwconv3x3_56x56x144")


def torch_gradients(torch, wl, tx, tw, tdz):
    """(dx, dW) callables by torch.nn.grad with Keras's padding: "same" with strides pads 1 pixel less at the
    top and left than at the bottom and right, which torch's symmetric padding cannot say, so x is padded
    first (and dx cropped)."""
    top, left, bottom, right = wl.pads
    options = dict(stride=wl.strides, dilation=wl.dilation, groups=wl.groups)
    if (top, left) == (bottom, right):
        return (lambda: torch.nn.grad.conv2d_input(tx.shape, tw, tdz, padding=(top, left), **options),
                lambda: torch.nn.grad.conv2d_weight(tx, tw.shape, tdz, padding=(top, left), **options))
    padded = torch.nn.functional.pad(tx, (left, right, top, bottom))
    height, width = tx.shape[2:]
    return (lambda: torch.nn.grad.conv2d_input(padded.shape, tw, tdz, **options)[:, :, top:top + height,
                                                                                  left:left + width],
            lambda: torch.nn.grad.conv2d_weight(padded, tw.shape, tdz, **options))


def bench_layer(env, workload, batch, repeat, rng):
    """dx and dW of one layer, each timed as Conv2D.gradients runs it: dx as the forward kernels of its
    stride phases (Engine._input_gradient), dW as one forward kernel (Engine._weight_gradient), both with
    their numpy rearrangements."""
    torch, tvmconv = env["torch"], env["tvmconv"]
    wl = conv_workload(workload, batch)
    x = rng.standard_normal(wl.input_shape).astype(np.float32)
    kernel = (rng.standard_normal(wl.weights_shape) * 0.1).astype(np.float32)
    dz = rng.standard_normal(wl.output_shape).astype(np.float32)
    layer = tvmconv.Conv2D(wl.filters, wl.kernel_size, strides=wl.strides, padding=wl.padding, groups=wl.groups,
                           use_bias=False)
    layer.build(x.shape)
    layer.set_weights([kernel])
    grads = layer.gradients(x, dz)  # compiles every kernel it uses
    tx, tdz = torch_layout(torch, x), torch_layout(torch, dz)
    tw = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous()
    torch_dx, torch_dw = torch_gradients(torch, wl, tx, tw, tdz)
    with torch.no_grad():
        error_dx = float(np.abs(torch_dx().permute(0, 2, 3, 1).numpy() - grads["input"]).max())
        error_dw = float(np.abs(torch_dw().permute(2, 3, 1, 0).numpy() - grads["kernel"]).max())
        torch_dx_s, torch_dw_s = time_call(torch_dx, repeat).median, time_call(torch_dw, repeat).median
    phases, _ = backward.input_gradient_phases(wl)
    return {"name": workload.name, "batch": batch, "flops": wl.flops,
            "dx": {"tvm_s": time_call(lambda: layer._engine._input_gradient(wl, dz), repeat).median, "torch_s": torch_dx_s,
                   "max_abs_error": error_dx, "path": f"{len(phases)} phase{'s' * (len(phases) > 1)}"},
            "dw": {"tvm_s": time_call(lambda: layer._engine._weight_gradient(wl, x, dz), repeat).median,
                   "torch_s": torch_dw_s, "max_abs_error": error_dw,
                   "path": backward.weight_gradient_route(wl)}}


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


def import_frameworks(threads: int) -> dict:
    """torch and tvmconv with `threads` threads each (TVM_NUM_THREADS is set before TVM is imported)."""
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import torch
    torch.set_num_threads(threads)
    import tvmconv
    return {"torch": torch, "tvmconv": tvmconv}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)
    env = import_frameworks(args.threads)
    target = env["tvmconv"].targets.resolve(None)
    peak = measure_fma_peak(args.threads, target, env["tvmconv"].targets.vector_bits(target))["gflops"]
    print(f"{cpu_model_name()} ({target.attrs['mcpu']}), {args.threads} threads, FMA peak "
          f"{peak:.1f} GFLOP/s; torch {env['torch'].__version__}, batch {args.batch}")
    rng = np.random.default_rng(0)
    workloads = {w.name: w for w in [*network_workloads("resnet50"), *network_workloads("mobilenet_v2")]}
    print("| workload | grad | tvmconv GF/s | torch GF/s | ratio | tvmconv %peak | max abs error |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in LAYERS:
        result = bench_layer(env, workloads[name], args.batch, args.repeat, rng)
        for part in ("dx", "dw"):
            r = result[part]
            mine, theirs = result["flops"] / r["tvm_s"] / 1e9, result["flops"] / r["torch_s"] / 1e9
            print(f"| {name} | {part} ({r['path']}) | {mine:.1f} | {theirs:.1f} | {mine / theirs:.3f} | {100 * mine / peak:.1f} | "
                  f"{r['max_abs_error']:.1e} |", flush=True)
    step = bench_training_step(env, args.batch, args.repeat, rng)
    print(f"\ntraining step, 3-conv model at {args.batch}x28x28x64: tvmconv {step['tvm_s'] * 1e3:.2f} ms, torch "
          f"{step['torch_s'] * 1e3:.2f} ms, ratio (torch time / tvmconv time) {step['torch_s'] / step['tvm_s']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
