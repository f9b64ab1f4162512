"""Autotuning: MetaSchedule's evolutionary search, guided by its XGBoost cost model, per target.

Design spaces ("space"):
  template — our schedules/ template: one MetaSchedule task per PrimFunc layout (packed weight block,
             flat tile, Winograd tile), each with one design space per structural variant (loop order,
             padding, window unrolling), the tile sizes sampled as decisions (`rule.tunable_knobs`, `rule.sample_tiles`),
             which the search mutates one step at a time (`_StepOneTileSize`); a workload's first round
             measures the defaults' program and its neighbours (`neighbourhood`, `first_round`; in
             rounds too, tvmconv.rounds);
             a workload its rule has no template for (the gradient kernels that are not
             convolutions) tunes in the generated space instead;
  auto     — MetaSchedule's own generated space ("post-order-apply") over our compute;
  both     — the two together: the best record wins at build time, whichever space made it.
Every workload, a convolution or a gradient kernel, goes through the same steps (the workload
interface of tvmconv.compute).
Records go to `<log_dir>/<target key>/` (see records.py); tuning again resumes there, and
`trials` is the number of records a workload should have, so an interrupted run continues
where it stopped. The best record is rebuilt and re-timed with TVM's time evaluator after
tuning: that, not the tuner's figure, is the reported speed.
"""
import collections
import contextlib
import dataclasses
import itertools
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time

import numpy as np
import tvm
from tqdm.auto import tqdm
from tvm import s_tir
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from . import (
    backward,
    build,
    graph,
    lowering,
    records,
    rpc_devices,
    runtime,
    schedules,
    targets,
)
from .compute import ConvWorkload
from .keras import validation

SPACES = ("template", "auto", "both")
MIN_TRIALS_PER_WORKLOAD = 64  # a model's budget is split by FLOP share, but never below this per workload
RETIMING_TURNS = 3            # turns of a tuned record and the defaults, re-timed against each other
TRIALS_PER_ROUND = 16         # candidates built and measured per search round
BUILD_TIMEOUT_S = 300         # MetaSchedule's 30 s default kills builds on a slow 2-core CPU
RUN_TIMEOUT_S = 120


@dataclasses.dataclass
class TuneResult:
    workload: object  # a ConvWorkload or a backward.GradientKernel
    folder: str                 # the log folder: <log_dir>/<target key>
    trials: int                 # records for this workload there, after this run
    measured: int               # candidates measured in this run
    errors: int                 # of those, how many failed to build or run
    tuner_gflops: float | None  # the best record, as the tuner measured it
    gflops: float | None        # the best record rebuilt and re-timed (None: no valid record)
    default_gflops: float | None  # the template's defaults, timed the same way
    stopped: str | None = None  # "time budget" or "interrupted" when the run ended early


# ---------------------------------------------------------------- what to tune


def counted_workloads(layer_or_model, input_shape=None, gradients: bool = False) -> dict:
    """The distinct workloads of a Conv2D layer, a Sequential or a functional Model, in call order, for this
    input shape (batch included; 3D means batch 1; None: the model's declared input), each with how many
    times one pass runs it. With `gradients`, also what training runs (Conv2D.gradients): the
    pre-activation when there is an activation, the phases of dx and the convolution that gives dW, and the
    kernels that are not convolutions (backward.training_kernels: the activation's derivative, dW's
    kernel of its own for depthwise and pointwise layers, the regrouping for the others)."""
    found = collections.Counter()
    for call in graph.layer_calls(layer_or_model, input_shape):
        wl = call.workload
        extra = []
        if gradients:
            phases, _ = backward.input_gradient_phases(wl)
            extra = [dataclasses.replace(wl, activation="linear") if wl.activation != "linear" else None,
                     *(phase.workload for phase in phases), backward.weight_gradient_workload(wl),
                     *backward.training_kernels(wl)]
        found.update(workload for workload in [wl, *extra] if workload is not None)
    return dict(found)


