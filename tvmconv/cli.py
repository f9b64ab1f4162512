"""The `tvmconv` command line."""
import argparse
import json
import os
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


def target_argument(text: str):
    """--target: a preset name, or a TVM target dict as JSON."""
    return json.loads(text) if text.lstrip().startswith("{") else text


def parse_workload(text: str, batch: int):
    """`HxWxC:FILTERS:KHxKW[:name=value...]`, names being Conv2D arguments (strides, padding, dilation_rate,
    groups, data_format, use_bias, activation) or batch; e.g. 56x56x64:64:3x3:padding=same."""
    import tvmconv
    from tvmconv import tuning
    parts = text.split(":")
    try:
        spatial = [int(v) for v in parts[0].split("x")]
        filters = int(parts[1])
        kernel = tuple(int(v) for v in parts[2].split("x"))
        options = dict(part.split("=", 1) for part in parts[3:])
    except (IndexError, ValueError):
        raise ValueError(f"not a workload, a named set or a model file: {text!r} (workloads look like "
                         "56x56x64:64:3x3:padding=same)") from None
    if len(spatial) != 3:
        raise ValueError(f"the input of {text!r} must be HxWxC (or CxHxW with data_format=channels_first)")
    batch = int(options.pop("batch", batch))
    for name in ("strides", "dilation_rate"):
        if name in options:
            options[name] = tuple(int(v) for v in options[name].split("x"))
    if "groups" in options:
        options["groups"] = int(options["groups"])
    if "use_bias" in options:
        options["use_bias"] = options["use_bias"].lower() in ("1", "true", "yes")
    layer = tvmconv.Conv2D(filters, kernel, **options)
    return tuning.conv_workloads(layer, (batch, *spatial))


def tune(args) -> int:
    """Tune convolutions for a target; records go to the log dir under the target's key."""
    from tvmconv import from_keras, networks, rounds, tuning
    if args.ingest:
        if args.workloads or args.runner:
            raise ValueError("--ingest DIR takes the round's folder alone: its workloads and target are in the round")
        ingested, following = rounds.ingest(args.ingest, args.log_dir)
        print(f"{'workload':44} {'trials':>6} {'of':>6} {'timed':>6} {'errors':>6} {'default':>9} {'best':>9}  GFLOP/s")
        for r in ingested:
            cells = [f"{v:9.1f}" if v else f"{'-':>9}" for v in (r.default_gflops, r.gflops)]
            print(f"{r.workload.label:44} {r.trials:6d} {r.budget:6d} {r.measured:6d} {r.errors:6d} {' '.join(cells)}")
        _print_round(following, args.ingest)
        return 0
    if not args.workloads:
        raise ValueError("tune needs workloads (or --ingest DIR)")
    runner = args.runner or "local"
    if runner != "local" and not runner.startswith("batch:") or runner == "batch:":
        raise ValueError(f"--runner must be 'local' or 'batch:DIR', got {runner!r}")
    if args.round_size and runner == "local":
        raise ValueError("--round-size is the size of a round of --runner batch:DIR")
    counts: dict = {}  # workload -> how many times the stacks named run it
    for item in args.workloads:
        if item in networks.NETWORKS:
            found = {networks.conv_workload(w, args.batch): w.count for w in networks.network_workloads(item)}
        elif item.endswith((".keras", ".h5")):
            model = from_keras(item)
            found = tuning.counted_workloads(model, (args.batch, *model.batch_input_shape[1:]), args.gradients)
        else:
            found = dict.fromkeys(parse_workload(item, args.batch), 1)
        for workload, count in found.items():
            counts[workload] = counts.get(workload, 0) + count
    rpc = None
    if args.rpc_tracker or args.rpc_key:
        if not (args.rpc_tracker and args.rpc_key):
            raise ValueError("--rpc-tracker and --rpc-key go together")
        rpc = {"tracker": args.rpc_tracker, "key": args.rpc_key}
    elif args.rpc:
        rpc = args.rpc
    if runner.startswith("batch:"):
        if rpc is not None or args.time_budget:
            raise ValueError("--runner batch:DIR writes a round to time where it is taken: --rpc, --rpc-tracker and "
                             "--time-budget are for the local runner")
        # The device is out of reach, so the stacks' trials are shared by FLOPs (times how often each runs),
        # not by kernel times as the local runner shares them.
        budgets = tuning.trial_budgets(list(counts), args.trials, args.min_trials,
                                       [wl.flops * count for wl, count in counts.items()])
        directory = runner.removeprefix("batch:")
        _print_round(rounds.write_round(list(zip(counts, budgets, strict=True)), args.target, directory, args.log_dir,
                                        args.space, args.round_size or rounds.ROUND_CANDIDATES), directory)
        return 0
    _print_results(tuning.tune_workloads(list(counts), args.trials, args.target, args.log_dir, args.space, rpc,
                                         args.time_budget, min_trials=args.min_trials, counts=list(counts.values())),
                   "nothing to tune")
    return 0


