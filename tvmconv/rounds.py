"""Tuning in rounds, for a device that this machine cannot reach: build a round of candidates here, time
them all there in one go, ingest the times here.

MetaSchedule's own loop (tvmconv.tuning) measures each batch of candidates as it goes, through a runner
on this machine or over RPC. A lent GPU machine that nothing can reach, has no TVM compiler and is held
for minutes cannot host that loop, so its pieces are driven here one round at a time:

  write_round   per workload still short of its trials, its MetaSchedule tasks (tuning.tasks: the
                template's design spaces, or the generated space) each propose candidates with their
                search strategy (EvolutionarySearch: a population sampled from the design spaces and the
                database's best, ranked by the XGBoost cost model), candidates already on record left
                out; a workload with no records starts with the defaults' program and its neighbours
                (tuning.first_round), as `tune` does. MetaSchedule's LocalBuilder builds them, and the
                rule's default schedule of each workload (the reference its candidates' outputs must
                match, and the figure they must beat). The folder then holds the libraries (and for CUDA
                the fatbins), and ROUND_FILE: each kernel's argument shapes and its inputs' seed, each
                candidate's trace.
  timing        `python -m tvmconv.timing DIR` (tvmconv.timing, the runtime alone) runs and times them
                where they run, and writes RESULTS_FILE (scripts/gpu_device.sh does it on the GPU machine).
  ingest        the times become measured records in the log folder's MetaSchedule database (failed
                candidates as failures, as MetaSchedule records them), the cost model is updated with
                them and saved beside the database, summary.json notes each workload's best and its
                default schedule as timed there, and the next round is written into the same folder.

The search's state between rounds is the database and the cost model: each round starts fresh search
strategies over them (`notify_runner_results` would only advance a strategy's trial counter, which the
next round's `pre_tuning` sets anew), so rounds resume across processes and sessions. Records land
under the target's key as any tuning run's do, and builds use them the same way (records.best).
"""
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import warnings
import zlib

import tvm
import tvm_ffi
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from . import backward, build, records, schedules, targets, timing, tuning
from .compute import ConvWorkload

LAYOUT_FIELDS = ("weight_block", "flat_tile", "winograd")  # a candidate's PrimFunc layout, as prim_func takes it
ROUND_CANDIDATES = 256  # a round's candidates, shared by the workloads by the trials they still need
COST_MODEL_FILE = "cost_model.tar"  # the XGBoost model and its training data, beside the database
# How far a candidate's output may be from its workload's default schedule's, relative to the largest
# magnitude of the latter: both accumulate in the same precision, in other orders.
_TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "float16": 2e-3}
_TF32_TOLERANCE = 1e-3


@dataclasses.dataclass
class RoundSummary:
    directory: str
    round: int
    kernels: int     # candidates and references to time
    failed_builds: int
    workloads: int   # workloads with candidates in this round


@dataclasses.dataclass
class IngestedWorkload:
    workload: object  # a ConvWorkload or a backward.GradientKernel
    trials: int       # records for it in the log folder now
    budget: int       # the trials it should have
    measured: int     # candidates of the round with a time
    errors: int       # candidates that failed to build, run or match the reference
    gflops: float | None          # its best record, as timed in its round
    default_gflops: float | None  # its default schedule, as timed in this round


# ---------------------------------------------------------------- what a round holds


def _describe(workload) -> dict:
    if isinstance(workload, backward.GradientKernel):
        return {"fields": workload.workload.fields(), "gradient": workload.part}
    return {"fields": workload.fields()}


def _workload(entry, path: str):
    """A plan entry's workload, checked (ValueError naming the round file)."""
    try:
        wl = ConvWorkload.from_fields(entry["fields"])
        part = entry.get("gradient")
        if part is None:
            return wl
        return backward.GRADIENT_KERNELS[part](wl)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"damaged round file {path}: {err}") from None


def _tolerance(workload) -> float:
    wl = workload.workload if isinstance(workload, backward.GradientKernel) else workload
    return _TF32_TOLERANCE if wl.tf32 else _TOLERANCE[wl.dtype]


def _arguments(func) -> list[dict]:
    return [{"shape": [int(d) for d in b.shape], "dtype": str(b.dtype)} for b in func.params]  # TVM 0.27: buffers