def conv_workloads(layer_or_model, input_shape=None, gradients: bool = False) -> list:
    """The distinct workloads of `counted_workloads`, in call order."""
    return list(counted_workloads(layer_or_model, input_shape, gradients))


def trial_budgets(workloads: list[ConvWorkload], trials: int, min_trials: int = MIN_TRIALS_PER_WORKLOAD,
                  weights: list[float] | None = None) -> list[int]:
    """`trials` split by `weights` (default: FLOPs), at least `min_trials` each (a lone workload gets all)."""
    if len(workloads) == 1:
        return [trials]
    weights = weights or [wl.flops for wl in workloads]
    total = sum(weights)
    return [max(min_trials, round(trials * weight / total)) for weight in weights]


def stack_seconds(workloads: list, counts: list[int], target, rpc=None) -> list[float]:
    """Each workload's share of its stack's time: its kernel's time as builds have it now (best record or
    the rule's defaults), re-timed here or on the RPC device, times how often the stack runs it."""
    seconds = []
    for wl, count in zip(workloads, counts, strict=True):
        kernel = build.get_kernel(wl, target)
        seconds.append(count * wl.flops / 1e9 / _gflops(kernel.kernel, wl.prim_func(*kernel.layout), wl.flops,
                                                         kernel.library, rpc, repeat=5))
    return seconds


# ---------------------------------------------------------------- design spaces


@derived_object
class _StepOneTileSize(ms.mutator.PyMutator):
    """The evolutionary search's mutation in the template's space: one tile size that `rule.sample_tiles`
    sampled (a SampleCategorical decision) moved to the next larger or smaller of its candidates, which
    sample_tiles lists in order. MetaSchedule's own mutators change only the decisions of its own rules
    (MutateTileSize: sample_perfect_tile; MutateUnroll: unroll annotations), none of which the template
    makes: without this mutation the search would only re-sample, never refine a good program."""

    def __init__(self):
        super().__init__()
        self.rng = random.Random()

    def _initialize_with_tune_context(self, context) -> None:
        pass

    def apply(self, trace, _rand_state):
        sampled = [inst for inst in trace.insts if inst.kind.name == "SampleCategorical" and len(inst.attrs[0]) > 1]
        if not sampled:
            return None
        inst = self.rng.choice(sampled)
        decision, last = int(trace.get_decision(inst)), len(inst.attrs[0]) - 1
        step = self.rng.choice((-1, 1)) if 0 < decision < last else (1 if decision == 0 else -1)
        return trace.with_decision(inst, decision + step, remove_postproc=True)

    def clone(self):
        return _StepOneTileSize()


def _template_space(rule, wl: ConvWorkload, target, variants):
    def design_spaces(sch):
        spaces = []
        for knobs in variants:
            space = sch.copy()
            rule.schedule(wl, space, target, rule.sample_tiles(space, wl, target, knobs))
            spaces.append(space)
        return spaces
    # CPU templates only: on the CUDA template the step left no tensor-core candidate among the first 32
    # proposed (test_cuda's slow test); it keeps MetaSchedule's mutators until that is looked into.
    mutators = {_StepOneTileSize(): 1.0} if target.kind.name == "llvm" else "from-target"
    return ms.space_generator.ScheduleFn(design_spaces, mutator_probs=mutators)


def _task(workload, target, layout: tuple[int, int, int], space_generator, space: str) -> ms.TuneContext:
    """The task of `workload.prim_func(*layout)`: layout is (weight block, flat tile, Winograd tile)."""
    winograd = f"-w{layout[2]}" if layout[2] else ""
    return ms.TuneContext(tvm.IRModule({"main": workload.prim_func(*layout)}), target=target,
                          space_generator=space_generator, search_strategy=ms.search_strategy.EvolutionarySearch(),
                          task_name=f"{workload.key}-b{layout[0]}-f{layout[1]}{winograd}-{space}")