def _print_results(results, empty: str) -> None:
    """A table of tuning.TuneResult: per workload its trials, errors and GFLOP/s (re-timed here)."""
    print(f"{'workload':44} {'trials':>6} {'errors':>6} {'default':>9} {'tuned':>9} {'tuner':>9}  GFLOP/s")
    for r in results:
        cells = [f"{v:9.1f}" if v else f"{'-':>9}" for v in (r.default_gflops, r.gflops, r.tuner_gflops)]
        stopped = f"  ({r.stopped})" if r.stopped else ""
        print(f"{r.workload.label:44} {r.trials:6d} {r.errors:6d} {' '.join(cells)}{stopped}")
    print(f"records: {results[0].folder}" if results else empty)


def _print_round(summary, directory: str) -> None:
    if summary is None:
        print(f"every workload has its trials: no round left in {directory}")
        return
    print(f"round {summary.round} in {directory}: {summary.kernels} kernels to time for {summary.workloads} workloads "
          f"({summary.failed_builds} candidates did not build). Time it where it runs with "
          f"`python -m tvmconv.timing {directory}` (on the GPU machine: scripts/gpu_device.sh run), then "
          f"`tvmconv tune --ingest {directory}`")


def export(args) -> int:
    """Compile a saved Keras model of Conv2D layers for a target into a bundle (tvmconv.runtime.load runs it)."""
    import tvmconv
    model = tvmconv.from_keras(args.model)
    shape = (args.batch, *model.batch_input_shape[1:])
    manifest = tvmconv.export(model, shape, args.output, target=args.target, sign=args.sign)
    print(f"{args.output}: {len(manifest['layers'])} layers for {manifest['target_key']}, input {tuple(shape)}, "
          f"outputs {[manifest['layers'][i]['output_shape'] for i in manifest['outputs']]}"
          + (f", signed with {args.sign}" if args.sign else ""))
    tuned = sum(layer["tuning"] is not None for layer in manifest["layers"])
    print(f"{tuned} of {len(manifest['layers'])} layers from tuning records, the rest with the template's defaults")
    return 0


def keygen(args) -> int:
    """Make an ed25519 key pair for signing bundles: PATH (private, mode 0600) and PATH.pub (public)."""
    from tvmconv import bundle
    fingerprint = bundle.generate_key(args.path)
    print(f"private key: {args.path} (sign with: tvmconv export MODEL -o DIR --sign {args.path})")
    print(f"public key:  {args.path}.pub (load with: runtime.load(DIR, trusted_keys=['{args.path}.pub']))")
    print(f"fingerprint: {fingerprint}")
    return 0


def serve(args) -> int:
    """Serve a bundle over HTTP: the Open Inference Protocol (/v2/...), /predict, /health, /metadata, /metrics."""
    from tvmconv import serving
    options = serving.Options(
        model_name=args.model_name, trusted_keys=tuple(args.trusted_key), threads=args.threads,
        concurrency=args.concurrency, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
        max_request_bytes=args.max_request_mb << 20, max_buffered_bytes=args.max_buffered_mb << 20,
        header_timeout=args.header_timeout, body_timeout=args.body_timeout, drain_timeout=args.drain_timeout,
        token_file=args.token_file, docs=args.docs)
    serving.run(args.bundle, options, host=args.host, port=args.port)
    return 0


