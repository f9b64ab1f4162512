"""Drive a `tvmconv serve` endpoint on 127.0.0.1 and report latency percentiles, throughput and errors.

    .venv/bin/tvmconv serve BUNDLE --port 8000 &
    .venv/bin/python scripts/loadtest.py --url http://127.0.0.1:8000 --requests 500 --concurrency 8

Requests are bounded by count (--requests) and by time (--duration); each sends one random batch
(--batch samples, shaped from /metadata) as npy bytes, or as JSON with --json. A response counts as
an error unless it is 200 with the expected output shape.
"""
import argparse
import concurrent.futures
import io
import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np


def fetch_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=200, help="at most this many requests (default 200)")
    parser.add_argument("--duration", type=float, default=60.0, help="stop sending after SECONDS (default 60)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    parser.add_argument("--batch", type=int, default=1, help="samples per request (default 1)")
    parser.add_argument("--json", action="store_true", help='send {"inputs": ...} JSON instead of npy bytes')
    args = parser.parse_args(argv)
    if args.url.split("://", 1)[-1].split(":")[0].split("/")[0] not in ("127.0.0.1", "localhost"):
        parser.error("loadtest only drives a server on 127.0.0.1")

    meta = fetch_json(args.url + "/metadata")
    shape = (args.batch, *meta["input"]["shape"][1:])
    expected = (args.batch, *meta["outputs"][0]["shape"][1:])
    x = np.random.default_rng(0).standard_normal(shape).astype(meta["input"]["dtype"])
    if args.json:
        body, kind = json.dumps({"inputs": x.tolist()}).encode(), "application/json"
    else:
        buffer = io.BytesIO()
        np.save(buffer, x)
        body, kind = buffer.getvalue(), "application/x-npy"

    deadline = time.monotonic() + args.duration
    latencies, errors, lock = [], [], threading.Lock()

    def one(_):
        if time.monotonic() > deadline:
            return
        start = time.perf_counter()
        try:
            request = urllib.request.Request(args.url + "/predict", data=body, headers={"Content-Type": kind})
            with urllib.request.urlopen(request, timeout=60) as response:
                payload = response.read()
            y = (np.asarray(json.loads(payload)["outputs"]) if args.json else np.load(io.BytesIO(payload)))
            if y.shape != expected:
                raise ValueError(f"output shape {y.shape}, expected {expected}")
            with lock:
                latencies.append(time.perf_counter() - start)
        except (urllib.error.URLError, ValueError, OSError) as err:
            with lock:
                errors.append(str(err))

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(one, range(args.requests)))
    elapsed = time.perf_counter() - started

    done = len(latencies)
    report = {
        "url": args.url, "input_shape": list(shape), "body": kind, "concurrency": args.concurrency,
        "requests_ok": done, "errors": len(errors), "seconds": elapsed,
        "throughput_rps": done / elapsed if elapsed else 0.0,
        "throughput_samples_per_s": done * args.batch / elapsed if elapsed else 0.0,
        "latency_ms": {"p50": 1e3 * statistics.median(latencies) if latencies else None,
                       "p99": 1e3 * float(np.percentile(latencies, 99)) if latencies else None,
                       "max": 1e3 * max(latencies) if latencies else None},
        "first_errors": errors[:3],
    }
    print(json.dumps(report, indent=1))
    return 0 if not errors and done else 1


if __name__ == "__main__":
    sys.exit(main())
