"""Tuning records: MetaSchedule JSON databases, one folder per target key, and the best record per workload.

A log root holds `<target key>/database_workload.json` and `database_tuning_record.json`, the
two files of `ms.database.JSONDatabase`, plus `summary.json`: per workload, when it was tuned
and the re-timed speed of its best record (MetaSchedule keeps neither). MetaSchedule matches
records by the workload's structural hash only, not by target (apache/tvm#15549), so the
folder per target key keeps records from crossing targets, and a record applies only where its
own target has the build's key.

Logs fail soft, never open: `Log` reads them around damage (a line cut short by a crash, garbled,
or unreadable to MetaSchedule is skipped with a warning naming file:line, and so are the records of
a skipped workload line), where JSONDatabase gives up on the whole log. A process writes a log
folder only while it holds the folder's lock (`locked`), and appends to what it read under it.

Searched at build time, in order: the user's root ($TVMCONV_TUNING_LOGS, default
~/.cache/tvmconv/tuning_logs), then the records shipped in the package's tuning_logs/. The
record with the lowest measured time wins. A workload without records of its own uses the
record of the same convolution with another epilogue (bias, activation), at its own batch: the
record's trace is replayed on it.
"""
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import sys
import threading
import warnings

import filelock
import tvm
import tvm_ffi
from tvm import s_tir
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from . import schedules, targets, tuning_logs  # tuning_logs: the shipped records (package data)
from .backward import GRADIENT_ATTR, GRADIENT_KERNELS, GradientKernel
from .compute import FLAT_TILE_ATTR, WEIGHT_BLOCK_ATTR, WINOGRAD_ATTR, WORKLOAD_ATTR, ConvWorkload, check_layout

WORKLOADS_FILE = "database_workload.json"
RECORDS_FILE = "database_tuning_record.json"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".lock"  # in a folder that processes write (a log folder, a kernel cache folder): one writer at a time
# How much faster than the schedule without a record a record must re-time for builds to use it. Within it
# the two are a tie that the record should not win: re-timings drift, and the benchmark ran the records
# that had re-timed 2-3% faster on Zen 3 at 0.73-1.09x the defaults (2026-11-30).
RECORD_MARGIN = 1.05


def user_root() -> str:
    return os.environ.get("TVMCONV_TUNING_LOGS") or os.path.join(os.path.expanduser("~"), ".cache", "tvmconv",
                                                                   "tuning_logs")


def shipped_root() -> str:
    return os.path.dirname(tuning_logs.__file__)


def search_roots() -> list[str]:
    return [user_root(), shipped_root()]


def folder(root: str, target: tvm.target.Target) -> str:
    return os.path.join(root, targets.target_key(target))


