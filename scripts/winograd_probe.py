"""Probe: would Winograd F(m, 3) beat tvmconv's direct kernels on the 3x3 stride-1 layers of ResNet-50?

Not a tvmconv code path yet: this script builds F(m, 3) for NHWC "same" convolutions from three kernels
and times each against the direct kernel tvmconv runs today (its defaults and records, as any build):

  1. input transform  V = Bᵀ d B per tile of the padded input (TE, written out with the matrix entries
                      as constants, rows then columns, channels in vectors, tiles in parallel);
  2. batched GEMM     M[g] = V[g] · U[g] for the alpha² points g (alpha = m + 2): tvmconv's own grouped 1x1
                      convolution with alpha² groups, its default knobs; U = G w Gᵀ is made once from the
                      weights, in float64 (it would be part of the packed weights);
  3. output transform Y = Aᵀ M A per tile, cropped to the output (TE, the same way as 1).

Every result is checked against tvmconv.reference (float64) before it is timed; the error is reported.
Times are medians of TVM's time evaluator (as bench.py's "kernel" column), on this machine's target.
Run on an idle machine, from the repository root:

    .venv/bin/python scripts/winograd_probe.py                 # ResNet-50's 3x3 stride-1 layers, batch 1
    .venv/bin/python scripts/winograd_probe.py --batch 8 --tile 2 4
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys

import numpy as np
import tvm
from tvm import s_tir, te
from tvm.topi.nn import winograd_util

import tvmconv
from tvmconv import reference, targets, timing
from tvmconv.networks import network_workloads

LANES = 16  # channels per vector in the transforms (AVX-512 fp32; on AVX2 LLVM splits them in two)


def transform_matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A (alpha x m), B (alpha x alpha), G (alpha x 3) of F(m, 3), from TVM's Cook-Toom construction."""
    points = winograd_util._interpolation_points(m + 2)
    return tuple(np.asarray(a, np.float64) for a in winograd_util._cook_toom_convolution(points, m, 3))


def _weighted_sum(terms):
    """sum(coefficient * value), the coefficients Python numbers: zeros dropped, ±1 without a multiply."""
    total = None
    for coefficient, value in terms:
        if coefficient == 0:
            continue
        term = value if coefficient == 1 else -value if coefficient == -1 else value * float(coefficient)
        total = term if total is None else total + term
    return total


def _select(index, count: int, expr_for):
    """expr_for(i) where index == i: once the loop over `index` is unrolled, each copy folds to one branch."""
    expr = expr_for(count - 1)
    for i in range(count - 2, -1, -1):
        expr = tvm.tirx.Select(index == i, expr_for(i), expr)
    return expr


