"""The `tvmconv` command line."""
import argparse
import sys
import time

import numpy as np


def demo(args) -> int:
    """Build a small conv model on the host CPU, check it against numpy, show what compiled and how fast."""
    import tvmconv
    from tvmconv import reference, targets

    target = targets.resolve(None)
    print(f"host target: {targets.host()}  (key {targets.target_key(target)})")
    model = tvmconv.Sequential(name="demo")
    tvmconv.layer_conv_2d(model, 32, 3, padding="same", activation="relu", input_shape=(args.size, args.size, 3),
                          kernel_initializer=tvmconv.initializers.HeNormal(seed=0))
    tvmconv.layer_conv_2d(model, 32, 3, strides=2, padding="same", groups=32, activation="relu")
    tvmconv.layer_conv_2d(model, 64, 1, activation="sigmoid")
    model.summary()
    x = np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
    y = model(x)

    expected = x
    for layer in model.layers:
        z = reference.conv2d(expected, layer.kernel, layer.bias, layer.strides, layer.padding, layer.dilation_rate,
                             layer.groups)
        expected = reference.ACTIVATIONS[layer.activation](z)
    error = float(np.abs(y - expected).max())
    print(f"max |tvmconv - numpy float64| = {error:.2e}")

    shape = x.shape
    for layer in model.layers:
        compiled = layer.compiled_kernel(shape)
        start, runs = time.perf_counter(), 0
        while time.perf_counter() - start < 0.3:
            layer(np.zeros(shape, np.float32))
            runs += 1
        seconds = (time.perf_counter() - start) / runs
        wl = compiled.workload
        print(f"{layer.name}: {wl.kernel_size[0]}x{wl.kernel_size[1]} s{wl.strides[0]} g{wl.groups} "
              f"{shape} -> {wl.output_shape}  schedule={compiled.schedule} {compiled.knobs}  "
              f"from {compiled.origin}; {seconds * 1e3:.3f} ms/call, {wl.flops / seconds / 1e9:.1f} GFLOP/s")
        shape = wl.output_shape
    if error > 1e-3:
        print("FAILED: the compiled model does not match numpy", file=sys.stderr)
        return 1
    print("OK")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tvmconv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help=demo.__doc__)
    demo_parser.add_argument("--size", type=int, default=56, help="input height and width (default 56)")
    demo_parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    demo_parser.set_defaults(run=demo)
    args = parser.parse_args(argv)
    if getattr(args, "size", 1) < 3 or getattr(args, "batch", 1) < 1:
        parser.error("--size must be at least 3 and --batch at least 1")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
