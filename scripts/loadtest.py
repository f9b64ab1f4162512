"""Drive `tvmconv serve` on 127.0.0.1 and report throughput, latency percentiles and errors.

A running server (one JSON report):

    .venv/bin/tvmconv serve BUNDLE --port 8000 &
    .venv/bin/python scripts/loadtest.py --url http://127.0.0.1:8000 --requests 500 --concurrency 8

With and without dynamic batching (starts `tvmconv serve BUNDLE` twice on free ports, unbatched and
with --max-batch N, drives both with the same load, prints a table for docs/benchmarks.md):

    .venv/bin/python scripts/loadtest.py --bundle BUNDLE8 --unbatched-bundle BUNDLE1 --max-batch 8 --concurrency 8

BUNDLE8 is the model exported at batch 8 (what the batching server merges requests into), BUNDLE1 the same
model exported at batch 1 (what a server without batching should run: a request of one sample, unpadded).

Requests are bounded by count (--requests) and by time (--duration); each sends one random batch
(--batch samples, shaped from /metadata) as npy bytes to /predict, or as JSON with --json. A response
counts as an error unless it is 200 with the expected output shape. --warmup requests go first, unmeasured.
"""
import argparse
import concurrent.futures
import contextlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np


def fetch_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def drive(url: str, requests: int, duration: float, concurrency: int, batch: int, as_json: bool, warmup: int) -> dict:
    meta = fetch_json(url + "/metadata")
    shape = (batch, *meta["input"]["shape"][1:])
    expected = (batch, *meta["outputs"][0]["shape"][1:])
    x = np.random.default_rng(0).standard_normal(shape).astype(meta["input"]["dtype"])
    if as_json:
        body, kind = json.dumps({"inputs": x.tolist()}).encode(), "application/json"
    else:
        buffer = io.BytesIO()
        np.save(buffer, x)
        body, kind = buffer.getvalue(), "application/x-npy"

    latencies, errors, lock = [], [], threading.Lock()
    deadline = None

    def one(measured: bool):
        if measured and time.monotonic() > deadline:
            return
        start = time.perf_counter()
        try:
            request = urllib.request.Request(url + "/predict", data=body, headers={"Content-Type": kind})
            with urllib.request.urlopen(request, timeout=120) as response:
                payload = response.read()
            y = np.asarray(json.loads(payload)["outputs"]) if as_json else np.load(io.BytesIO(payload))
            if y.shape != expected:
                raise ValueError(f"output shape {y.shape}, expected {expected}")
            if measured:
                with lock:
                    latencies.append(time.perf_counter() - start)
        except (urllib.error.URLError, ValueError, OSError) as err:
            with lock:
                errors.append(str(err))

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, [False] * warmup))
        deadline = time.monotonic() + duration
        started = time.perf_counter()
        list(pool.map(one, [True] * requests))
        elapsed = time.perf_counter() - started

    done = len(latencies)
    return {
        "url": url, "input_shape": list(shape), "body": kind, "concurrency": concurrency,
        "requests_ok": done, "errors": len(errors), "seconds": elapsed,
        "throughput_rps": done / elapsed if elapsed else 0.0,
        "throughput_samples_per_s": done * batch / elapsed if elapsed else 0.0,
        "latency_ms": {"p50": 1e3 * statistics.median(latencies) if latencies else None,
                       "p99": 1e3 * float(np.percentile(latencies, 99)) if latencies else None,
                       "max": 1e3 * max(latencies) if latencies else None},
        "first_errors": errors[:3],
    }


