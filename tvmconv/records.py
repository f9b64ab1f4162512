"""Tuning records: MetaSchedule JSON databases, one folder per target key, and the best record per workload.

A log root holds `<target key>/database_workload.json` and `database_tuning_record.json`, the
two files of `ms.database.JSONDatabase`, plus `summary.json`: per workload, when it was tuned
and the re-timed speed of its best record (MetaSchedule keeps neither). MetaSchedule matches
records by the workload's structural hash only, not by target (apache/tvm#15549), so the
folder per target key is what keeps records from crossing targets.

Searched at build time, in order: the user's root ($TVMCONV_TUNING_LOGS, default
~/.cache/tvmconv/tuning_logs), then the records shipped in the package's tuning_logs/. The
record with the lowest measured time wins. A workload without records of its own uses the
record of the same convolution at batch 1, or with another epilogue (bias, activation): the
record's trace is replayed on it.
"""
import dataclasses
import datetime
import json
import os
import threading

import tvm
import tvm_ffi
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from . import schedules, targets, tuning_logs  # tuning_logs: the shipped records (package data)
from .backward import GRADIENT_ATTR, GRADIENT_KERNELS, GradientKernel
from .compute import WEIGHT_BLOCK_ATTR, WORKLOAD_ATTR, ConvWorkload

WORKLOADS_FILE = "database_workload.json"
RECORDS_FILE = "database_tuning_record.json"
SUMMARY_FILE = "summary.json"


def user_root() -> str:
    return os.environ.get("TVMCONV_TUNING_LOGS") or os.path.join(os.path.expanduser("~"), ".cache", "tvmconv",
                                                                   "tuning_logs")


def shipped_root() -> str:
    return os.path.dirname(tuning_logs.__file__)


def search_roots() -> list[str]:
    return [user_root(), shipped_root()]


def folder(root: str, target: tvm.target.Target) -> str:
    return os.path.join(root, targets.target_key(target))


def _check_lines(path: str) -> None:
    """MetaSchedule aborts on a malformed line without naming the file: check every line first."""
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"corrupt tuning log {path}, line {number}: {err.msg}") from None
            if not isinstance(entry, list):
                raise ValueError(f"corrupt tuning log {path}, line {number}: expected a JSON list, got "
                                 f"{type(entry).__name__}")


def open_database(path: str, create: bool = False) -> ms.database.JSONDatabase:
    """The JSON database in folder `path`; a damaged file raises ValueError naming it."""
    if create:
        os.makedirs(path, exist_ok=True)
    files = [os.path.join(path, name) for name in (WORKLOADS_FILE, RECORDS_FILE)]
    for file in files:
        if os.path.exists(file):
            _check_lines(file)
    try:
        return ms.database.JSONDatabase(*files, allow_missing=True)
    except Exception as err:  # valid JSON that MetaSchedule cannot read back (wrong fields, foreign IR)
        raise ValueError(f"corrupt tuning log in {path} ({files[0]} / {files[1]}): {err}") from None


def workload_of(record: ms.database.TuningRecord) -> tuple[ConvWorkload | GradientKernel, int] | None:
    """What a record tuned, read from its PrimFunc's attributes (compute.conv2d_forward,
    backward.GradientKernel): the workload and its packed weight block (None: not a tvmconv workload)."""
    attrs = record.workload.mod["main"].attrs
    if attrs is None or WORKLOAD_ATTR not in attrs:
        return None
    wl = ConvWorkload.from_fields(json.loads(str(attrs[WORKLOAD_ATTR])))
    if GRADIENT_ATTR in attrs:
        return GRADIENT_KERNELS[str(attrs[GRADIENT_ATTR])](wl), 0
    return wl, int(attrs[WEIGHT_BLOCK_ATTR])


def seconds(record: ms.database.TuningRecord) -> float | None:
    """The record's mean measured time; None for a failed build or run."""
    if record.run_secs is None or len(record.run_secs) == 0:
        return None
    values = [float(s) for s in record.run_secs]
    mean = sum(values) / len(values)
    return None if mean >= 1e9 else mean  # MetaSchedule stores 1e10 for failed runs


def read_summary(path: str) -> dict:
    file = os.path.join(path, SUMMARY_FILE)
    if not os.path.exists(file):
        return {}
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt tuning log {file}: {err.msg}") from None