@contextlib.contextmanager
def locked(path: str):
    """Held for as long as this process writes the log folder `path`. A record line names its workload by line
    number, so two writers appending at once garble each other's records; after taking it, read the log
    again (`Log`): another process may have added to it."""
    os.makedirs(path, exist_ok=True)
    lock = filelock.FileLock(os.path.join(path, LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        print(f"tvmconv: waiting for another process to finish writing {path}", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _lines(path: str) -> tuple[list[str], bool]:
    """The complete lines of a log file, and whether it ends in a line without its newline (being written by
    another process, or cut short by a crash)."""
    if not os.path.exists(path):
        return [], False
    with open(path, "rb") as f:
        *lines, tail = f.read().split(b"\n")
    return [line.decode("utf-8", "replace") for line in lines], bool(tail)


def _skip(file: str, number: int, why: str) -> None:
    warnings.warn(f"tvmconv: skipped line {file}:{number} of a damaged tuning log ({why})", RuntimeWarning)


@functools.lru_cache(maxsize=None)
def _target_key_of(target_json: str) -> str:
    """The key of a record's own target (given as its JSON text: records share few targets)."""
    return targets.target_key(tvm.target.Target(json.loads(target_json)))


@derived_object
class Log(ms.database.PyDatabase):
    """The MetaSchedule database of the log folder `path`, read around damage, for MetaSchedule to query and to
    append to (only while holding `locked(path)`). Workloads are numbered by their line in the file, damaged
    ones included, as record lines refer to them. (JSONDatabase numbers the workloads it holds, which differs
    from the line once a line is skipped or repeated, and its records then name the wrong workload.)"""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.files = [os.path.join(path, name) for name in (WORKLOADS_FILE, RECORDS_FILE)]
        self._memory = ms.database.MemoryDatabase()
        self._line_of: dict[ms.database.Workload, int] = {}  # the first line of each workload
        workload_lines, torn_workload = _lines(self.files[0])
        record_lines, torn_record = _lines(self.files[1])
        self._torn = {self.files[0]: torn_workload, self.files[1]: torn_record}  # ends in a line without newline
        self._workload_lines = len(workload_lines)
        by_line = {}
        for number, line in enumerate(workload_lines):
            try:
                workload = self._memory.commit_workload(ms.database.Workload.from_json(json.loads(line)).mod)
            except Exception as err:  # any damage: JSON, base64, IR that this TVM cannot read
                _skip(self.files[0], number + 1, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
                continue
            by_line[number] = workload
            self._line_of.setdefault(workload, number)
        for number, line in enumerate(record_lines, 1):
            try:
                index, entry = json.loads(line)
                if index not in by_line:
                    _skip(self.files[1], number, f"its workload, number {index!r:.20} of {self.files[0]} (from 0), "
                                                 "was skipped or is missing")
                    continue
                self._memory.commit_tuning_record(ms.database.TuningRecord.from_json(entry, by_line[index]))
            except Exception as err:
                _skip(self.files[1], number, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")

    def _append(self, file: str, entry) -> None:
        os.makedirs(self.path, exist_ok=True)
        with open(file, "a") as f:
            if self._torn[file]:  # a line a crash cut short: ended, it is a (damaged) line of its own
                f.write("\n")
                self._torn[file] = False
                self._workload_lines += file == self.files[0]
            f.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def has_workload(self, mod) -> bool:
        return self._memory.has_workload(mod)

    def commit_workload(self, mod):
        known = self._memory.has_workload(mod)
        workload = self._memory.commit_workload(mod)
        if not known:
            self._append(self.files[0], workload.as_json())
            self._line_of[workload] = self._workload_lines
            self._workload_lines += 1
        return workload

    def commit_tuning_record(self, record) -> None:
        workload = self.commit_workload(record.workload.mod)
        self._memory.commit_tuning_record(record)
        self._append(self.files[1], [self._line_of[workload], record.as_json()])

    def get_top_k(self, workload, top_k: int) -> list:
        return self._memory.get_top_k(workload, top_k)

    def get_all_tuning_records(self) -> list:
        return self._memory.get_all_tuning_records()

    def __len__(self) -> int:
        return len(self._memory)

    def fastest(self, mod, target_key: str):
        """The fastest valid record of `mod` whose own target has the key `target_key`, else None. The workload
        must match structurally: a record of an older compute (or of another workload) never applies; and
        MetaSchedule's own queries ignore the record's target."""
        if not self._memory.has_workload(mod):
            return None
        for record in self._memory.get_top_k(self._memory.commit_workload(mod), max(len(self._memory), 1)):
            if seconds(record) is not None and _target_key_of(str(record.target)) == target_key:
                return record
        return None

    def keep_only(self, kept: list) -> None:
        """Rewrite the record file with `kept` (records of this log) alone, in one atomic replacement: the workload
        file, which its lines refer to, stays as it is."""
        staging = self.files[1] + ".tmp"
        with open(staging, "w") as f:
            for record in kept:
                workload = self._memory.commit_workload(record.workload.mod)
                f.write(json.dumps([self._line_of[workload], record.as_json()], separators=(",", ":")) + "\n")
        os.replace(staging, self.files[1])


def workload_of(func) -> tuple[ConvWorkload | GradientKernel, tuple[int, int, int]] | None:
    """What a PrimFunc (a record's, a task's) computes, read from its attributes (compute.conv2d_forward,
    backward.GradientKernel): the workload and the PrimFunc's layout, (weight block, flat tile, Winograd
    tile) as `prim_func` takes them (None: not a tvmconv workload)."""
    attrs = func.attrs
    if attrs is None or WORKLOAD_ATTR not in attrs:
        return None
    wl = ConvWorkload.from_fields(json.loads(str(attrs[WORKLOAD_ATTR])))
    if GRADIENT_ATTR in attrs:
        return GRADIENT_KERNELS[str(attrs[GRADIENT_ATTR])](wl), (0, 0, 0)
    layout = (int(attrs[WEIGHT_BLOCK_ATTR]), int(attrs.get(FLAT_TILE_ATTR, 0)), int(attrs.get(WINOGRAD_ATTR, 0)))
    check_layout(wl, *layout)  # the log is read, not trusted
    return wl, layout


def seconds(record: ms.database.TuningRecord) -> float | None:
    """The record's mean measured time; None for a failed build or run."""
    if record.run_secs is None or len(record.run_secs) == 0:
        return None
    values = [float(s) for s in record.run_secs]
    mean = sum(values) / len(values)
    return None if mean >= 1e9 else mean  # MetaSchedule stores 1e10 for failed runs


def _is_note(note) -> bool:
    """Whether a summary.json entry has the fields builds read, of their types."""
    def number(v):
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
    return (isinstance(note, dict) and isinstance(note.get("trials", 0), int) and number(note.get("retimed_gflops"))
            and number(note.get("default_gflops")) and isinstance(note.get("date") or "", str))


def read_summary(path: str) -> dict:
    """A log folder's summary.json; a damaged file or entry is skipped with a warning (the records serve
    without it: builds then take a record even where it re-timed slower than the defaults)."""
    file = os.path.join(path, SUMMARY_FILE)
    if not os.path.exists(file):
        return {}
    try:
        with open(file, "rb") as f:
            summary = json.load(f)
    except (ValueError, RecursionError) as err:  # ValueError: JSON and UTF-8 errors
        warnings.warn(f"tvmconv: skipped the damaged tuning log summary {file} ({err})", RuntimeWarning)
        return {}
    if not isinstance(summary, dict):
        warnings.warn(f"tvmconv: skipped the damaged tuning log summary {file} (not a JSON object)", RuntimeWarning)
        return {}
    damaged = sorted(key for key, note in summary.items() if not _is_note(note))
    if damaged:
        warnings.warn(f"tvmconv: skipped {len(damaged)} damaged entries of the tuning log summary {file} "
                      f"({', '.join(damaged)[:200]})", RuntimeWarning)
    return {key: note for key, note in summary.items() if key not in damaged}


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
    flat_tile: int       # its conv stage's flat tile (0: rows and columns), as compute.conv2d_forward takes it
    winograd: int        # its Winograd tile (0: the direct sum), likewise
    trace: object        # the schedule, as a MetaSchedule trace
    seconds: float       # its time as the tuner measured it
    trials: int          # trials run for this workload in that folder
    reused: str | None   # how the tuned workload differs from this one, when it stands in (see best)

    @property
    def layout(self) -> tuple[int, int, int]:
        """The PrimFunc its trace replays on: workload.prim_func(*layout)."""
        return self.weight_block, self.flat_tile, self.winograd

    def __str__(self) -> str:
        reused = f", the record of the same conv with {self.reused}" if self.reused else ""
        return f"tuned ({self.trials} trials{reused}, {os.path.basename(self.folder)})"


class _Index:
    """Per log folder: its database and, per workload key, the workload, the PrimFunc layouts on record,
    its records, its fastest record's time, the trials run (its records, or more when `logs prune`
    dropped some: summary.json keeps the count) and whether the schedule without a record wins: its best
    record did not re-time RECORD_MARGIN faster (summary.json). Re-read when a file changes (a tuning run
    in another process appends to it)."""

    def __init__(self, path: str):
        self.path = path
        self.stamp = self._stamp()
        self.database = Log(path)
        self.entries: dict[str, dict] = {}
        unknown = 0
        for record in self.database.get_all_tuning_records():
            try:
                found = workload_of(record.workload.mod["main"])
            except (TypeError, ValueError, KeyError):  # attributes this tvmconv cannot read
                found, unknown = None, unknown + 1
            if found is None:
                continue
            wl, layout = found
            entry = self.entries.setdefault(wl.key, {"workload": wl, "layouts": set(), "records": 0,
                                                     "best_seconds": None})
            entry["layouts"].add(layout)
            entry["records"] += 1
            time = seconds(record)
            if time is not None and (entry["best_seconds"] is None or time < entry["best_seconds"]):
                entry["best_seconds"] = time
        if unknown:
            warnings.warn(f"tvmconv: skipped {unknown} records in {path} whose workload this tvmconv cannot read",
                          RuntimeWarning)
        summary = read_summary(path)
        for key, entry in self.entries.items():
            noted = summary.get(key, {})
            entry["trials"] = max(entry["records"], noted.get("trials", 0))
            # Re-timed after tuning, in one run: the best record against the schedule without one.
            entry["defaults_win"] = ((noted.get("retimed_gflops") or 0)
                                     < (noted.get("default_gflops") or 0) * RECORD_MARGIN)

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
    """The valid records of `workload` in `logs`, one per log and PrimFunc layout, and whether a log's records
    were passed over for not re-timing RECORD_MARGIN faster than the schedule without one (unless
    `keep_slower`)."""
    found, passed_over = [], False
    for path, idx in logs:
        entry = idx.entries.get(workload.key)
        if entry is None:
            continue
        if entry["defaults_win"] and not keep_slower:
            passed_over = True
            continue
        for layout in entry["layouts"]:
            mod = tvm.IRModule({"main": workload.prim_func(*layout)})
            record = idx.database.fastest(mod, targets.target_key(target))
            if record is not None:
                found.append(Tuned(path, *layout, record.trace, seconds(record), entry["trials"], reused))
    return found, passed_over


def best(workload: ConvWorkload | GradientKernel, target: tvm.target.Target, roots: list[str] | None = None,
         keep_slower: bool = False) -> Tuned | None:
    """The fastest valid record for `workload` on `target` in the log roots (default: `search_roots()`);
    failing that, the fastest for its closest stand-in (`workload.stand_ins()`). A record that did not
    re-time RECORD_MARGIN faster than the schedule without one after tuning (summary.json) is passed over
    unless `keep_slower`, and then no further stand-in is tried: tuning showed the rule's schedule wins
    on this workload."""
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


def seed_database(target: tvm.target.Target, exclude: str, roots: list[str] | None = None):
    """Records measured elsewhere that may seed a search for `target` (tvmconv.tuning): those under the same
    target key in the other log roots (the shipped records), and those of other target keys of the same
    kind and vector width (another CPU with the same ISA), in one in-memory database; None when there are
    none. They seed the search and warm its cost model; a build applies a record only from the target's
    own folder, so none applies before it is measured here."""
    own = targets.target_key(target)
    kind, width = own.split("-")[0], (f"-v{targets.vector_bits(target)}-" if target.kind.name == "llvm" else "")
    folders = [path for root in roots or search_roots() for path in target_folders(root)
               if path != exclude and os.path.basename(path).startswith(f"{kind}-") and width in os.path.basename(path)]
    if not folders:
        return None
    seeds = ms.database.MemoryDatabase()
    for path in folders:
        for record in Log(path).get_all_tuning_records():
            if targets.architecture(record.target) == targets.architecture(target):
                _copy(record, seeds)
    return seeds if seeds.get_all_tuning_records() else None


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
                     "used": not entry["defaults_win"], "date": noted.get("date")})
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
    with locked(destination):
        target_db = Log(destination)
        seen = {_record_identity(r) for r in target_db.get_all_tuning_records()}
        added = 0
        for source in sources:
            for record in Log(source).get_all_tuning_records():
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
    with locked(path):
        log = Log(path)
        records_by_workload: dict[int, list] = {}
        everything = log.get_all_tuning_records()
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
        if len(kept) < len(everything):  # (rewriting the same set would only reorder a shipped file's lines)
            log.keep_only(kept)
    return len(everything), len(kept)
