"""What the benchmark scripts share: timers, the other-load check, the FMA peak, the machine's description.

Timings are medians of repeats that each last at least REPEAT_SECONDS, after warm-up; on a 2-core
machine any other process ruins them (a parallel kernel's thread then waits for a 4 ms scheduler
tick), so every timing is reported with the CPU share other processes took meanwhile.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import platform
import statistics
import subprocess
import time

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
REPEAT_SECONDS = 0.010      # each timed repeat runs the operation often enough to last this long
DISTURBED_PCT = 10.0        # other processes' CPU share above which a timing is suspect


def median(values) -> float:
    return float(statistics.median(values))


def geomean(values) -> float | None:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def calls_per_repeat(call) -> int:
    """How many calls make one repeat last REPEAT_SECONDS (warms the operation up on the way)."""
    for _ in range(2):
        call()
    fastest = math.inf
    for _ in range(3):
        start = time.perf_counter()
        call()
        fastest = min(fastest, time.perf_counter() - start)
    return max(1, math.ceil(REPEAT_SECONDS / max(fastest, 1e-9)))


@dataclasses.dataclass
class Timing:
    number: int
    seconds: list[float]  # per call, one per repeat

    @property
    def median(self) -> float:
        return median(self.seconds)

    def as_json(self) -> dict:
        return {"median_s": self.median, "min_s": min(self.seconds), "max_s": max(self.seconds),
                "number": self.number, "repeat": len(self.seconds), "seconds": self.seconds}


def _seconds_per_call(call, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        call()
    return (time.perf_counter() - start) / number


def time_call(call, repeat: int) -> Timing:
    """Seconds per call of a Python callable, one value per repeat, timed with perf_counter."""
    number = calls_per_repeat(call)
    return Timing(number, [_seconds_per_call(call, number) for _ in range(repeat)])


def time_call_and_kernel(call, compiled, arguments, repeat: int) -> dict[str, Timing]:
    """A call of tvmconv (`call`, e.g. layer(x)), the compiled kernel it runs called from Python on
    `arguments` made beforehand ("kernel_from_python": the FFI call), and that kernel alone ("kernel": TVM's
    time evaluator, back to back in C++), taking turns one repeat each, each turn starting with the next of
    the three: the machine's drift (10-40% over minutes here, and within a turn: whichever ran last was
    slower by 3-8% on ResNet-50's layers) then falls on all three alike, and their differences are the
    call's overhead."""
    number = calls_per_repeat(call)
    evaluator = compiled.time_evaluator(number=number, repeat=1)
    function = compiled.kernel.function
    timers = [("kernel", lambda: evaluator(*arguments)[0]),
              ("kernel_from_python", lambda: _seconds_per_call(lambda: function(*arguments), number)),
              ("call", lambda: _seconds_per_call(call, number))]
    turns = {name: [] for name, _ in timers}
    for turn in range(repeat):
        first = turn % len(timers)
        for name, timer in timers[first:] + timers[:first]:
            turns[name].append(timer())
    return {name: Timing(number, seconds) for name, seconds in turns.items()}