def _cost_model(folder: str) -> ms.cost_model.XGBModel:
    """The log folder's XGBoost model, trained by earlier rounds (a fresh one if there is none)."""
    model = ms.cost_model.XGBModel(num_warmup_samples=tuning.MIN_TRIALS_PER_WORKLOAD // 2)
    path = os.path.join(folder, COST_MODEL_FILE)
    if os.path.exists(path):
        try:
            with _quiet_xgboost():
                model.load(path)
        except Exception as err:  # a damaged or foreign file: name it
            raise ValueError(f"damaged cost model {path} ({err}): remove it to start a fresh one") from None
    return model


@contextlib.contextmanager
def _quiet_xgboost():
    """XGBoost warns that XGBModel's file name (model.bin) does not say its format, at every save and load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(UBJSON|Unknown file format)", category=UserWarning)
        yield


def _save_cost_model(model: ms.cost_model.XGBModel, folder: str) -> None:
    if model.booster is None:  # nothing trained yet (and XGBModel.load cannot read a model without a booster)
        return
    path = os.path.join(folder, COST_MODEL_FILE)
    with _quiet_xgboost():
        model.save(path + ".tmp")
    os.replace(path + ".tmp", path)


def _trace_json(trace):
    """A trace in JSON, as MetaSchedule's JSON database writes it (index maps as TVM's JSON of them), in Python's
    types."""
    def plain(value):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):
            return value.value
        if isinstance(value, tvm.tirx.IndexMap):
            return tvm.ir.save_json(value)
        if isinstance(value, tvm_ffi.Map):
            return {str(key): plain(item) for key, item in value.items()}
        return [plain(item) for item in value]
    return plain(trace.as_json(remove_postproc=False))


def _trace_text(trace) -> str:
    """A trace as the Python code that replays it, decisions included: what identifies a candidate."""
    return "\n".join(trace.as_python(remove_postproc=False))


def _measured_traces(database, mod) -> set[str]:
    """The traces on record for the workload `mod`, as text: a fresh search strategy does not know them."""
    wanted = tvm_ffi.structural_hash(mod)
    return {_trace_text(r.trace) for r in database.get_all_tuning_records()
            if tvm_ffi.structural_hash(r.workload.mod) == wanted}


def _shares(plan: list, done: list[int], size: int) -> list[int]:
    """The round's candidates per workload: `size` split by the trials each still needs, at least one each."""
    missing = [max(budget - trials, 0) for (_, budget), trials in zip(plan, done, strict=True)]
    total = sum(missing)
    return [min(m, max(1, round(size * m / total))) if m else 0 for m in missing]


# ---------------------------------------------------------------- writing a round


def _propose(context: ms.TuneContext, count: int, database, cost_model, measured: set[str]) -> list:
    """Up to `count` candidates of one task that are not on record, from its search strategy."""
    spaces = context.generate_design_space()
    context.pre_tuning(max_trials=count, num_trials_per_iter=count, design_spaces=spaces, database=database,
                       cost_model=cost_model)
    picked = []
    for _ in range(3):  # a fresh strategy may propose what earlier rounds measured: ask again for the rest
        for candidate in context.generate_measure_candidates() or []:
            text = _trace_text(candidate.sch.trace)
            if text not in measured and len(picked) < count:
                measured.add(text)
                picked.append(candidate)
        if len(picked) >= count:
            break
    context.post_tuning()
    return picked


def _next_number(directory: str) -> int:
    """The number of the round to write in `directory`: one more than the round there, else 1."""
    try:
        number = timing.read_round(directory).get("round")
    except (OSError, ValueError):
        return 1
    return number + 1 if type(number) is int and 0 < number < 2 ** 31 else 1