def write_summary(path: str, summary: dict) -> None:
    tmp = os.path.join(path, f".{SUMMARY_FILE}.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(path, SUMMARY_FILE))


def note_tuned(path: str, wl: ConvWorkload | GradientKernel, trials: int, gflops: float | None,
               default_gflops: float | None = None) -> None:
    """Record when `wl` was last tuned or re-timed here, its trial count, its best record's re-timed speed
    and that of the schedule without a record (template defaults, or a gradient kernel's rule)."""
    summary = read_summary(path)
    summary[wl.key] = {"workload": dataclasses.asdict(wl), "trials": trials, "retimed_gflops": gflops,
                       "default_gflops": default_gflops,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    write_summary(path, summary)


@dataclasses.dataclass(frozen=True)
class Tuned:
    """The record a kernel was built from."""
    folder: str          # the log folder (root/target key) it came from
    weight_block: int    # the packed weight layout of the tuned PrimFunc
    trace: object        # the schedule, as a MetaSchedule trace
    seconds: float       # its time as the tuner measured it
    trials: int          # trials run for this workload in that folder
    reused: str | None   # how the tuned workload differs from this one, when it stands in (see best)

    def __str__(self) -> str:
        reused = f", the record of the same conv with {self.reused}" if self.reused else ""
        return f"tuned ({self.trials} trials{reused}, {os.path.basename(self.folder)})"


class _Index:
    """Per log folder: its database and, per workload key, the workload, the weight blocks on record,
    its records, its fastest record's time, the trials run (its records, or more when `logs prune`
    dropped some: summary.json keeps the count) and whether its best record re-timed slower than the
    schedule without one (summary.json). Re-read when a file changes (a tuning run in another process
    appends to it)."""

    def __init__(self, path: str):
        self.path = path
        self.stamp = self._stamp()
        self.database = open_database(path)
        self.entries: dict[str, dict] = {}
        for record in self.database.get_all_tuning_records():
            found = workload_of(record)
            if found is None:
                continue
            wl, block = found
            entry = self.entries.setdefault(wl.key, {"workload": wl, "blocks": set(), "records": 0,
                                                     "best_seconds": None})
            entry["blocks"].add(block)
            entry["records"] += 1
            time = seconds(record)
            if time is not None and (entry["best_seconds"] is None or time < entry["best_seconds"]):
                entry["best_seconds"] = time
        summary = read_summary(path)
        for key, entry in self.entries.items():
            noted = summary.get(key, {})
            entry["trials"] = max(entry["records"], noted.get("trials", 0))
            # Re-timed after tuning, in one run: the best record against the schedule without one.
            entry["slower_than_default"] = (noted.get("retimed_gflops") or 0) < (noted.get("default_gflops") or 0)

    def _stamp(self):
        files = [os.path.join(self.path, name) for name in (WORKLOADS_FILE, RECORDS_FILE, SUMMARY_FILE)]
        return tuple((os.path.getmtime(f), os.path.getsize(f)) if os.path.exists(f) else None for f in files)

    def stale(self) -> bool:
        return self._stamp() != self.stamp


_indexes: dict[str, _Index] = {}
_lock = threading.Lock()


def index(path: str) -> _Index | None:
    if not os.path.exists(os.path.join(path, RECORDS_FILE)):
        return None
    with _lock:
        found = _indexes.get(path)
        if found is None or found.stale():
            found = _indexes[path] = _Index(path)
        return found


_best: dict[tuple, tuple] = {}


def _logs(target: tvm.target.Target, roots: list[str] | None) -> list[tuple[str, _Index]]:
    paths = [folder(root, target) for root in roots or search_roots()]
    return [(path, idx) for path, idx in zip(paths, map(index, paths)) if idx is not None]


def _memoized(key: tuple, logs, find):
    """find(), memoized under `key` and the log folders until one of them changes."""
    memo_key, state = (*key, tuple(path for path, _ in logs)), tuple(idx.stamp for _, idx in logs)
    memo = _best.get(memo_key)
    if memo is None or memo[0] != state:
        memo = _best[memo_key] = (state, find())
    return memo[1]


def _records_of(workload, logs, target: tvm.target.Target, keep_slower: bool,
                reused: str | None) -> tuple[list[Tuned], bool]:
    """The valid records of `workload` in `logs`, one per log and weight block, and whether a log's records
    were passed over for having re-timed slower than the schedule without one (unless `keep_slower`)."""
    found, passed_over = [], False
    for path, idx in logs:
        entry = idx.entries.get(workload.key)
        if entry is None:
            continue
        if entry["slower_than_default"] and not keep_slower:
            passed_over = True
            continue
        for block in entry["blocks"]:
            # Structural match: a record of an older compute (or of another workload) never applies.
            record = idx.database.query_tuning_record(tvm.IRModule({"main": workload.prim_func(block)}), target,
                                                      "main")
            time = record and seconds(record)
            if time is not None:
                found.append(Tuned(path, block, record.trace, time, entry["trials"], reused))
    return found, passed_over


def best(workload: ConvWorkload | GradientKernel, target: tvm.target.Target, roots: list[str] | None = None,
         keep_slower: bool = False) -> Tuned | None:
    """The fastest valid record for `workload` on `target` in the log roots (default: `search_roots()`);
    failing that, the fastest for its closest stand-in (`workload.stand_ins()`). A record that re-timed
    slower than the schedule without one after tuning (summary.json) is passed over unless `keep_slower`,
    and then no further stand-in is tried: tuning showed the rule's schedule wins on this workload."""
    logs = _logs(target, roots)

    def find():
        for candidate, reused in workload.stand_ins():
            found, passed_over = _records_of(candidate, logs, target, keep_slower, reused)
            if found or passed_over:
                return min(found, key=lambda t: t.seconds, default=None)
        return None

    return _memoized((workload.key, keep_slower), logs, find)


def apply(tuned: Tuned, func) -> s_tir.Schedule:
    """The tuned schedule replayed on `func` (the same workload, or one it stands in for)."""
    sch = s_tir.Schedule(func)
    schedules.register_intrinsics(str(i.attrs[0]) for i in tuned.trace.insts if i.kind.name == "Tensorize")
    tuned.trace.apply_to_schedule(sch, remove_postproc=False)
    return sch


# ---------------------------------------------------------------- logs list / merge / prune


def target_folders(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, name) for name in os.listdir(root)
                  if os.path.exists(os.path.join(root, name, RECORDS_FILE)))


def summarize(path: str) -> list[dict]:
    """Per tuned workload in a log folder: the workload, records, trials, best GFLOP/s (the tuner's, then
    re-timed, with the defaults re-timed in the same run), whether builds use the record, and the date."""
    idx, summary = index(path), read_summary(path)
    rows = []
    for key, entry in (idx.entries.items() if idx else ()):
        noted = summary.get(key, {})
        best_seconds = entry["best_seconds"]
        rows.append({"workload": entry["workload"], "records": entry["records"], "trials": entry["trials"],
                     "tuner_gflops": entry["workload"].flops / best_seconds / 1e9 if best_seconds else None,
                     "retimed_gflops": noted.get("retimed_gflops"), "default_gflops": noted.get("default_gflops"),
                     "used": not entry["slower_than_default"], "date": noted.get("date")})
    return rows


def _copy(record, database) -> None:
    """Commit `record` (of another database) into `database`."""
    workload = database.commit_workload(record.workload.mod)
    database.commit_tuning_record(ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target,
                                                           record.args_info))