def tasks(workload, target, space: str) -> list[ms.TuneContext]:
    """The MetaSchedule tasks that tune `workload` in this design space. Where its rule has no template for
    it, it tunes in MetaSchedule's generated space whatever `space` says."""
    rule = schedules.find_rule(target)
    by_layout: dict[tuple[int, int, int], list] = {}
    if space in ("template", "both"):
        for knobs in rule.tunable_knobs(workload, target):
            by_layout.setdefault(knobs.layout, []).append(knobs)
    contexts = [_task(workload, target, layout, _template_space(rule, workload, target, variants), "template")
                for layout, variants in by_layout.items()]
    if space in ("auto", "both") or not contexts:
        # MetaSchedule's generated space tiles the rows and columns of the direct sum itself: no flat tile.
        contexts.append(_task(workload, target, (build.layout(rule.default_knobs(workload, target))[0], 0, 0),
                              "post-order-apply", "auto"))
    return contexts


# ---------------------------------------------------------------- measuring


def _build(mod, target, _params):
    """LocalBuilder's build step: MetaSchedule's default without its `import tvm.s_tir.tensor_intrin`,
    which takes 24 s in every fresh builder process (and the builder starts fresh ones every round);
    float convolutions use no tensor intrinsics."""
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    return lowering.compile(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target)


def _export_for(target_dict: dict):
    """LocalBuilder's export step: a shared library linked by the target's (cross) compiler, which an
    RPC server without a compiler can load (MetaSchedule's default writes a .tar); for a CUDA target,
    with the fatbin nvcc builds beside it (`build.device_code`: the same file name, `.fatbin`)."""
    def export(module) -> str:
        target = tvm.target.Target(target_dict)
        path = os.path.join(tempfile.mkdtemp(prefix="tvmconv-tune-"), "kernel.so")
        module.export_library(path, fcompile=targets.cross_compiler(target))
        if target.kind.name == "cuda":
            with open(path[:-3] + ".fatbin", "wb") as f:
                f.write(build.device_code(module, target))
        return path
    return export


def builder(target) -> ms.builder.LocalBuilder:
    """MetaSchedule's LocalBuilder with the two steps above: what tuning builds candidates with."""
    return ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S, f_build=_build, f_export=_export_for(target.export()))


def _evaluator() -> ms.runner.EvaluatorConfig:
    return ms.runner.EvaluatorConfig(number=1, repeat=3, min_repeat_ms=40, enable_cpu_cache_flush=False)


def _runner(rpc, target):
    """LocalRunner on this host, else an RPCRunner to the board(s) `rpc` names (as Conv2D's `remote`)."""
    if rpc is None:
        targets.check_runnable_here(target)
        return ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S, evaluator_config=_evaluator())
    if isinstance(rpc, dict):
        host, port = rpc["tracker"].rsplit(":", 1)
        config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=rpc["key"],
                                     session_timeout_sec=RUN_TIMEOUT_S)
        return ms.runner.RPCRunner(config, _evaluator(), max_workers=1)
    host, port = rpc.rsplit(":", 1)

    def connect(_config):  # a board served directly, without a tracker
        return tvm.rpc.connect(host, int(port), session_timeout=RUN_TIMEOUT_S)
    # RPCConfig insists on tracker fields; `connect` replaces the tracker, so they only name the server.
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key="direct",
                                 session_timeout_sec=RUN_TIMEOUT_S)
    return ms.runner.RPCRunner(config, _evaluator(), f_create_session=connect, max_workers=1)


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    def __init__(self, bar, flops: float, should_stop):
        self.bar, self.flops, self.should_stop = bar, flops, should_stop
        self.measured = self.errors = 0
        self.best_s = math.inf
        self.stop_reason = None

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        self.count(builder_results, runner_results)

    def count(self, builder_results, runner_results):
        """Count a round's results; raises RuntimeError where the run should stop (its records are saved)."""
        for built, ran in zip(builder_results, runner_results, strict=True):
            self.measured += 1
            times = [float(s) for s in (ran.run_secs or [])]
            if built.error_msg or ran.error_msg or not times:
                self.errors += 1
            else:
                self.best_s = min(self.best_s, sum(times) / len(times))
        self.bar.update(len(runner_results))
        self.bar.set_postfix(best=f"{self.flops / self.best_s / 1e9:.1f} GFLOP/s" if self.best_s < math.inf else "-",
                             errors=self.errors, refresh=False)
        # Raising is the only way to end MetaSchedule's loop early; the round's records are saved already.
        self.stop_reason = self.should_stop()
        if self.stop_reason:
            raise RuntimeError(self.stop_reason)