def write_round(plan: list, target, directory: str, log_root: str | None = None, space: str = "template",
                size: int = ROUND_CANDIDATES) -> RoundSummary | None:
    """Write a round of candidates for `plan`, a list of (workload, trials wanted), into `directory`
    (replacing a round there that was not timed); None when every workload has its trials."""
    if space not in tuning.SPACES:
        raise ValueError(f"Invalid `space` {space!r}: expected one of {', '.join(tuning.SPACES)}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"The round size must be a positive integer, got {size!r}")
    target = targets.resolve(target)
    if target.kind.name == "cuda":
        missing = [a for a in ("max_shared_memory_per_block", "max_threads_per_block") if a not in target.attrs]
        if missing:
            raise ValueError(f"CUDA tuning verifies candidates against the target's {' and '.join(missing)}: add "
                             "them to the target dict, or use a preset ('cuda-sm_80', 'cuda-sm_90')")
    if os.path.exists(os.path.join(directory, timing.RESULTS_FILE)):
        raise ValueError(f"{directory} holds a timed round that was not ingested: ingest it first "
                         f"(tvmconv tune --ingest {directory})")
    number = _next_number(directory)
    log_root = log_root or records.user_root()
    folder = records.folder(log_root, target)
    database = records.Log(folder)  # read only: candidates on record are not proposed again
    cost_model = _cost_model(folder)
    done = [tuning.trials_on_record(folder, wl) for wl, _ in plan]
    shares = _shares(plan, done, size)
    if not any(shares):
        return None
    rule = schedules.find_rule(target)
    # What to build: per kernel (workload index, its PrimFunc's layout (weight block, flat tile, Winograd
    # tile), the candidate's trace in JSON or None for a reference, whether a reference is the default
    # schedule), and its builder input.
    kernels, inputs = [], []
    for index, ((wl, _), share, trials) in enumerate(zip(plan, shares, done, strict=True)):
        if not share:
            continue
        contexts = tuning.tasks(wl, target, space)
        arguments = set()
        # A workload's first round: the defaults and their neighbours (tvmconv.tuning.first_round), as `tune`
        # measures them; the search fills the rest of its share.
        first_context, first = (tuning.first_round(wl, target, contexts, share) if not trials and space != "auto"
                                else (None, []))
        share -= len(first)
        for i, context in enumerate(contexts):
            _, layout = records.workload_of(context.mod["main"])
            count = share // len(contexts) + (i < share % len(contexts))
            measured = _measured_traces(database, context.mod)
            nearby = first if context is first_context else []
            measured |= {_trace_text(candidate.sch.trace) for candidate in nearby}
            for candidate in nearby + (_propose(context, count, database, cost_model, measured) if count else []):
                kernels.append((index, layout, _trace_json(candidate.sch.trace), False))
                inputs.append(ms.builder.BuilderInput(candidate.sch.mod, target))
                arguments.add(_arguments_layout(layout))
        # The references, one per layout of the arguments: the default schedule, and for another layout the
        # rule's variant that reads it, tile sizes at their defaults (their inputs are random in that layout;
        # a flat tile changes no argument).
        default = rule.default_knobs(wl, target)
        variants = {_arguments_layout(k.layout): k for k in reversed(rule.tunable_knobs(wl, target))}
        for weights in sorted(arguments | {_arguments_layout(build.layout(default))}):
            knobs = default if _arguments_layout(build.layout(default)) == weights else variants[weights]
            kernels.append((index, build.layout(knobs), None, knobs == default))
            inputs.append(ms.builder.BuilderInput(tvm.IRModule({"main": build.scheduled(wl, target, rule, knobs)}),
                                                  target))
    spec = _round_spec(plan, target, directory, space, size, number, kernels, inputs,
                       tuning.builder(target).build(inputs))
    path = os.path.join(directory, timing.ROUND_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(spec, f)
    os.replace(path + ".tmp", path)
    return RoundSummary(directory, number, len(spec["kernels"]), sum("error" in c for c in spec["candidates"]),
                        sum(1 for s in shares if s))


def _arguments_layout(layout: tuple[int, int, int]) -> tuple[int, int]:
    """What of a PrimFunc's layout its arguments show: the weights' (block, Winograd tile); a flat tile
    changes none."""
    return layout[0], layout[2]


def _round_spec(plan, target, directory, space, size, number, kernels, inputs, built) -> dict:
    """ROUND_FILE's content, the built libraries moved into the round's folder (the old round's removed)."""
    kernels_dir = os.path.join(directory, timing.KERNELS)
    shutil.rmtree(kernels_dir, ignore_errors=True)
    os.makedirs(kernels_dir)
    entries, candidates, references, defaults = [], [], {}, {}
    # References first: the timing checks each candidate's output against its reference's.
    order = sorted(range(len(kernels)), key=lambda n: kernels[n][2] is not None)
    for n in order:
        (index, layout, trace, is_default), result = kernels[n], built[n]
        weights, fields = _arguments_layout(layout), dict(zip(LAYOUT_FIELDS, layout, strict=True))
        wl = plan[index][0]
        if result.error_msg:
            if trace is None:
                raise RuntimeError(f"the default schedule of {wl.label} did not build:\n{result.error_msg}")
            candidates.append({"workload": index, **fields, "trace": trace, "error": result.error_msg.strip()[-2000:]})
            continue
        kernel_id = f"{n:04d}"
        library = f"{kernel_id}.so"
        shutil.move(result.artifact_path, os.path.join(kernels_dir, library))
        device_code = None
        if target.kind.name == "cuda":
            device_code = f"{kernel_id}.fatbin"
            shutil.move(result.artifact_path[:-3] + ".fatbin", os.path.join(kernels_dir, device_code))
        shutil.rmtree(os.path.dirname(result.artifact_path), ignore_errors=True)
        # Inputs random in the layout of the arguments: a reference and its candidates draw the same.
        block, winograd = weights
        seed = zlib.crc32(f"{wl.key}-{block}{f'-w{winograd}' if winograd else ''}".encode())
        entries.append({"id": kernel_id, "library": library, "device_code": device_code,
                        "arguments": _arguments(inputs[n].mod["main"]), "seed": seed,
                        "reference": references.get((index, weights)), "tolerance": _tolerance(wl)})
        if trace is None:
            references[(index, weights)] = kernel_id
            if is_default:
                defaults[str(index)] = kernel_id
        else:
            candidates.append({"workload": index, **fields, "kernel": kernel_id, "trace": trace})
    return {"format": timing.ROUND_FORMAT, "token": secrets.token_hex(8), "round": number, "space": space,
            "size": size, "target": json.loads(str(target)), "target_key": targets.target_key(target),
            "plan": [{**_describe(wl), "trials": trials} for wl, trials in plan],
            "kernels": entries, "candidates": candidates, "defaults": defaults}


# ---------------------------------------------------------------- ingesting a timed round


def _read_results(directory: str, spec: dict) -> dict:
    """RESULTS_FILE's entries by kernel id: {"seconds": [...]} or {"error": "..."}, checked."""
    path = os.path.join(directory, timing.RESULTS_FILE)
    try:
        with open(path) as f:
            report = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"the round in {directory} was not timed: {path} is missing (time it with "
                                f"`python -m tvmconv.timing {directory}`, on the GPU machine "
                                "scripts/gpu_device.sh run)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"damaged results file {path}: {err.msg}") from None
    if not isinstance(report, dict) or report.get("token") != spec["token"]:
        raise ValueError(f"{path} holds the results of another round than {timing.ROUND_FILE} there")
    ids = {k["id"] for k in spec["kernels"]}
    results = report.get("kernels")
    if not isinstance(results, dict) or not set(results) <= ids:
        raise ValueError(f"damaged results file {path}: its kernels are not the round's")
    for kernel_id, result in results.items():
        times = result.get("seconds") if isinstance(result, dict) else None
        valid = (isinstance(result, dict) and (isinstance(result.get("error"), str) or (
            isinstance(times, list) and times and all(isinstance(t, float) and 0 < t < 1e3 for t in times))))
        if not valid:
            raise ValueError(f"damaged results file {path}: kernel {kernel_id}: {json.dumps(result)[:200]}")
    return results


def _plan_and_candidates(spec: dict, path: str) -> tuple:
    """(target, plan, candidates) of a round's file, checked (it travelled: nothing in it is trusted)."""
    try:
        target = targets.resolve(spec["target"])
        plan = [(_workload(entry, path), entry["trials"]) for entry in spec["plan"]]
        candidates, defaults = spec["candidates"], spec["defaults"]
        valid = (targets.target_key(target) == spec.get("target_key") and spec.get("space") in tuning.SPACES
                 and type(spec.get("size")) is int and spec["size"] > 0 and isinstance(defaults, dict)
                 and all(isinstance(kernel, str) for kernel in defaults.values())
                 and all(type(trials) is int and trials > 0 for _, trials in plan) and isinstance(candidates, list)
                 and all(isinstance(c, dict) and type(c.get("workload")) is int and 0 <= c["workload"] < len(plan)
                         and all(type(c.get(name)) is int and c[name] >= 0 for name in LAYOUT_FIELDS)
                         and isinstance(c.get("trace"), list)
                         and isinstance(c.get("kernel") if "error" not in c else c["error"], str) for c in candidates))
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"damaged round file {path}: {err}") from None
    if not valid:
        raise ValueError(f"damaged round file {path}: its target, plan or candidates are not a round's")
    return target, plan, candidates


def ingest(directory: str, log_root: str | None = None) -> tuple[list[IngestedWorkload], RoundSummary | None]:
    """Commit the timed round in `directory` to the log folder of its target (records, cost model,
    summary.json), then write the next round there; returns what each workload has now, and the next
    round (None: every workload has its trials, and the folder's round is removed). Every candidate is
    replayed before anything is committed: a damaged round commits nothing."""
    spec = timing.read_round(directory)
    path = os.path.join(directory, timing.ROUND_FILE)
    results = _read_results(directory, spec)
    target, plan, candidates = _plan_and_candidates(spec, path)
    by_task: dict[tuple, list] = {}
    for candidate in candidates:
        result = {"error": candidate["error"]} if "error" in candidate else results.get(candidate["kernel"])
        if result is None:  # not timed before the round's time limit: left for a later round
            continue
        index, layout = candidate["workload"], tuple(candidate[name] for name in LAYOUT_FIELDS)
        try:  # the candidate's trace, replayed on its workload (instructions: [kind, inputs, attributes, ...])
            sch = s_tir.Schedule(plan[index][0].prim_func(*layout))  # a layout compute refuses: a damaged file
            schedules.register_intrinsics(i[2][0] for i in candidate["trace"][0] if i[0] == "Tensorize")
            s_tir.Trace.apply_json_to_schedule(candidate["trace"], sch)
        except Exception as err:  # a trace of another workload, a layout of none, or a damaged one
            raise ValueError(f"damaged round file {path}: a candidate of {plan[index][0].label} does not replay "
                             f"({err})") from None
        by_task.setdefault((index, layout), []).append((sch, result))
    log_root = log_root or records.user_root()
    folder = records.folder(log_root, target)
    # One writer at a time; the log is read again under the lock, since another process may have added to it.
    with records.locked(folder):
        database = records.Log(folder)
        cost_model = _cost_model(folder)
        counts = {}
        for (index, layout), measured in by_task.items():
            mod = tvm.IRModule({"main": plan[index][0].prim_func(*layout)})
            workload_record = database.commit_workload(mod)
            for sch, result in measured:
                database.commit_tuning_record(ms.database.TuningRecord(
                    sch.trace, workload_record, result.get("seconds") or [1e10],  # 1e10: MetaSchedule's failure
                    target, ms.arg_info.ArgInfo.from_entry_func(sch.mod)))
            cost_model.update(ms.TuneContext(mod, target=target),
                              [ms.MeasureCandidate(sch, ms.arg_info.ArgInfo.from_entry_func(sch.mod))
                               for sch, _ in measured],
                              [ms.runner.RunnerResult(r.get("seconds"), r.get("error")) for _, r in measured])
            count = counts.setdefault(index, [0, 0])
            count[0] += len(measured)
            count[1] += sum("error" in r for _, r in measured)
        _save_cost_model(cost_model, folder)
        outcome = []
        for index, (wl, budget) in enumerate(plan):
            default = results.get(spec["defaults"].get(str(index)), {}).get("seconds")
            best = records.best(wl, target, [log_root], keep_slower=True)
            trials = tuning.trials_on_record(folder, wl)
            default_gflops = wl.flops / (sum(default) / len(default)) / 1e9 if default else None
            gflops = wl.flops / best.seconds / 1e9 if best else None
            if index in counts:
                records.note_tuned(folder, wl, trials, gflops, default_gflops)
            measured, errors = counts.get(index, (0, 0))
            outcome.append(IngestedWorkload(wl, trials, budget, measured, errors, gflops, default_gflops))
        os.remove(os.path.join(directory, timing.RESULTS_FILE))
    following = write_round(plan, target, directory, log_root, spec["space"], spec["size"])
    if following is None:
        shutil.rmtree(os.path.join(directory, timing.KERNELS), ignore_errors=True)
        os.remove(path)
    return outcome, following