@contextlib.contextmanager
def serve(bundle: str, flags: list[str]):
    """`tvmconv serve BUNDLE FLAGS` on a free port of 127.0.0.1 (this interpreter's tvmconv); its URL once live."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "tvmconv.cli", "serve", bundle, "--port", str(port), *flags],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"tvmconv serve {bundle} {' '.join(flags)} exited with {process.returncode}")
            try:
                urllib.request.urlopen(url + "/v2/health/ready", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not come up within 120 s") from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(60)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, http://127.0.0.1:PORT")
    target.add_argument("--bundle", help="start servers for this bundle, without and with batching")
    parser.add_argument("--unbatched-bundle", default=None,
                        help="with --bundle: the same model exported at batch 1, for the server without batching "
                             "(default: --bundle itself, which pads each request to its exported batch)")
    parser.add_argument("--max-batch", type=int, default=None, help="with --bundle: the batched server's --max-batch")
    parser.add_argument("--max-delay-ms", type=float, default=5.0, help="with --bundle: its --max-delay-ms (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="with --bundle: the servers' --threads")
    parser.add_argument("--server-concurrency", type=int, default=None,
                        help="with --bundle: the servers' --concurrency")
    parser.add_argument("--requests", type=int, default=200, help="at most this many requests (default 200)")
    parser.add_argument("--duration", type=float, default=60.0, help="stop sending after SECONDS (default 60)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    parser.add_argument("--batch", type=int, default=1, help="samples per request (default 1)")
    parser.add_argument("--warmup", type=int, default=8, help="unmeasured requests first (default 8)")
    parser.add_argument("--json", action="store_true", help='send {"inputs": ...} JSON instead of npy bytes')
    args = parser.parse_args(argv)
    for name in ("requests", "concurrency", "batch", "max_batch", "threads", "server_concurrency"):
        if (getattr(args, name) or 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.duration <= 0 or args.warmup < 0:
        parser.error("--duration must be positive and --warmup at least 0")
    load = (args.requests, args.duration, args.concurrency, args.batch, args.json, args.warmup)

    if args.url:
        if args.url.split("://", 1)[-1].split(":")[0].split("/")[0] not in ("127.0.0.1", "localhost"):
            parser.error("loadtest only drives a server on 127.0.0.1")
        report = drive(args.url, *load)
        print(json.dumps(report, indent=1))
        return 0 if not report["errors"] and report["requests_ok"] else 1

    if args.max_batch is None:
        parser.error("--bundle needs --max-batch N (the batch the bundle was exported at)")
    for flag, path in (("--bundle", args.bundle), ("--unbatched-bundle", args.unbatched_bundle)):
        if path is not None and not os.path.isdir(path):
            parser.error(f"{flag} must be a bundle's folder (tvmconv export); {path!r} is not a folder")
    common = [flag for name, value in (("--threads", args.threads), ("--concurrency", args.server_concurrency))
              if value is not None for flag in (name, str(value))]
    if args.unbatched_bundle is None:
        print(f"note: the unbatched server runs {args.bundle} too, padding every request to its exported batch; "
              "--unbatched-bundle names a batch-1 export of the model, the fair baseline", file=sys.stderr)
    reports = {}
    for label, bundle, flags in (
            ("unbatched", args.unbatched_bundle or args.bundle, common),
            (f"--max-batch {args.max_batch} --max-delay-ms {args.max_delay_ms:g}", args.bundle,
             [*common, "--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms)])):
        with serve(bundle, flags) as url:
            reports[label] = drive(url, *load)
    print("| server | client concurrency | requests | errors | p50 ms | p99 ms | requests/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in reports.items():
        p50, p99 = (f"{r['latency_ms'][k]:.1f}" if r["latency_ms"][k] else "-" for k in ("p50", "p99"))
        print(f"| {label} | {args.concurrency} | {r['requests_ok']} | {r['errors']} | {p50} | {p99} | "
              f"{r['throughput_rps']:.1f} |")
    unbatched, batched = reports.values()
    if unbatched["requests_ok"] and batched["requests_ok"]:
        print(f"\nbatched / unbatched: throughput {batched['throughput_rps'] / unbatched['throughput_rps']:.2f}x, "
              f"p99 {batched['latency_ms']['p99'] / unbatched['latency_ms']['p99']:.2f}x")
    for label, r in reports.items():
        for error in r["first_errors"]:
            print(f"{label}: {error}", file=sys.stderr)
    return 0 if all(not r["errors"] and r["requests_ok"] for r in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