@contextlib.contextmanager
def _measurement_threads(threads: int):
    """MetaSchedule's runner processes read TVM_NUM_THREADS (TVM's default is half the cores on x86)."""
    saved = os.environ.get("TVM_NUM_THREADS")
    os.environ["TVM_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = saved


@contextlib.contextmanager
def _interruptible():
    """The first Ctrl-C ends the run after the current round (its records kept); a second one aborts."""
    state = {"interrupted": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if state["interrupted"]:
            previous(signum, frame) if callable(previous) else signal.default_int_handler(signum, frame)
        state["interrupted"] = True
        tqdm.write("tvmconv tune: stopping after this round (Ctrl-C again to abort)")
    signal.signal(signal.SIGINT, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)


def _random_arguments(func, device) -> list:
    """Random inputs and a zero output for each parameter buffer of the PrimFunc `func`."""
    rng = np.random.default_rng(0)
    buffers = list(func.params)  # TVM 0.27: the params are the buffers
    arrays = [rng.standard_normal([int(d) for d in b.shape]).astype(str(b.dtype)) for b in buffers[:-1]]
    arrays.append(np.zeros([int(d) for d in buffers[-1].shape], str(buffers[-1].dtype)))
    return [tvm.runtime.tensor(a, device) for a in arrays]


def _gflops(kernel, func, flops: int, library: str | None, rpc, repeat: int = 15) -> float:
    """A loaded kernel (of the PrimFunc `func`) re-timed by TVM's time evaluator (median of `repeat`), here or,
    from its `library`, on the RPC device."""
    device = tvm.cpu()
    if rpc is not None:
        kernel = rpc_devices.remote_kernel(rpc_devices.connect(rpc), library)
        device = kernel.remote_device
    try:
        evaluator = kernel.module.time_evaluator(kernel.entry, device, number=1, repeat=repeat, min_repeat_ms=40)
        seconds = float(np.median(evaluator(*_random_arguments(func, device)).results))
    finally:
        if rpc is not None:  # the device serves one session at a time: free it for the next round of tuning
            rpc_devices.disconnect(rpc)
    return flops / seconds / 1e9


# ---------------------------------------------------------------- what is known already


@derived_object
class _Seeded(ms.database.PyDatabase):
    """The target's log (where every record is written) with records measured elsewhere beside it
    (records.seed_database): the search's first population takes the best of both. The seeds are never
    written here; a seed only lands in the log once the search picks it and measures it on this target."""

    def __init__(self, log, seeds):
        super().__init__()
        self.log, self.seeds = log, seeds

    def has_workload(self, mod):
        return self.log.has_workload(mod)

    def commit_workload(self, mod):
        return self.log.commit_workload(mod)

    def commit_tuning_record(self, record):
        self.log.commit_tuning_record(record)

    def get_top_k(self, workload, top_k):
        own = list(self.log.get_top_k(workload, top_k))
        seeds = self.seeds.get_top_k(self.seeds.commit_workload(workload.mod), top_k) if top_k > len(own) else []
        return own + list(seeds)[:top_k - len(own)]

    def get_all_tuning_records(self):
        return self.log.get_all_tuning_records()

    def query_tuning_record(self, mod, target, workload_name):
        return self.log.query_tuning_record(mod, target, workload_name)

    def query_schedule(self, mod, target, workload_name):
        return self.log.query_schedule(mod, target, workload_name)

    def query_ir_module(self, mod, target, workload_name):
        return self.log.query_ir_module(mod, target, workload_name)

    def __len__(self):
        return len(self.log)


def _warm_start(cost_model, contexts: list, seeds, per_task: int = 256) -> int:
    """Train the cost model on the seeds' measurements of these tasks (their times come from another CPU or
    session, but which schedules are fast ranks alike on one ISA); returns how many it learned from."""
    learned = 0
    for context in contexts:
        found = seeds.get_top_k(seeds.commit_workload(context.mod), per_task)
        candidates, results = [], []
        for record in found:
            try:
                sch = s_tir.Schedule(context.mod)
                record.trace.apply_to_schedule(sch, remove_postproc=False)
            except Exception:  # a trace of another template version: not a candidate
                continue
            candidates.append(ms.MeasureCandidate(sch, ms.arg_info.ArgInfo.from_entry_func(context.mod)))
            results.append(ms.runner.RunnerResult(run_secs=list(record.run_secs), error_msg=None))
        if candidates:
            cost_model.update(context, candidates, results)
            learned += len(candidates)
    return learned


def _program_at(wl, target, context, variant, tiles) -> tuple[s_tir.Trace, object] | None:
    """The program of `variant`'s design space (one of `context`'s structural variants) whose sampled tile
    sizes are those of the knobs `tiles`: its trace, each decision at the candidate equal to the tile size,
    and the knobs it schedules with. None where `variant` is no design space of `context` or a tile size is
    not among its candidates."""
    rule = schedules.find_rule(target)
    if records.workload_of(context.mod["main"])[1] != variant.layout:
        return None
    sch = s_tir.Schedule(context.mod)
    knobs = rule.sample_tiles(sch, wl, target, variant)
    rule.schedule(wl, sch, target, knobs)
    trace = sch.trace
    sampled = {f.name: getattr(knobs, f.name) for f in dataclasses.fields(knobs)
               if isinstance(getattr(knobs, f.name), tvm.ir.expr.Var)}
    for inst in trace.insts:
        name = next((n for n, rv in sampled.items() if inst.outputs and inst.outputs[0].same_as(rv)), None)
        if name is not None:
            candidates = [int(c) for c in inst.attrs[0]]
            if getattr(tiles, name) not in candidates:
                return None
            trace = trace.with_decision(inst, candidates.index(getattr(tiles, name)), remove_postproc=True)
    return trace, dataclasses.replace(knobs, **{name: getattr(tiles, name) for name in sampled})


def neighbourhood(wl, target, contexts: list) -> tuple[ms.TuneContext | None, list[s_tir.Trace]]:
    """The rule's defaults as a program of its template's space, then its neighbours: each sampled tile
    size a step either way (the search's mutation, `_StepOneTileSize`), then the defaults' tile sizes in
    each other structural variant of their task (loop order, padding, window unrolling); and that task,
    one of `contexts`. (None, []) where the defaults are no program of the space (no template, or a default
    tile size the template does not sample)."""
    rule = schedules.find_rule(target)
    defaults = rule.default_knobs(wl, target)
    programs = [(context, *found) for context, variant in itertools.product(
        contexts, rule.tunable_knobs(wl, target) if defaults is not None else [])
        if (found := _program_at(wl, target, context, variant, defaults))]
    found = [(context, trace) for context, trace, knobs in programs if knobs == defaults]
    if not found:
        return None, []
    context, trace = found[0]
    steps = []
    for inst in trace.insts:
        if inst.kind.name == "SampleCategorical":
            decision = int(trace.get_decision(inst))
            steps += [trace.with_decision(inst, d, remove_postproc=True)
                      for d in (decision - 1, decision + 1) if 0 <= d < len(inst.attrs[0])]
    others = [t for c, t, knobs in programs if c is context and knobs != defaults]
    return context, [trace, *steps, *others]


def first_round(wl, target, contexts: list, limit: int) -> tuple[ms.TuneContext | None, list]:
    """The first round of a workload with no records yet: its `neighbourhood`, up to `limit` programs, as
    measure candidates of their task (those its postprocessors accept). The defaults come from a model of
    the core and beat most records of a few hundred trials (tuning_logs/README.md), so better programs are
    likeliest next to them; 30 minutes of search from random samples mostly did not get back to them
    (docs/benchmark_history.md). (None, []) where the defaults are no program of the space."""
    context, traces = neighbourhood(wl, target, contexts)
    if context is None:
        return None, []
    args_info = ms.arg_info.ArgInfo.from_entry_func(context.mod)
    candidates = []
    for trace in traces[:limit]:
        sch = s_tir.Schedule(context.mod)
        trace.apply_to_schedule(sch, remove_postproc=True)
        if all(postproc.apply(sch) for postproc in context.space_generator.postprocs):
            candidates.append(ms.MeasureCandidate(sch, args_info))
    return context, candidates


def _measure_near_the_defaults(wl, target, contexts: list, database, rpc, cost_model, callback, limit: int) -> None:
    """The `first_round` built, measured, written to the log and taught to the cost model, as the search's
    rounds are. The search then starts from these records."""
    context, candidates = first_round(wl, target, contexts, limit)
    if not candidates:
        return
    args_info = candidates[0].args_info
    built = builder(target).build([ms.builder.BuilderInput(c.sch.mod, target) for c in candidates])
    ok = [i for i, b in enumerate(built) if b.error_msg is None]
    device_type = tvm.runtime.device(target.get_target_device_type()).__device_type_name__()  # as the search names it
    futures = dict(zip(ok, _runner(rpc, target).run([ms.runner.RunnerInput(built[i].artifact_path, device_type,
                                                                           args_info) for i in ok]), strict=True))
    results = [futures[i].result() if i in futures else ms.runner.RunnerResult(None, b.error_msg)
               for i, b in enumerate(built)]
    workload = database.commit_workload(context.mod)
    for candidate, b, result in zip(candidates, built, results, strict=True):
        if result.error_msg is None:
            database.commit_tuning_record(ms.database.TuningRecord(candidate.sch.trace, workload, result.run_secs,
                                                                   target, args_info))
        if b.artifact_path:  # as MetaSchedule's RemoveBuildArtifact does after a round
            shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)
    cost_model.update(context, candidates, results)
    callback.count(built, results)


# ---------------------------------------------------------------- tuning


def trials_on_record(folder: str, wl) -> int:
    """The trials run for `wl` in a log folder (its records, or more where `logs prune` dropped some)."""
    idx = records.index(folder)
    entry = idx and idx.entries.get(wl.key)
    return entry["trials"] if entry else 0


def tune_workloads(workloads: list, trials: int = 64, target=None,
                   log_dir: str | None = None, space: str = "template", rpc=None, time_budget: float | None = None,
                   threads: int | None = None, progress: bool = True,
                   min_trials: int = MIN_TRIALS_PER_WORKLOAD, counts: list[int] | None = None) -> list[TuneResult]:
    """Tune each workload (a ConvWorkload or a GradientKernel) until its log holds its share of `trials`
    records (see `tune`). Several workloads share the trials by their share of the stack's time (their
    kernels' times as builds have them now, times `counts`: how often the stack runs each, default once),
    and are tuned in that order, largest first, so that a time budget goes where the time goes."""
    if space not in SPACES:
        raise ValueError(f"Invalid `space` {space!r}: expected one of {', '.join(SPACES)}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"`trials` must be a positive integer, got {trials!r}")
    if time_budget is not None and (isinstance(time_budget, bool) or not isinstance(time_budget, (int, float))
                                    or time_budget <= 0):
        raise ValueError(f"`time_budget` must be a positive number of seconds, got {time_budget!r}")
    target = targets.resolve(target)
    rpc = rpc_devices.standardize(rpc, argument="rpc")
    if rpc is not None and not isinstance(rpc, (str, dict)):
        raise TypeError("`rpc` must be 'HOST:PORT' or {'tracker': 'HOST:PORT', 'key': KEY}: MetaSchedule's runner "
                        "opens its own sessions")
    if rpc is not None:  # a layer's session in this process would keep the runner's workers waiting
        rpc_devices.disconnect(rpc)
    counts = counts or [1] * len(workloads)
    if len(counts) != len(workloads) or not all(validation.is_int(c) and c > 0 for c in counts):
        raise ValueError(f"`counts` must hold a positive integer per workload, got {counts!r}")
    log_root = log_dir or records.user_root()
    folder = records.folder(log_root, target)
    seeds = records.seed_database(target, exclude=folder, roots=list(dict.fromkeys([log_root, *records.search_roots()])))
    threads = threads or runtime.default_threads()
    deadline = time.monotonic() + time_budget if time_budget else None
    results = {}
    with records.locked(folder), _measurement_threads(threads), _interruptible() as state:
        database = records.Log(folder)  # read under the lock: another process may have written to it
        weights = stack_seconds(workloads, counts, target, rpc) if len(workloads) > 1 else [1.0]
        budgets = trial_budgets(workloads, trials, min_trials, weights)
        order = sorted(range(len(workloads)), key=lambda i: -weights[i])
        for position, i in enumerate(order):
            wl, budget = workloads[i], budgets[i]
            stopped = "interrupted" if state["interrupted"] else None
            if deadline and time.monotonic() >= deadline and results:  # the first workload gets a round
                stopped = "time budget"
            # The time left is split like the trials, by share of the stack's time: else the largest workload
            # would spend a whole budget that affords fewer trials than its share. A round that overruns its
            # slice shortens the slices after it.
            slice_end = deadline and time.monotonic() + max(deadline - time.monotonic(), 0) * (
                weights[i] / sum(weights[j] for j in order[position:]))
            done = trials_on_record(folder, wl)
            remaining = budget - done
            callback = None
            if remaining > 0 and not stopped:
                def should_stop(slice_end=slice_end):
                    if state["interrupted"]:
                        return "interrupted"
                    return "time budget" if slice_end and time.monotonic() >= slice_end else None
                bar = tqdm(total=remaining, desc=wl.label, unit="trial", disable=not progress, dynamic_ncols=True)
                with bar:
                    callback = _Progress(bar, wl.flops, should_stop)
                    contexts = tasks(wl, target, space)
                    cost_model = ms.cost_model.XGBModel(num_warmup_samples=min(32, remaining))
                    if seeds is not None:
                        _warm_start(cost_model, contexts, seeds)
                    try:
                        if not done and space != "auto":  # "auto": MetaSchedule's generated space alone
                            _measure_near_the_defaults(wl, target, contexts, database, rpc, cost_model, callback,
                                                       remaining)
                        left = remaining - callback.measured
                        if left > 0:
                            ms.tune_tasks(
                                tasks=contexts, task_weights=[1.0] * len(contexts), work_dir=folder,
                                max_trials_global=left, max_trials_per_task=left,
                                num_trials_per_iter=min(TRIALS_PER_ROUND, left),
                                builder=builder(target),
                                runner=_runner(rpc, target),
                                database=database if seeds is None else _Seeded(database, seeds),
                                cost_model=cost_model,
                                measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), callback],
                                task_scheduler="gradient")
                    except RuntimeError:  # TVM's FFI hands the callback's exception back as a RuntimeError
                        if not callback.stop_reason:
                            raise
                        stopped = callback.stop_reason
            result = results[i] = _result(wl, target, folder, rpc, done, callback, stopped)
            if result.trials:  # also when only re-timed: the latest figure, from a quiet machine or not
                records.note_tuned(folder, wl, result.trials, result.gflops, result.default_gflops)
    return [results[i] for i in range(len(workloads))]