def _record_identity(record) -> tuple:
    return (tvm_ffi.structural_hash(record.workload.mod), json.dumps(record.as_json(), sort_keys=True, default=str))


def merge(sources: list[str], destination: str) -> int:
    """Commit every record of the source folders into the destination folder; returns how many were new."""
    target_db = open_database(destination, create=True)
    seen = {_record_identity(r) for r in target_db.get_all_tuning_records()}
    added = 0
    for source in sources:
        for record in open_database(source).get_all_tuning_records():
            identity = _record_identity(record)
            if identity in seen:
                continue
            seen.add(identity)
            _copy(record, target_db)
            added += 1
    summary = read_summary(destination)
    for source in sources:
        for key, noted in read_summary(source).items():
            if key not in summary or (noted.get("date") or "") > (summary[key].get("date") or ""):
                summary[key] = noted
    write_summary(destination, summary)
    return added


def prune(path: str, keep: int) -> tuple[int, int]:
    """Keep the `keep` fastest valid records per workload, dropping failed ones; returns (before, after)."""
    records_by_workload: dict[int, list] = {}
    everything = open_database(path).get_all_tuning_records()
    for record in everything:
        if seconds(record) is not None:
            records_by_workload.setdefault(tvm_ffi.structural_hash(record.workload.mod), []).append(record)
    kept = [r for group in records_by_workload.values() for r in sorted(group, key=seconds)[:keep]]
    # The trial counts go to summary.json first: after this, the records no longer show them.
    summary = read_summary(path)
    for key, entry in index(path).entries.items():
        noted = summary.setdefault(key, {"workload": dataclasses.asdict(entry["workload"]), "retimed_gflops": None,
                                         "date": None})
        noted["trials"] = entry["trials"]
    write_summary(path, summary)
    staging = os.path.join(path, ".prune")
    os.makedirs(staging, exist_ok=True)
    for name in (WORKLOADS_FILE, RECORDS_FILE):
        if os.path.exists(os.path.join(staging, name)):
            os.remove(os.path.join(staging, name))
    fresh = open_database(staging)
    for record in kept:
        _copy(record, fresh)
    for name in (WORKLOADS_FILE, RECORDS_FILE):
        os.replace(os.path.join(staging, name), os.path.join(path, name))
    os.rmdir(staging)
    return len(everything), len(kept)