def input_transform(n: int, h: int, w: int, c: int, m: int):
    """PrimFunc x (n, h, w, c) -> V (tiles, alpha, alpha, c): V = Bᵀ d B of each tile's padded window."""
    alpha, (_, b, _) = m + 2, transform_matrices(m)
    rows, cols = math.ceil(h / m), math.ceil(w / m)
    x = te.placeholder((n, h, w, c), "float32", name="x")

    def window(p, i, j, ch):  # the tile's input, zero outside the image ("same": one pixel of padding)
        image, tile = p // (rows * cols), p % (rows * cols)
        y, z = (tile // cols) * m + i - 1, (tile % cols) * m + j - 1
        inside = tvm.tirx.all(y >= 0, y < h, z >= 0, z < w)
        return tvm.tirx.if_then_else(inside, x[image, y, z, ch], tvm.tirx.const(0, "float32"))
    t = te.compute((n * rows * cols, alpha, alpha, c), lambda p, i, nu, ch: _select(
        nu, alpha, lambda k: _weighted_sum((b[j, k], window(p, i, j, ch)) for j in range(alpha))), name="T")
    v = te.compute((n * rows * cols, alpha, alpha, c), lambda p, eps, nu, ch: _select(
        eps, alpha, lambda k: _weighted_sum((b[i, k], t[p, i, nu, ch]) for i in range(alpha))), name="V")
    sch = s_tir.Schedule(te.create_prim_func([x, v]))
    p, eps, nu, ch = sch.get_loops(sch.get_sblock("V"))
    outer, inner = sch.split(ch, [None, LANES])
    sch.reorder(p, outer, eps, nu, inner)
    sch.parallel(p)
    sch.unroll(eps)
    sch.unroll(nu)
    sch.vectorize(inner)
    rows_block = sch.get_sblock("T")
    sch.compute_at(rows_block, outer)
    i, nu, ch = sch.get_loops(rows_block)[-3:]
    sch.unroll(i)
    sch.unroll(nu)
    sch.vectorize(ch)
    return sch.mod["main"]


def output_transform(n: int, h: int, w: int, k: int, m: int):
    """PrimFunc M (1, 1, tiles, alpha² k) -> y (n, h, w, k): y = Aᵀ M A per tile, cropped."""
    alpha, (a, _, _) = m + 2, transform_matrices(m)
    rows, cols = math.ceil(h / m), math.ceil(w / m)
    tiles = n * rows * cols
    gemm_out = te.placeholder((1, 1, tiles, alpha * alpha * k), "float32", name="M")
    s = te.compute((tiles, alpha, m, k), lambda p, i, jj, f: _select(
        jj, m, lambda q: _weighted_sum((a[j, q], gemm_out[0, 0, p, (i * alpha + j) * k + f]) for j in range(alpha))),
        name="S")

    def out(image, y, z, f):
        p = image * rows * cols + (y // m) * cols + z // m
        return _select(y % m, m, lambda q: _weighted_sum((a[i, q], s[p, i, z % m, f]) for i in range(alpha)))
    result = te.compute((n, h, w, k), out, name="Y")
    sch = s_tir.Schedule(te.create_prim_func([gemm_out, result]))
    p, i, jj, f = sch.get_loops(sch.get_sblock("S"))
    outer, inner = sch.split(f, [None, LANES])
    sch.reorder(p, outer, i, jj, inner)
    sch.parallel(p)
    sch.unroll(i)
    sch.unroll(jj)
    sch.vectorize(inner)
    image, y, _, f = sch.get_loops(sch.get_sblock("Y"))
    _, inner = sch.split(f, [None, LANES])
    sch.parallel(sch.fuse(image, y))
    sch.vectorize(inner)
    return sch.mod["main"]


def _median_us(evaluate, *arguments) -> float:
    return statistics.median(evaluate(*arguments)) * 1e6


def _timed(func, target, arrays: list[np.ndarray]) -> tuple[float, np.ndarray]:
    """(median µs of the compiled func on `arrays`, its last argument after a run)."""
    module = tvm.compile(func, target=target).mod
    tensors = [tvm.runtime.tensor(array, tvm.cpu()) for array in arrays]
    module["main"](*tensors)
    return _median_us(timing.time_evaluator(module, "main", "cpu", 20, 15), *tensors), tensors[-1].numpy()


def _kernel_us(layer: tvmconv.Conv2D, x: np.ndarray) -> float:
    """Median µs of the compiled kernel tvmconv runs for `layer` on x (as bench.py's "kernel" column)."""
    return _median_us(layer.compiled_kernel(x.shape).time_evaluator(number=20, repeat=15), *layer.kernel_arguments(x))


def probe(name: str, batch: int, h: int, w: int, c: int, k: int, m: int, target) -> dict:
    alpha, (_, _, g) = m + 2, transform_matrices(m)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (batch, h, w, c)).astype(np.float32)
    weights = (rng.uniform(-1, 1, (3, 3, c, k)) * math.sqrt(3 / (9 * c))).astype(np.float32)
    tiles = batch * math.ceil(h / m) * math.ceil(w / m)
    t_in, v = _timed(input_transform(batch, h, w, c, m), target, [x, np.empty((tiles, alpha, alpha, c), np.float32)])
    v = v.reshape(1, 1, tiles, alpha * alpha * c)  # the grouped 1x1 convolution's channels: (point, channel)
    u = np.einsum("ea,abck,fb->efck", g, weights.astype(np.float64), g).reshape(alpha * alpha, c, k)
    gemm = tvmconv.Conv2D(alpha * alpha * k, 1, groups=alpha * alpha, use_bias=False, dtype="float32")
    gemm.build(v.shape)
    gemm.set_weights([np.concatenate(list(u), axis=1)[None, None].astype(np.float32)])  # group g: filters g*k...
    products = np.array(gemm(v))
    t_gemm = _kernel_us(gemm, v)
    t_out, y = _timed(output_transform(batch, h, w, k, m), target, [products, np.empty((batch, h, w, k), np.float32)])
    expected = reference.conv2d(x, weights, None, padding="same")
    error = float(np.abs(y - expected).max() / np.abs(expected).max())
    direct = tvmconv.Conv2D(k, 3, padding="same", use_bias=False, dtype="float32")
    direct.build(x.shape)
    direct.set_weights([weights])
    t_direct = _kernel_us(direct, x)
    total = t_in + t_gemm + t_out
    return {"layer": name, "tile": m, "input": t_in, "gemm": t_gemm, "output": t_out, "total": total,
            "direct": t_direct, "speedup": t_direct / total, "error": error,
            "gflops": 2 * batch * h * w * c * k * 9 / 1e3}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--tile", type=int, nargs="+", default=[4], choices=[2, 4, 6],
                        help="output tile m of F(m, 3) (default 4)")
    args = parser.parse_args(argv)
    target = targets.resolve(targets.host())
    print(f"target {target.attrs.get('mcpu', '?')}, batch {args.batch}, TVM {tvm.__version__}")
    print("| layer | F(m,3) | input transform µs | GEMM µs | output transform µs | total µs | direct µs "
          "| speedup | effective GF/s | direct GF/s | max error / max |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for workload in network_workloads("resnet50"):
        s = workload.spec
        if s.kernel != 3 or s.stride != 1 or s.groups != 1:
            continue
        for m in args.tile:
            r = probe(workload.name, args.batch, s.height, s.width, s.in_channels, s.filters, m, target)
            print(f"| {r['layer']} | F({m},3) | {r['input']:.0f} | {r['gemm']:.0f} | {r['output']:.0f} | "
                  f"{r['total']:.0f} | {r['direct']:.0f} | {r['speedup']:.2f}x | {r['gflops'] / r['total']:.0f} | "
                  f"{r['gflops'] / r['direct']:.0f} | {r['error']:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