class OtherLoad:
    """Share of the CPUs that other processes used between start() and share().

    On a busy machine a thread of a parallel kernel waits for a scheduler tick (4 ms steps) and the
    timings mean nothing: with one of 2 cores taken, torch's 2-thread OpenMP conv3x3 fell from ~210 to
    ~15 GFLOP/s, a grouped one from ~130 to ~2. Busy time from /proc/stat minus this process's own CPU
    time (children included) says how much of that there was."""

    def __init__(self):
        self.start()

    @staticmethod
    def _busy_and_own() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        own = os.times()
        return ((user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"),
                own.user + own.system + own.children_user + own.children_system)

    def start(self) -> None:
        self._wall, self._sample = time.perf_counter(), self._busy_and_own()

    def share(self) -> float | None:
        """Percent of all CPUs' time taken by other processes since start(), or None if unknown."""
        sample, wall = self._busy_and_own(), time.perf_counter() - self._wall
        if sample is None or self._sample is None or wall <= 0:
            return None
        others = (sample[0] - self._sample[0]) - (sample[1] - self._sample[1])
        return max(0.0, 100.0 * others / (wall * (os.cpu_count() or 1)))


# ---------------------------------------------------------------- FMA peak


def _fma_peak_kernel(threads: int, accumulators: int, lanes: int, target):
    """A TVM kernel that does nothing but independent vector FMAs on registers, one task per thread:
    acc = acc * c + d on `accumulators` vectors of `lanes` floats, enough independent dependency chains to
    cover FMA latency times the FMA pipes, few enough to stay in registers with the two constants."""
    import tvm
    from tvm.script import tirx as T

    @T.prim_func
    def fma_peak(out: T.Buffer((threads, accumulators, lanes), "float32"), iterations: T.int32):
        for t in T.parallel(threads):
            acc = T.alloc_buffer((accumulators, lanes), "float32", scope="local")
            for a in T.unroll(accumulators):
                for lane in T.vectorized(lanes):
                    acc[a, lane] = T.Cast("float32", a + lane) * T.float32(0.001)
            for _ in range(iterations):
                for a in T.unroll(accumulators):
                    for lane in T.vectorized(lanes):
                        # Converges to 1: no overflow, no denormals, whatever the iteration count.
                        acc[a, lane] = acc[a, lane] * T.float32(0.9999) + T.float32(0.0001)
            for a in T.unroll(accumulators):
                for lane in T.vectorized(lanes):
                    out[t, a, lane] = acc[a, lane]

    return tvm.compile(tvm.IRModule({"main": fma_peak}), target=target).mod


def measure_fma_peak(threads: int, target, vector_bits: int) -> dict:
    """The host's float32 FMA throughput in GFLOP/s, measured with TVM (best of 7 runs of ~50 ms): the best,
    not the median, since a peak is what the cores can do and other work only slows it."""
    import tvm

    lanes = max(vector_bits // 32, 1)
    accumulators = 12 if vector_bits >= 512 else 10  # 32 zmm registers with AVX-512, 16 below
    module = _fma_peak_kernel(threads, accumulators, lanes, target)
    out = tvm.runtime.tensor(np.zeros((threads, accumulators, lanes), np.float32))
    flops_per_iteration = 2 * threads * accumulators * lanes
    load = OtherLoad()
    probe_iterations = 200_000
    probe = module.time_evaluator("main", tvm.cpu(), number=1, repeat=3)(out, probe_iterations).results
    iterations = max(probe_iterations, int(probe_iterations * 0.05 / min(probe)))
    seconds = module.time_evaluator("main", tvm.cpu(), number=1, repeat=7)(out, iterations).results
    return {"gflops": flops_per_iteration * iterations / min(seconds) / 1e9, "source": "measured (TVM FMA kernel)",
            "threads": threads, "lanes": lanes, "accumulators": accumulators, "other_load_pct": load.share()}


# ---------------------------------------------------------------- the machine


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    """The checkout's commit, "+dirty" with uncommitted changes; read-only (no index refresh)."""
    def git(*args):
        return subprocess.run(["git", "--no-optional-locks", "-C", str(REPO_ROOT), *args], check=False,
                              capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode:
            return None
        dirty = git("diff", "--quiet", "HEAD", "--").returncode == 1
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------- inputs


def random_inputs(workload, batch: int, seed: int):
    """Input (NHWC, 64-byte aligned) and Keras-layout weights of a networks.Workload, scaled for ~unit
    outputs; the same arrays in every process for the same seed."""
    s = workload.spec
    rng = np.random.default_rng(seed)
    raw = rng.uniform(-1.0, 1.0, (batch, s.height, s.width, s.in_channels)).astype(np.float32)
    x = np.empty(raw.nbytes + 64, np.uint8)
    offset = -x.ctypes.data % 64
    x = x[offset:offset + raw.nbytes].view(np.float32).reshape(raw.shape)
    x[...] = raw
    fan_in = s.kernel * s.kernel * (s.in_channels // s.groups)
    weights = rng.uniform(-1.0, 1.0, (s.kernel, s.kernel, s.in_channels // s.groups, s.filters))
    return x, (weights * math.sqrt(3.0 / fan_in)).astype(np.float32)


def keras_pads(workload) -> tuple[int, int, int, int]:
    """Keras "same" (or "valid") padding of a networks.Workload: (top, left, bottom, right); with stride 2
    Keras/TF put the odd extra pixel at the bottom/right."""
    from tvmconv.compute import same_padding
    s = workload.spec
    if workload.padding == "valid":
        return (0, 0, 0, 0)
    top, bottom = same_padding(s.height, s.kernel, s.stride, 1)
    left, right = same_padding(s.width, s.kernel, s.stride, 1)
    return (top, left, bottom, right)


def torch_layout(torch, array):
    """An NHWC numpy array as an NCHW torch tensor in channels_last memory (no copy when contiguous)."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)