def _result(wl, target, folder, rpc, done, callback, stopped) -> TuneResult:
    """The run's outcome, with the best record and the rule's schedule rebuilt and re-timed. Its trials:
    `done` before the run (which counts records pruned since) plus those measured in it."""
    tuned = records.best(wl, target, [os.path.dirname(folder)], keep_slower=True)
    kernels = {"default": build.get_kernel(wl, target, record=False)}
    if tuned is not None:
        kernels["record"] = build.get_kernel(wl, target, record=tuned)
    # The two take turns and each keeps its best: the machine's speed drifts over seconds (10-40% here), and
    # one timing each once let a record twice as slow as the defaults re-time faster and be applied.
    timed = dict.fromkeys(kernels, 0.0)
    for _ in range(RETIMING_TURNS):
        for name, kernel in kernels.items():
            timed[name] = max(timed[name], _gflops(kernel.kernel, wl.prim_func(*kernel.layout), wl.flops,
                                                   kernel.library, rpc, repeat=5))
    measured = callback.measured if callback else 0
    return TuneResult(wl, folder, max(done + measured, trials_on_record(folder, wl)), measured,
                      callback.errors if callback else 0,
                      wl.flops / tuned.seconds / 1e9 if tuned else None,
                      timed.get("record"), timed["default"], stopped)