def logs(args) -> int:
    """Inspect and maintain tuning logs."""
    from tvmconv import records
    root = args.log_dir or records.user_root()
    if args.logs_command == "list":
        for folder in records.target_folders(root):
            print(f"{folder}")
            print(f"  {'workload':48} {'trials':>6} {'records':>7} {'tuner GF/s':>10} {'re-timed':>9} "
                  f"{'defaults':>9} {'builds use':10}  date")
            for row in records.summarize(folder):
                tuner, retimed, default = (f"{row[name]:{width}.1f}" if row[name] else f"{'-':>{width}}" for name, width
                                           in (("tuner_gflops", 10), ("retimed_gflops", 9), ("default_gflops", 9)))
                used = "record" if row["used"] else "defaults"
                print(f"  {row['workload'].label:48} {row['trials']:6d} {row['records']:7d} {tuner} {retimed} "
                      f"{default} {used:10}  {row['date'] or '-'}")
        return 0
    if args.logs_command == "merge":
        for source_root in args.sources:
            for folder in records.target_folders(source_root):
                destination = os.path.join(root, os.path.basename(folder))
                added = records.merge([folder], destination)
                print(f"{folder} -> {destination}: {added} new records")
        return 0
    if args.logs_command == "retime":
        from tvmconv import tuning
        _print_results(tuning.retime(args.target, root), f"no records for {args.target or 'this host'} in {root}")
        return 0
    for folder in records.target_folders(root):
        before, after = records.prune(folder, args.keep)
        print(f"{folder}: {before} records -> {after}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tvmconv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help=demo.__doc__)
    demo_parser.add_argument("--size", type=int, default=56, help="input height and width (default 56)")
    demo_parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    demo_parser.set_defaults(run=demo)

    tune_parser = commands.add_parser("tune", help=tune.__doc__, description=tune.__doc__)
    tune_parser.add_argument("workloads", nargs="*", metavar="WORKLOAD",
                             help="a named set (resnet50, mobilenet_v2, resnext50, vgg16), a Keras model file "
                                  "(.keras/.h5) or a workload HxWxC:FILTERS:KHxKW[:name=value...]")
    tune_parser.add_argument("--trials", type=int, default=64,
                             help="records wanted: a lone workload's count; for several, the total, split by "
                                  "FLOP share (default 64)")
    tune_parser.add_argument("--min-trials", type=int, default=64,
                             help="the least records for each of several workloads (default 64)")
    tune_parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    tune_parser.add_argument("--target", default=None, type=target_argument,
                             help="a preset (x86-avx2, aarch64, ...) or a target dict as JSON; default: this host")
    tune_parser.add_argument("--log-dir", default=None,
                             help="default $TVMCONV_TUNING_LOGS or ~/.cache/tvmconv/tuning_logs")
    tune_parser.add_argument("--space", choices=("template", "auto", "both"), default="template")
    tune_parser.add_argument("--gradients", action="store_true",
                             help="with a model file: also the forward workloads that training runs")
    tune_parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS")
    tune_parser.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT",
                             help="measure on devices of this tracker")
    tune_parser.add_argument("--rpc-key", default=None, help="the device key at the tracker")
    tune_parser.add_argument("--rpc", default=None, metavar="HOST:PORT", help="measure on this RPC server (no tracker)")
    tune_parser.add_argument("--runner", default=None, metavar="local|batch:DIR",
                             help="local (default: measure here or over --rpc) or batch:DIR: write a round of "
                                  "built candidates into DIR, to time where they run (python -m tvmconv.timing DIR)")
    tune_parser.add_argument("--round-size", type=int, default=None, metavar="N",
                             help="candidates per round with --runner batch:DIR (default 256)")
    tune_parser.add_argument("--ingest", default=None, metavar="DIR",
                             help="commit the timed round in DIR to the log dir, then write the next round there")
    tune_parser.set_defaults(run=tune)

    export_parser = commands.add_parser("export", help=export.__doc__, description=export.__doc__)
    export_parser.add_argument("model", help="a saved Keras model (.keras or .h5) whose layers are Conv2D")
    export_parser.add_argument("-o", "--output", required=True, help="the bundle folder to write")
    export_parser.add_argument("--target", default="host", type=target_argument,
                               help="host (default), a preset such as aarch64, or a target dict as JSON")
    export_parser.add_argument("--batch", type=int, default=1, help="the batch size compiled for (default 1)")
    export_parser.add_argument("--sign", default=None, metavar="KEYFILE",
                               help="sign the bundle with this private key (tvmconv keygen)")
    export_parser.set_defaults(run=export)

    keygen_parser = commands.add_parser("keygen", help=keygen.__doc__, description=keygen.__doc__)
    keygen_parser.add_argument("path", metavar="PATH", help="the private key file to write (PATH.pub: the public key)")
    keygen_parser.set_defaults(run=keygen)

    serve_parser = commands.add_parser("serve", help=serve.__doc__, description=serve.__doc__)
    serve_parser.add_argument("bundle", help="a folder written by tvmconv export")
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=8000)
    serve_parser.add_argument("--model-name", default=None,
                              help="the model's name in /v2/models/NAME (default: the bundle folder's name)")
    serve_parser.add_argument("--trusted-key", action="append", default=[], metavar="PUB",
                              help="a public key (PEM file) whose signature the bundle must carry; repeat for several")
    serve_parser.add_argument("--token-file", default=None, metavar="FILE",
                              help="require `Authorization: Bearer TOKEN` (the file's content) on every endpoint but "
                                   "the health probes")
    serve_parser.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (off by default)")
    serve_parser.add_argument("--threads", type=int, default=None,
                              help="kernel threads per model call (default: TVM_NUM_THREADS, else every CPU)")
    serve_parser.add_argument("--concurrency", type=int, default=None,
                              help="model calls at once (default 4; with --max-batch, 1: concurrent batches are short)")
    serve_parser.add_argument("--max-batch", type=int, default=None, metavar="N",
                              help="dynamic batching: merge concurrent requests into calls of N samples (the bundle "
                                   "must be exported at batch N)")
    serve_parser.add_argument("--max-delay-ms", type=float, default=5.0, metavar="T",
                              help="with --max-batch: how long a request waits for others (default 5 ms)")
    serve_parser.add_argument("--max-request-mb", type=int, default=64, help="largest request body (default 64 MiB)")
    serve_parser.add_argument("--max-buffered-mb", type=int, default=256,
                              help="request bodies held at once, all requests together (default 256 MiB)")
    serve_parser.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                              help="for a request's headers to arrive (default 10)")
    serve_parser.add_argument("--body-timeout", type=float, default=60.0, metavar="SECONDS",
                              help="for a request's body to arrive, and for room under --max-buffered-mb (default 60)")
    serve_parser.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                              help="on SIGTERM, how long requests in flight may take to finish (default 30)")
    serve_parser.set_defaults(run=serve)

    logs_parser = commands.add_parser("logs", help=logs.__doc__)
    logs_commands = logs_parser.add_subparsers(dest="logs_command", required=True)
    for name, text in (("list", "per target and workload: trials, best GFLOP/s, date"),
                       ("merge", "merge other log roots into this one"),
                       ("prune", "keep only the fastest records per workload"),
                       ("retime", "re-time each workload's best record against the defaults here, tuning nothing "
                                  "(after a change of the defaults, or a busy machine's timing)")):
        sub = logs_commands.add_parser(name, help=text)
        sub.add_argument("--log-dir", default=None, help="default $TVMCONV_TUNING_LOGS or ~/.cache/tvmconv/tuning_logs")
        if name == "merge":
            sub.add_argument("sources", nargs="+", metavar="LOG_ROOT")
        if name == "prune":
            sub.add_argument("--keep", type=int, default=8, help="records kept per workload (default 8)")
        if name == "retime":
            sub.add_argument("--target", default=None, type=target_argument,
                             help="the records' target, which must run here: a preset or a target dict as JSON; "
                                  "default: this host")
        sub.set_defaults(run=logs)

    args = parser.parse_args(argv)
    if getattr(args, "size", 3) < 3 or getattr(args, "batch", 1) < 1:
        parser.error("--size must be at least 3 and --batch at least 1")
    for name in ("trials", "min_trials", "keep", "round_size"):  # serve's numbers: serving.Options checks them
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        return args.run(args)
    except (TypeError, ValueError, OSError) as err:  # bad arguments, damaged logs, missing files: a message
        print(f"tvmconv {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
