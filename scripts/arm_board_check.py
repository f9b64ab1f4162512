"""Check an aarch64 TVM RPC board end to end: cross-compile a small elementwise FMA kernel
(d = a * b + c, NEON-vectorized) for aarch64, upload it, run it on the board and compare with
numpy. Prints OK or FAIL with the maximum error; exits 0 on OK, 1 on FAIL.

    scripts/arm_board.sh start && .venv/bin/python scripts/arm_board_check.py --port 9095
    (through a tracker: arm_board.sh start --tracker 127.0.0.1:9190 --key K, then --port 9190 --key K)

Needs TVM on this host and the cross compiler aarch64-linux-gnu-g++
(apt-get install g++-aarch64-linux-gnu).
"""
import argparse
import os
import shutil
import socket
import sys
import tempfile

import numpy as np
import tvm
from tvm import rpc, s_tir, te
from tvm.support import cc

AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"],
           "num-cores": 2}
CROSS_CXX = "aarch64-linux-gnu-g++"
EM_AARCH64 = 183  # ELF e_machine of aarch64


def fma_kernel(n):
    a, b, c = (te.placeholder((n,), "float32", name=name) for name in "abc")
    d = te.compute((n,), lambda i: a[i] * b[i] + c[i], name="d")
    sch = s_tir.Schedule(te.create_prim_func([a, b, c, d]))
    _outer, inner = sch.split(sch.get_loops(sch.get_sblock("d"))[0], factors=[None, 4])
    sch.vectorize(inner)  # 4 x float32: one NEON register
    return sch.mod["main"]


def elf_machine(path):
    with open(path, "rb") as lib:
        header = lib.read(20)
    return int.from_bytes(header[18:20], "little") if header[:4] == b"\x7fELF" else None


def run_remote(host, port, key, path, arrays):
    """Upload the library at path, run its main on the board's CPU, return the last array.
    With a key, host:port is a tracker and the board is requested from it under that key."""
    if key:
        socket.create_connection((host, port), timeout=5).close()  # connect_tracker retries for 60 s
        tracker = rpc.connect_tracker(host, port)
        if key not in tracker.summary()["queue_info"]:  # request() would wait for one forever
            raise RuntimeError(f"no server registered under key {key!r} at tracker {host}:{port}")
        session = tracker.request(key, session_timeout=120)
    else:
        session = rpc.connect(host, port, session_timeout=120)
    session.upload(path)
    kernel = session.load_module(os.path.basename(path))
    remote = [tvm.runtime.tensor(x, session.cpu()) for x in arrays]
    kernel["main"](*remote)
    return remote[-1].numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="RPC server address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9095, help="RPC server port (default 9095)")
    parser.add_argument("--key", help="request the board under this key from a tracker at --host:--port")
    parser.add_argument("--n", type=int, default=1024, help="vector length, a multiple of 4 (default 1024)")
    args = parser.parse_args()
    if args.n <= 0 or args.n % 4:
        parser.error(f"--n must be a positive multiple of 4, got {args.n}")
    if shutil.which(CROSS_CXX) is None:
        print(f"FAIL: {CROSS_CXX} not found (apt-get install g++-aarch64-linux-gnu)")
        return 1

    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(args.n).astype("float32") for _ in range(3))
    with tempfile.TemporaryDirectory(prefix="arm_board_check_") as tmp:
        path = os.path.join(tmp, "fma_aarch64.so")
        tvm.compile(fma_kernel(args.n), target=tvm.target.Target(AARCH64)).export_library(
            path, fcompile=cc.cross_compiler(CROSS_CXX))
        if elf_machine(path) != EM_AARCH64:
            print(f"FAIL: {CROSS_CXX} did not produce an aarch64 shared library")
            return 1
        try:
            got = run_remote(args.host, args.port, args.key, path, (a, b, c, np.zeros(args.n, "float32")))
        except (RuntimeError, OSError) as err:  # TVM errors are RuntimeErrors: report them as a FAIL
            print(f"FAIL: RPC to {args.host}:{args.port}: {type(err).__name__}: {str(err).strip().splitlines()[-1]}")
            return 1

    expected = a.astype("float64") * b + c  # exact up to the float32 rounding of the result
    err = float(np.max(np.abs(got - expected)))
    tol = 4 * float(np.finfo("float32").eps) * float(np.max(np.abs(expected)) + 1.0)
    status = "OK" if err <= tol else "FAIL"
    where = f"{args.host}:{args.port}" + (f" key {args.key}" if args.key else "")
    print(f"{status}: fma n={args.n} on {where} (aarch64 NEON, cross-compiled with "
          f"{CROSS_CXX}), max abs error {err:.3g} (tolerance {tol:.3g})")
    return 0 if status == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