def retime(target=None, log_dir: str | None = None, threads: int | None = None) -> list[TuneResult]:
    """Re-time, on this machine, each tuned workload's best record in `log_dir` (default as `tune`) under
    `target`'s key (default: this host) against the rule's schedule, as a run does when it ends, and note
    both figures in summary.json; nothing is tuned. For a log whose comparison is stale: after a change of
    the template's defaults, or one timed on a busy machine. (Over RPC, `tune_workloads` with the trials
    the log holds re-times them there.)"""
    target = targets.resolve(target)
    targets.check_runnable_here(target)
    folder = records.folder(log_dir or records.user_root(), target)
    results = []
    if records.index(folder) is None:  # no log there: nothing to re-time, and no folder to leave behind
        return results
    with records.locked(folder), _measurement_threads(threads or runtime.default_threads()):
        idx = records.index(folder)
        for entry in sorted(idx.entries.values() if idx else (), key=lambda entry: entry["workload"].label):
            result = _result(entry["workload"], target, folder, None, entry["trials"], None, None)
            records.note_tuned(folder, result.workload, result.trials, result.gflops, result.default_gflops)
            results.append(result)
    return results


def tune(layer_or_model, input_shape, trials: int = 64, target=None, log_dir: str | None = None,
         space: str = "template", rpc=None, time_budget: float | None = None,
         gradients: bool = False) -> list[TuneResult]:
    """Tune the convolutions of a Conv2D layer or a model for `target` (default: this host's CPU).

    `input_shape` is the first layer's input (batch included, or 3D for batch 1). A model's
    distinct workloads share `trials` by their share of its time, at least 64 each; a workload whose log
    already has its share is not tuned again (re-running resumes). Records are written to
    `log_dir` (default $TVMCONV_TUNING_LOGS or ~/.cache/tvmconv/tuning_logs) under the
    target's key. `rpc` measures on remote devices: {"tracker": "HOST:PORT", "key": KEY} or
    "HOST:PORT" of an RPC server; kernels are built (cross-compiled) here. `time_budget`
    (seconds) is shared by the workloads as the trials are, each ending at the first round boundary
    past its slice; Ctrl-C ends the run there too. `gradients` also
    tunes what training runs (see `conv_workloads`): forward workloads, and the gradient kernels that
    are not convolutions, which tune in MetaSchedule's generated space; builds use such a record only
    where it re-timed faster than the kernel's own schedule. Gradients run on this machine's CPU or GPU, not
    over RPC (as Conv2D.gradients does), so `gradients` and `rpc` do not go together.
    """
    if gradients and rpc is not None:
        raise NotImplementedError("gradients run on this machine's CPU or GPU, not over RPC (as Conv2D.gradients "
                                  "does): tune them without `rpc`")
    counted = counted_workloads(layer_or_model, input_shape, gradients)
    return tune_workloads(list(counted), trials, target, log_dir, space, rpc, time_budget,
                          counts=list(counted.values()))
