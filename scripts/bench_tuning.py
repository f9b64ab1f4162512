"""What tuning buys a CPU that has no records yet: tune a network stack from scratch with a time budget, then
benchmark the stack against the peers with and without the new records.

    .venv/bin/python scripts/bench_tuning.py --network resnet50 --time-budget 1800
    .venv/bin/python scripts/bench_tuning.py --network mobilenet_v2 --time-budget 1800 --markdown out.md

Step 1 runs the command a new user runs, in its own process, into a fresh log dir (`--log-dir`, default a
temporary folder): `tvmconv tune NETWORK --time-budget SECONDS --log-dir DIR`. Records of other CPUs with
the same vector ISA seed its search (tvmconv.tuning), as they would for that user. Step 2 runs
scripts/bench.py on the stack with `tvmconv` (the new records apply), `tvmconv-defaults` (no record) and
the peers, each in its own process, and reports both stack ratios to the best peer.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PEERS = "tvmconv,tvmconv-defaults,torch-packed,onnxruntime,openvino"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", default="resnet50", help="a network stack (default resnet50)")
    parser.add_argument("--time-budget", type=float, default=1800, help="tuning seconds (default 1800)")
    parser.add_argument("--trials", type=int, default=20000, help="trials wanted in all; the budget ends it first")
    parser.add_argument("--log-dir", type=pathlib.Path, help="where the records go (default: a fresh temporary folder)")
    parser.add_argument("--peers", default=PEERS, help=f"bench.py's peers (default {PEERS})")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--json", type=pathlib.Path, help="bench.py's results file")
    parser.add_argument("--markdown", type=pathlib.Path, help="bench.py's Markdown report")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tvmconv-tuning-") as scratch:
        log_dir = args.log_dir or pathlib.Path(scratch)
        started = time.perf_counter()
        tune = [sys.executable, "-m", "tvmconv.cli", "tune", args.network, "--trials", str(args.trials),
                "--min-trials", "16", "--time-budget", str(args.time_budget), "--log-dir", str(log_dir)]
        print("$ " + " ".join(tune), flush=True)
        if subprocess.run(tune, cwd=REPO_ROOT).returncode:
            return 1
        tuning_minutes = (time.perf_counter() - started) / 60
        json_path = args.json or REPO_ROOT / "bench_results" / f"tuning-{args.network}-{int(time.time())}.json"
        bench = [sys.executable, str(REPO_ROOT / "scripts" / "bench.py"), "--networks", args.network, "--peers",
                 args.peers, "--log-dir", str(log_dir), "--json", str(json_path),
                 "--batch", *map(str, args.batch)] + (["--markdown", str(args.markdown)] if args.markdown else [])
        print("$ " + " ".join(bench), flush=True)
        status = subprocess.run(bench, cwd=REPO_ROOT, env=dict(os.environ)).returncode
    results = json.loads(json_path.read_text())
    for stack in results["summary"]["stacks"]:
        print(f"{stack['network']} batch {stack['batch']}: after {tuning_minutes:.0f} min of tuning "
              f"{stack.get('tvmconv_ratio', float('nan')):.3f}x the best peer ({stack.get('best_peer')}); "
              f"the defaults {stack.get('tvmconv-defaults_ratio', float('nan')):.3f}x")
    return status


if __name__ == "__main__":
    sys.exit(main())
