"""Autotuning end to end on tiny workloads: records per target key, applied at the next build, resumed,
never crossing targets; the RPC paths; the logs commands; damaged logs."""
import collections
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import tvm
from farm import board_address, tracker_with_server
from kernel_check import check_kernel
from tvm.s_tir import meta_schedule as ms

import tvmconv
from tvmconv import backward, build, cli, records, reference, runtime, targets, tuning
from tvmconv.compute import ConvWorkload

HOST = targets.resolve(None)
WL = ConvWorkload(1, 8, 8, 8, 16, (3, 3), padding="same")


def note_comparison(folder: str, wl: ConvWorkload, record_gflops: float | None, default_gflops: float | None):
    """Overwrite the re-timed figures of `wl` in a log's summary.json, keeping its trial count."""
    trials = records.read_summary(folder)[wl.key]["trials"]
    records.note_tuned(folder, wl, trials, record_gflops, default_gflops)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """WL tuned with 4 trials (one round) into a fresh log root. The comparison with the defaults is
    dropped from its summary, as in a log of an older tvmconv, so that builds take the record whichever
    of the two re-timed faster: these tests are about finding and applying records (the rule for a
    record slower than the defaults has a test of its own)."""
    root = str(tmp_path_factory.mktemp("logs"))
    (result,) = tuning.tune_workloads([WL], trials=4, log_dir=root, progress=False)
    note_comparison(result.folder, WL, result.gflops, None)
    return root, result


def test_tuning_writes_records_under_the_target_key(tuned):
    root, result = tuned
    assert result.folder == os.path.join(root, targets.target_key(HOST))
    assert set(os.listdir(result.folder)) == {records.WORKLOADS_FILE, records.RECORDS_FILE, records.SUMMARY_FILE,
                                             records.LOCK_FILE}
    assert result.measured == 4 and result.errors == 0 and result.trials == 4 and result.stopped is None
    # Honest numbers: the best record re-timed here, and the defaults timed the same way.
    assert result.gflops > 0 and result.default_gflops > 0 and result.tuner_gflops > 0


def test_next_build_uses_the_record_and_stays_correct(tuned, monkeypatch, rng):
    root, _ = tuned
    monkeypatch.setenv("TVMCONV_TUNING_LOGS", root)
    layer = tvmconv.Conv2D(16, 3, padding="same")
    x = rng.standard_normal(WL.input_shape).astype(np.float32)
    layer.build(x.shape)
    compiled = layer.compiled_kernel(x.shape)
    assert compiled.tuning is not None and compiled.tuning.trials == 4 and compiled.schedule == "tuning record"
    assert compiled.tuning.folder == os.path.join(root, targets.target_key(HOST))
    kernel, bias = layer.get_weights()
    np.testing.assert_allclose(layer(x), reference.conv2d(x, kernel, bias, padding="same"), rtol=1e-4, atol=1e-4)


def test_another_batch_does_not_reuse_the_batch_1_record(tuned, rng):
    """A record's tiles and threads were measured at its batch: another batch gets the defaults."""
    root, _ = tuned
    wl = dataclasses.replace(WL, batch=3)
    assert records.best(WL, HOST, [root]) is not None
    assert records.best(wl, HOST, [root]) is None
    compiled = build.get_kernel(wl, HOST, log_roots=[root])
    assert compiled.tuning is None and compiled.schedule != "tuning record"
    layer = tvmconv.Conv2D(16, 3, padding="same")
    x = rng.standard_normal(wl.input_shape).astype(np.float32)
    layer.build(x.shape)
    kernel, bias = layer.get_weights()
    y = runtime.aligned_empty(wl.output_shape, np.float32)
    packed = compiled.pack(kernel)
    compiled.kernel(x, compiled.kernel.weights([packed, bias]), y)
    np.testing.assert_allclose(y, reference.conv2d(x, kernel, bias, padding="same"), rtol=1e-4, atol=1e-4)


def test_same_conv_with_another_epilogue_reuses_the_record(tuned, monkeypatch, rng):
    root, _ = tuned
    monkeypatch.setenv("TVMCONV_TUNING_LOGS", root)
    layer = tvmconv.Conv2D(16, 3, padding="same", use_bias=False, activation="elu")
    x = rng.standard_normal((1, 8, 8, 8)).astype(np.float32)
    layer.build(x.shape)
    tuning_used = layer.compiled_kernel(x.shape).tuning
    assert tuning_used is not None and tuning_used.reused == "use_bias=True, activation=linear"
    z = reference.conv2d(x, layer.get_weights()[0], None, padding="same")
    np.testing.assert_allclose(layer(x), np.where(z > 0, z, np.expm1(z)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("other", ["x86-avx2", "x86-avx512", "aarch64"])
def test_records_never_apply_to_another_target(tuned, other):
    root, _ = tuned
    target = targets.resolve(other)
    if targets.target_key(target) == targets.target_key(HOST):
        pytest.skip(f"{other} is this host's own target")
    assert records.best(WL, HOST, [root]) is not None
    assert records.best(WL, target, [root]) is None
    # Another workload (one more filter) has no record either.
    assert records.best(dataclasses.replace(WL, filters=17), HOST, [root]) is None
    try:
        targets.cross_compiler(target)
    except RuntimeError as err:  # a machine without the cross compiler: the build below needs it
        pytest.skip(str(err))
    assert build.get_kernel(WL, target, log_roots=[root]).tuning is None


def test_a_record_slower_than_the_defaults_gives_way_to_them(tuned, tmp_path, monkeypatch, rng):
    """Builds pass over a record that re-timed slower than the defaults after tuning (summary.json), for the
    workload and for the layers it would stand in for; `logs list` says so."""
    root, _ = tuned
    copy = str(tmp_path / "logs")
    shutil.copytree(root, copy)
    folder = records.folder(copy, HOST)
    monkeypatch.setenv("TVMCONV_TUNING_LOGS", copy)
    x = rng.standard_normal((1, 8, 8, 8)).astype(np.float32)
    # A record must re-time clearly faster (records.RECORD_MARGIN): a 3% lead is a tie, which the defaults win.
    for record_gflops, default_gflops, used in ((1.0, 2.0, False), (2.0, 1.0, True), (1.03, 1.0, False),
                                                (1.0, None, True)):
        note_comparison(folder, WL, record_gflops, default_gflops)
        assert (records.best(WL, HOST, [copy]) is not None) == used
        assert records.best(WL, HOST, [copy], keep_slower=True).trials == 4
        (row,) = records.summarize(folder)
        assert row["used"] == used and row["default_gflops"] == default_gflops
        for wl in (WL, dataclasses.replace(WL, activation="relu")):  # a stand-in follows the same rule
            compiled = build.get_kernel(wl, HOST, log_roots=[copy])
            assert (compiled.schedule == "tuning record") == used and (compiled.tuning is None) != used
        layer = tvmconv.Conv2D(16, 3, padding="same", activation="relu")
        layer.build(x.shape)
        assert (layer.compiled_kernel(x.shape).tuning is not None) == used
        z = reference.conv2d(x, *layer.get_weights(), padding="same")
        np.testing.assert_allclose(layer(x), np.maximum(z, 0), rtol=1e-4, atol=1e-4)


def test_retiming_renews_a_stale_comparison_and_tunes_nothing(tuned, tmp_path, capsys):
    """`tvmconv logs retime` re-times each workload's best record against the defaults here, as a run does when
    it ends, and notes both in summary.json: a comparison left from older defaults (here a made-up one, the
    defaults 1000x as fast) gives way to what runs now. No record is added; a target that cannot run here is
    refused, naming it."""
    root, _ = tuned
    copy = str(tmp_path / "logs")
    shutil.copytree(root, copy)
    folder = records.folder(copy, HOST)
    record_file = os.path.join(folder, records.RECORDS_FILE)
    before = open(record_file, "rb").read()
    note_comparison(folder, WL, 1.0, 1000.0)
    assert records.best(WL, HOST, [copy]) is None
    assert cli.main(["logs", "retime", "--log-dir", copy]) == 0
    out = capsys.readouterr().out
    (row,) = records.summarize(folder)
    assert row["trials"] == 4 and row["records"] == 4 and open(record_file, "rb").read() == before
    assert 1.0 < row["retimed_gflops"] and 0 < row["default_gflops"] < 1000.0
    assert WL.label in out and f"{row['default_gflops']:9.1f}" in out
    # Builds follow the renewed comparison: the record where it re-timed RECORD_MARGIN faster.
    assert (records.best(WL, HOST, [copy]) is not None) == row["used"]
    # Nothing tuned for this target in an empty root; a target of another ISA is refused.
    assert tuning.retime(log_dir=str(tmp_path / "empty")) == [] and not os.path.exists(tmp_path / "empty")
    assert cli.main(["logs", "retime", "--log-dir", copy, "--target", "aarch64"]) == 2
    assert "aarch64" in capsys.readouterr().err


def test_rerun_resumes_and_adds_only_missing_trials(tuned, tmp_path):
    root, _ = tuned
    copy = str(tmp_path / "logs")
    shutil.copytree(root, copy)
    (more,) = tuning.tune_workloads([WL], trials=8, log_dir=copy, progress=False)
    assert more.measured == 4 and more.trials == 8
    (again,) = tuning.tune_workloads([WL], trials=8, log_dir=copy, progress=False)
    assert again.measured == 0 and again.trials == 8
    # logs prune keeps the fastest records of each PrimFunc layout (the first round's are all the defaults'
    # layout, the search's may be others), and the trial count survives it.
    folder = more.folder
    layouts = collections.Counter(records.workload_of(r.workload.mod["main"])[1]
                                  for r in records.Log(folder).get_all_tuning_records())
    kept = sum(min(n, 2) for n in layouts.values())
    assert records.prune(folder, keep=2) == (8, kept)
    # A prune that drops nothing leaves the record file as it was.
    record_file = os.path.join(folder, "database_tuning_record.json")
    before = open(record_file, "rb").read()
    assert records.prune(folder, keep=2) == (kept, kept) and open(record_file, "rb").read() == before
    (row,) = records.summarize(folder)
    assert row["records"] == kept and row["trials"] == 8 and row["tuner_gflops"] > 0
    assert row["retimed_gflops"] == again.gflops and row["default_gflops"] == again.default_gflops
    assert records.best(WL, HOST, [copy], keep_slower=True).trials == 8
    # Resuming after a prune counts the trials run before it, not the records left.
    (resumed,) = tuning.tune_workloads([WL], trials=12, log_dir=copy, progress=False)
    assert resumed.measured == 4 and resumed.trials == 12 and records.summarize(folder)[0]["trials"] == 12


def test_time_budget_stops_after_a_round_and_keeps_its_records(tmp_path):
    wl = dataclasses.replace(WL, filters=8)
    (result,) = tuning.tune_workloads([wl], trials=64, log_dir=str(tmp_path), time_budget=0.01, progress=False)
    assert result.stopped == "time budget"
    assert 0 < result.trials < 64 and result.trials == result.measured
    assert result.gflops > 0


def test_auto_space_records_apply(tmp_path, rng):
    wl = ConvWorkload(1, 6, 6, 4, 8, (3, 3), padding="valid", use_bias=False)
    (result,) = tuning.tune_workloads([wl], trials=2, log_dir=str(tmp_path), space="auto", progress=False)
    assert result.measured == 2 and result.gflops > 0
    # MetaSchedule's generated space alone (its tiling samples perfect tiles, which the template never does):
    # no first round of the template's programs near the defaults
    logged = records.Log(records.folder(str(tmp_path), HOST)).get_all_tuning_records()
    assert len(logged) == 2 and all("sample_perfect_tile" in str(r.trace) for r in logged)
    compiled = build.get_kernel(wl, HOST, record=records.best(wl, HOST, [str(tmp_path)], keep_slower=True))
    assert compiled.tuning is not None and compiled.schedule == "tuning record"
    x = rng.standard_normal(wl.input_shape).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 4, 8)).astype(np.float32)
    y = runtime.aligned_empty(wl.output_shape, np.float32)
    packed = compiled.pack(kernel)
    compiled.kernel(x, compiled.kernel.weights([packed]), y)
    np.testing.assert_allclose(y, reference.conv2d(x, kernel, None), rtol=1e-4, atol=1e-4)


def test_model_workloads_and_budget_split_by_flops():
    model = tvmconv.Sequential()
    tvmconv.layer_conv_2d(model, 8, 3, padding="same", input_shape=(16, 16, 3))
    for _ in range(3):
        tvmconv.layer_conv_2d(model, 64, 3, padding="same")
    workloads = tuning.conv_workloads(model, None)  # the last two layers share one workload: tuned once
    assert [(wl.in_channels, wl.filters) for wl in workloads] == [(3, 8), (8, 64), (64, 64)]
    budgets = tuning.trial_budgets(workloads, 1000)
    assert min(budgets) == tuning.MIN_TRIALS_PER_WORKLOAD and budgets[2] > budgets[1] > budgets[0]
    assert tuning.trial_budgets(workloads[:1], 5) == [5]
    # Training's forward workloads: dx (stride 1, "same": one phase) and dW, each once; no pre-activation
    # for these linear layers.
    training = tuning.conv_workloads(model, None, gradients=True)
    (phase,), _ = backward.input_gradient_phases(workloads[0])
    assert training[:3] == [workloads[0], phase.workload, backward.weight_gradient_workload(workloads[0])]
    assert len(training) == len(set(training)) and backward.weight_gradient_workload(workloads[2]) in training
    relu = tvmconv.Conv2D(4, 3, strides=2, padding="same", activation="relu")
    strided = tuning.conv_workloads(relu, (1, 9, 9, 2), gradients=True)
    # the layer, its pre-activation, dx in 4 stride phases (3x3 taps split 2+1 per axis), dW, and the
    # kernels that are not convolutions: relu's derivative from the output, dW's regrouped input
    assert len(strided) == 9 and strided[1].activation == "linear"
    assert sorted(wl.kernel_size for wl in strided[2:6]) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert [(k.part, k.workload) for k in strided[7:]] == [("activation-from-output", strided[0]),
                                                          ("kernel-gradient-image", strided[0])]


# ~2 minutes on 2 cores (every gradient kernel of a layer tuned): behind the marker, to keep the
# default run near 15 minutes.
@pytest.mark.slow
def test_gradient_kernels_tune_and_builds_use_a_record_only_where_it_is_faster(tmp_path, monkeypatch, rng):
    """The gradient kernels that are not convolutions (dW's own kernels for pointwise and depthwise layers,
    the activation's derivative, dW's regrouped input) tune in MetaSchedule's generated space; the record
    and the kernel's own schedule are re-timed, and builds take the record only if it won by the margin."""
    model = tvmconv.Sequential([tvmconv.Conv2D(16, 1, input_shape=(6, 6, 8)),
                                tvmconv.Conv2D(16, 3, padding="same", groups=16),
                                tvmconv.Conv2D(8, 3, activation="relu")])
    kernels = [wl for wl in tuning.conv_workloads(model, None, gradients=True)
               if isinstance(wl, backward.GradientKernel)]
    assert [k.part for k in kernels] == ["pointwise-kernel", "depthwise-kernel", "activation-from-output",
                                         "kernel-gradient-image"]
    results = tuning.tune_workloads(kernels, trials=4, min_trials=4, log_dir=str(tmp_path), progress=False)
    folder = records.folder(str(tmp_path), HOST)
    summary = records.read_summary(folder)
    monkeypatch.setenv("TVMCONV_TUNING_LOGS", str(tmp_path))
    for kernel, result in zip(kernels, results, strict=True):
        # A small elementwise kernel's generated space can hold fewer distinct candidates than asked for.
        assert 1 <= result.trials <= 4 and result.errors == 0 and result.gflops > 0 and result.default_gflops > 0
        assert summary[kernel.key]["retimed_gflops"] == result.gflops
        assert summary[kernel.key]["default_gflops"] == result.default_gflops
        func = kernel.prim_func()
        used = records.best(kernel, HOST)
        assert (used is not None) == (result.gflops >= result.default_gflops * records.RECORD_MARGIN)
        record = records.best(kernel, HOST, keep_slower=True)
        assert record.trials == result.trials
        # The record's schedule computes what the kernel's own schedule does.
        arrays = [rng.standard_normal([int(d) for d in p.shape]).astype(np.float32) for p in func.params]
        outputs = []
        for choice in (record, False):
            out = runtime.aligned_empty(arrays[-1].shape, np.float32)
            build.get_kernel(kernel, HOST, record=choice).kernel.function(
                *[runtime.input_tensor(a) for a in arrays[:-1]], runtime.output_tensor(out))
            outputs.append(out)
        np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    # Whichever schedules the builds chose, the gradients of a training step are right.
    inputs = rng.standard_normal((1, 6, 6, 8)).astype(np.float32)
    for layer in model.layers:
        y = layer(inputs)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        got = layer.gradients(inputs, dy, output=y)
        exact = tvmconv.Conv2D(layer.filters, layer.kernel_size, padding=layer.padding, groups=layer.groups,
                               activation=layer.activation, dtype="float64")
        exact.build(inputs.shape)
        exact.set_weights([w.astype(np.float64) for w in layer.get_weights()])
        want = exact.gradients(inputs.astype(np.float64), dy.astype(np.float64))
        for name in ("input", "kernel", "bias"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)
        inputs = y
    with pytest.raises(NotImplementedError, match="not over RPC"):
        tuning.tune(model, None, trials=4, log_dir=str(tmp_path), rpc="127.0.0.1:9", gradients=True)


def _messages(call) -> tuple[object, list[str]]:
    """call()'s result and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught]


def test_a_damaged_log_line_is_skipped_with_a_warning_naming_it(tuned, tmp_path, monkeypatch, rng):
    """A garbled workload line (and the records that refer to it) and a record line cut short by a crash are
    skipped, each named file:line; the rest of the log serves, and no build raises."""
    root, _ = tuned
    copy = tmp_path / "logs"
    shutil.copytree(root, copy)
    workloads_file, records_file = (copy / targets.target_key(HOST) / name
                                    for name in (records.WORKLOADS_FILE, records.RECORDS_FILE))
    record_lines = records_file.read_text().splitlines()
    workload_lines = workloads_file.read_text().splitlines()
    victim = min(json.loads(line)[0] for line in record_lines)
    workload_lines[victim] = workload_lines[victim][:100]
    workloads_file.write_text("\n".join(workload_lines) + "\n")
    records_file.write_text("\n".join(record_lines) + '\n[0, ["truncated"\n')
    found, messages = _messages(lambda: records.best(WL, HOST, [str(copy)], keep_slower=True))
    skipped = sorted(int(m.split(":")[2].split(" ")[0]) for m in messages if f"{records_file}:" in m)
    orphans = [n for n, line in enumerate(record_lines, 1) if json.loads(line)[0] == victim]
    assert skipped == [*orphans, len(record_lines) + 1]
    assert any(f"skipped line {workloads_file}:{victim + 1} of a damaged tuning log" in m for m in messages)
    assert (found is not None) == (len(orphans) < len(record_lines))
    monkeypatch.setenv("TVMCONV_TUNING_LOGS", str(copy))
    for layer in (tvmconv.Conv2D(16, 3, padding="same"), tvmconv.Conv2D(5, 1)):  # with records, and without
        x = rng.standard_normal(WL.input_shape).astype(np.float32)
        layer.build(x.shape)
        np.testing.assert_allclose(layer(x), reference.conv2d(x, *layer.get_weights(), padding=layer.padding),
                                   rtol=1e-4, atol=1e-4)


def test_a_flat_tile_record_is_found_and_applied_and_a_forged_layout_skipped(tmp_path):
    """A record of a flat-tile task (tvmconv.tuning.tasks) is found under its layout, (weight block, flat tile),
    and replays on that PrimFunc; a record whose PrimFunc claims a negative flat tile is skipped with a warning."""
    wl = ConvWorkload(1, 7, 7, 8, 32, (3, 3), padding="same")
    context = next(c for c in tuning.tasks(wl, HOST, "template") if records.workload_of(c.mod["main"])[1][1])
    layout = records.workload_of(context.mod["main"])[1]
    sampled = context.generate_design_space()[0]
    forged = tvm.IRModule({"main": wl.prim_func(*layout).with_attr(tvmconv.compute.FLAT_TILE_ATTR, -1)})
    folder = records.folder(str(tmp_path), HOST)
    with records.locked(folder):
        log = records.Log(folder)
        for mod in (context.mod, forged):
            log.commit_tuning_record(ms.database.TuningRecord(sampled.trace, log.commit_workload(mod), [1e-4], HOST,
                                                              ms.arg_info.ArgInfo.from_entry_func(mod)))
    tuned, messages = _messages(lambda: records.best(wl, HOST, [str(tmp_path)], keep_slower=True))
    assert any("skipped 1 records" in m for m in messages), messages
    assert tuned.layout == layout
    assert check_kernel(wl, record=tuned).schedule == "tuning record"


def test_the_search_steps_one_sampled_tile_size_at_a_time():
    """The template's tasks mutate with tvmconv's mutation alone (MetaSchedule's own mutators find nothing of
    theirs in the template's traces): one sampled tile size moved to a neighbouring candidate. Every mutated
    program replays and computes the convolution."""
    (context, *_) = tuning.tasks(WL, HOST, "template")
    (mutation,) = context.space_generator.mutator_probs  # as the search strategy calls it, through the FFI
    traces = [space.trace for space in context.generate_design_space()]
    checked = 0
    for n in range(24):
        trace = traces[n % len(traces)]
        mutated = mutation.apply(trace)
        before, after = ([int(t.get_decision(i)) for i in t.insts if i.kind.name == "SampleCategorical"]
                         for t in (trace, mutated))
        moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
        assert len(moved) == 1 and abs(moved[0][0] - moved[0][1]) == 1, (before, after)
        if checked < 2:
            tuned = records.Tuned("mutated", *records.workload_of(context.mod["main"])[1], mutated, 1.0, 1, None)
            assert check_kernel(WL, record=tuned).schedule == "tuning record"
            checked += 1


def test_a_damaged_summary_is_skipped_with_a_warning(tuned, tmp_path):
    root, _ = tuned
    copy = tmp_path / "logs"
    shutil.copytree(root, copy)
    summary = copy / targets.target_key(HOST) / records.SUMMARY_FILE
    for text in ("{not json", '{"' + WL.key + '": {"trials": "many"}}', "[1, 2]"):
        summary.write_text(text)
        found, messages = _messages(lambda: records.best(WL, HOST, [str(copy)]))
        assert found is not None and found.trials == 4  # counted from the records themselves
        assert any(f"tuning log summary {summary}" in m for m in messages)


def test_a_record_applies_only_where_its_own_target_has_the_builds_key(tuned, tmp_path):
    """MetaSchedule matches records by workload alone: a record of another target, even in this target's folder
    (copied there by hand, or merged), never applies."""
    root, _ = tuned
    copy = tmp_path / "logs"
    shutil.copytree(root, copy)
    other = next(targets.resolve(name) for name in ("aarch64", "x86-avx2")
                 if targets.target_key(targets.resolve(name)) != targets.target_key(HOST))
    records_file = copy / targets.target_key(HOST) / records.RECORDS_FILE
    lines = [json.loads(line) for line in records_file.read_text().splitlines()]
    for _, record in lines:
        record[2] = json.loads(str(other))  # a record is [trace, run_secs, target, args_info]
    records_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert records.best(WL, HOST, [str(copy)], keep_slower=True) is None
    assert build.get_kernel(WL, HOST, log_roots=[str(copy)]).tuning is None


def test_appends_after_a_torn_line_keep_every_record_with_its_workload(tuned, tmp_path):
    """A crash mid-write leaves a line without its newline in either file. The next writer ends it (a damaged line
    of its own, skipped) and numbers its workloads by line, so its records name the right ones; MetaSchedule's
    own JSONDatabase numbers them otherwise (apache/tvm's CommitWorkload) and would misfile them."""
    root, _ = tuned
    copy = tmp_path / "logs"
    shutil.copytree(root, copy)
    folder = copy / targets.target_key(HOST)
    source = records.Log(str(folder))
    for name in (records.WORKLOADS_FILE, records.RECORDS_FILE):
        with open(folder / name, "a") as f:
            f.write('["1234", "eyJ0')  # torn mid-line
    other = ConvWorkload(1, 6, 6, 4, 8, (3, 3), padding="same")
    with records.locked(str(folder)):
        log = records.Log(str(folder))
        record = source.get_all_tuning_records()[0]
        moved = tvm.IRModule({"main": other.prim_func(*records.workload_of(record.workload.mod["main"])[1])})
        log.commit_tuning_record(ms.database.TuningRecord(record.trace, log.commit_workload(moved), record.run_secs,
                                                          record.target, record.args_info))
    reread, messages = _messages(lambda: records.Log(str(folder)))
    assert sum("skipped line" in m for m in messages) == 2  # the two torn lines, now ended
    assert len(reread) == len(source) + 1
    assert reread.fastest(moved, targets.target_key(HOST)) is not None


def test_tuning_through_a_tracker_on_localhost(tmp_path):
    with tracker_with_server(tmp_path, "tvmconv-tune-cpu") as rpc:
        (result,) = tuning.tune_workloads([WL], trials=2, log_dir=str(tmp_path / "logs"), rpc=rpc, progress=False)
    assert result.measured == 2 and result.errors == 0 and result.gflops > 0
    assert records.best(WL, HOST, [str(tmp_path / "logs")], keep_slower=True).trials == 2


@pytest.mark.arm
def test_tuning_on_the_board_makes_aarch64_records(tmp_path):
    board = board_address()
    target = targets.resolve("aarch64")
    wl = ConvWorkload(1, 6, 6, 4, 8, (3, 3), padding="same")
    (result,) = tuning.tune_workloads([wl], trials=2, target="aarch64", log_dir=str(tmp_path), rpc=board,
                                      progress=False)
    assert result.measured == 2 and result.errors == 0 and result.gflops > 0
    assert os.path.basename(result.folder) == targets.target_key(target)
    compiled = build.get_kernel(wl, target, record=records.best(wl, target, [str(tmp_path)], keep_slower=True))
    assert compiled.tuning is not None and compiled.kernel is None  # aarch64 code: built here, not run here
    with open(compiled.library, "rb") as f:
        assert f.read(20)[18] == 183  # ELF e_machine EM_AARCH64


def test_cli_tune_list_merge_prune(tmp_path, capsys):
    root, other = str(tmp_path / "a"), str(tmp_path / "b")
    assert cli.main(["tune", "6x6x4:8:3x3:padding=same", "--trials", "2", "--log-dir", root]) == 0
    assert cli.main(["tune", "6x6x4:8:1x1", "--trials", "2", "--log-dir", other]) == 0
    capsys.readouterr()
    assert cli.main(["logs", "merge", other, "--log-dir", root]) == 0
    assert "2 new records" in capsys.readouterr().out
    assert cli.main(["logs", "list", "--log-dir", root]) == 0
    listing = capsys.readouterr().out
    assert "(1, 6, 6, 4)->8 3x3 same" in listing and "(1, 6, 6, 4)->8 1x1 valid" in listing
    assert cli.main(["logs", "prune", "--keep", "1", "--log-dir", root]) == 0
    assert "4 records -> 2" in capsys.readouterr().out
    assert cli.main(["tune", "6x6:8:3x3", "--log-dir", root]) == 2
    assert "HxWxC" in capsys.readouterr().err


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="`space`"):
        tuning.tune_workloads([WL], space="fast")
    with pytest.raises(ValueError, match="`trials`"):
        tuning.tune_workloads([WL], trials=0)
    with pytest.raises(ValueError, match="`time_budget`"):
        tuning.tune_workloads([WL], time_budget=-1)
    with pytest.raises(ValueError, match="`rpc`"):
        tuning.tune_workloads([WL], rpc="no-port")
    with pytest.raises(TypeError, match="Conv2D"):
        tuning.tune(object(), (1, 8, 8, 8))
    with pytest.raises(ValueError, match="input_shape"):
        tuning.tune(tvmconv.Conv2D(4, 3), (8, 8))


def _tuning_with_a_record(log_dir, **popen) -> subprocess.Popen:
    """`tvmconv tune` of WL (64 trials) into `log_dir`, once it has written its first record."""
    log = log_dir / targets.target_key(HOST) / records.RECORDS_FILE
    process = subprocess.Popen([sys.executable, "-m", "tvmconv.cli", "tune", "8x8x8:16:3x3:padding=same",
                                "--trials", "64", "--log-dir", str(log_dir)], stderr=subprocess.PIPE, **popen)
    deadline = time.monotonic() + 600
    while not (log.exists() and log.read_bytes().count(b"\n") >= 1):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    return process


def test_ctrl_c_ends_the_run_after_a_round_and_keeps_its_records(tmp_path):
    """The CLI, interrupted once it has measured a round: it re-times what it has and exits normally."""
    log = tmp_path / targets.target_key(HOST) / records.RECORDS_FILE
    process = _tuning_with_a_record(tmp_path, stdout=subprocess.PIPE, text=True)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "(interrupted)" in out
    trials = log.read_text().count("\n")
    assert 0 < trials < 64 and records.best(WL, HOST, [str(tmp_path)], keep_slower=True).trials == trials


@pytest.mark.slow
def test_a_tune_killed_mid_round_leaves_logs_that_load_and_resume(tmp_path):
    """SIGKILL to the tuner and its builder and runner workers while it writes a round's records."""
    process = _tuning_with_a_record(tmp_path, stdout=subprocess.DEVNULL, start_new_session=True)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(60)
    found = records.best(WL, HOST, [str(tmp_path)], keep_slower=True)
    assert found is not None and 1 <= found.trials < 64
    (resumed,) = tuning.tune_workloads([WL], trials=found.trials + 4, log_dir=str(tmp_path), progress=False)
    assert resumed.measured == 4 and resumed.trials == found.trials + 4 and resumed.gflops > 0
    assert records.best(WL, HOST, [str(tmp_path)], keep_slower=True).trials == found.trials + 4


@pytest.mark.slow
def test_two_processes_tuning_into_one_log_dir_lose_no_records(tmp_path):
    """Each holds the folder's lock while it writes, and reads the log again once it has it."""
    workloads = {"8x8x8:16:3x3:padding=same": WL, "6x6x4:8:3x3:padding=same": ConvWorkload(1, 6, 6, 4, 8, (3, 3),
                                                                                          padding="same")}
    processes = [subprocess.Popen([sys.executable, "-m", "tvmconv.cli", "tune", text, "--trials", "4", "--log-dir",
                                   str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for text in workloads]
    for process in processes:
        out, err = process.communicate(timeout=1200)
        assert process.returncode == 0, err
    found, messages = _messages(lambda: [records.best(wl, HOST, [str(tmp_path)], keep_slower=True)
                                         for wl in workloads.values()])
    assert [tuned.trials for tuned in found] == [4, 4] and not messages
    log = tmp_path / targets.target_key(HOST) / records.RECORDS_FILE
    assert log.read_text().count("\n") == 8


def test_shipped_logs_are_readable_and_apply_where_they_match():
    folders = records.target_folders(records.shipped_root())
    for folder in folders:
        rows = records.summarize(folder)
        assert rows and all(row["records"] >= 1 and row["trials"] >= row["records"] for row in rows)
    host_folder = records.folder(records.shipped_root(), HOST)
    if host_folder in folders:  # on the CPU they were made for, records apply where they beat the defaults
        for row in records.summarize(host_folder)[:4]:
            assert (build.get_kernel(row["workload"], HOST).tuning is not None) == row["used"]


def test_a_new_cpu_starts_from_what_another_cpu_of_its_isa_measured(tmp_path, rng):
    """Records of another target key with the same vector width seed the search and its cost model; they never
    apply to a build before they are measured on this target."""
    preset = "x86-avx512" if targets.vector_bits(HOST) == 512 else "x86-avx2"
    other = targets.resolve(preset)
    root = str(tmp_path)
    (seeded_from,) = tuning.tune_workloads([WL], trials=4, target=preset, log_dir=root, progress=False)
    assert seeded_from.trials == 4
    assert records.best(WL, HOST, [root]) is None  # another CPU's records never apply here
    seeds = records.seed_database(HOST, exclude=records.folder(root, HOST), roots=[root])
    assert len(seeds.get_all_tuning_records()) == 4
    # The search's database hands out this target's records first, then the seeds; it writes only here.
    log = records.Log(records.folder(root, HOST))
    seeded = tuning._Seeded(log, seeds)
    layout = records.workload_of(seeds.get_all_tuning_records()[0].workload.mod["main"])[1]
    top = seeded.get_top_k(seeded.commit_workload(tvm.IRModule({"main": WL.prim_func(*layout)})), 3)
    assert top and all(targets.target_key(r.target) == targets.target_key(other) for r in top)
    assert len(log.get_all_tuning_records()) == 0
    cost_model = tvm.s_tir.meta_schedule.cost_model.XGBModel(num_warmup_samples=1)
    assert tuning._warm_start(cost_model, tuning.tasks(WL, HOST, "template"), seeds) >= 1
    (result,) = tuning.tune_workloads([WL], trials=4, log_dir=root, progress=False)
    assert result.measured == 4 and result.errors == 0 and result.gflops > 0
    compiled = build.get_kernel(WL, HOST, record=records.best(WL, HOST, [root], keep_slower=True))
    assert compiled.tuning.folder == records.folder(root, HOST)
    x = rng.standard_normal(WL.input_shape).astype(np.float32)
    kernel, bias = rng.standard_normal(WL.weights_shape).astype(np.float32), np.zeros(16, np.float32)
    y = runtime.aligned_empty(WL.output_shape, np.float32)
    compiled.kernel(x, compiled.kernel.weights([compiled.pack(kernel), bias]), y)
    np.testing.assert_allclose(y, reference.conv2d(x, kernel, None, padding="same"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("wl", [
    # (flat tiles and padding after the input: 46 s together, behind `slow`; the default run keeps two)
    pytest.param(ConvWorkload(1, 7, 7, 16, 32, (3, 3), padding="same"), marks=pytest.mark.slow),  # flat tiles
    ConvWorkload(1, 14, 14, 32, 64, (1, 1)),                               # tall tiles
    ConvWorkload(1, 16, 16, 16, 16, (3, 3), padding="same", groups=16),    # depthwise, bound checks, unrolled window
    pytest.param(ConvWorkload(1, 16, 16, 8, 32, (3, 3), strides=(2, 2), padding="same"),
                 marks=pytest.mark.slow),                                    # padding after the input
], ids=lambda wl: wl.label)
def test_the_first_round_measures_the_defaults_and_their_neighbours(wl, tmp_path):
    """The rule's defaults are a program of the template's space: its trace, decisions at the default tile
    sizes, schedules exactly what a build with the defaults does. Each neighbour moves one decision a step, or
    keeps the decisions in another structural variant. A first tuning run measures them all and writes them to
    the log."""
    rule = tvmconv.schedules.find_rule(HOST)
    defaults = rule.default_knobs(wl, HOST)
    func = wl.prim_func(*defaults.layout)
    context, traces = tuning.neighbourhood(wl, HOST, tuning.tasks(wl, HOST, "template"))
    assert records.workload_of(context.mod["main"])[1] == defaults.layout
    tuned = records.Tuned("defaults", *defaults.layout, traces[0], 1.0, 1, None)
    assert records.apply(tuned, func).mod["main"].script() == build.scheduled(wl, HOST, rule, defaults).script()

    def decisions(trace):
        return [int(trace.get_decision(i)) for i in trace.insts if i.kind.name == "SampleCategorical"]

    def program(trace):  # without the postprocessing a measured record's trace carries
        sch = tvm.s_tir.Schedule(func)
        trace.apply_to_schedule(sch, remove_postproc=True)
        return sch.mod["main"].script()
    moved = [sum(abs(a - b) for a, b in zip(decisions(t), decisions(traces[0]), strict=True)) for t in traces[1:]]
    assert set(moved) <= {0, 1} and 1 in moved
    assert len({program(t) for t in traces}) == len(traces)  # each a program of its own
    (result,) = tuning.tune_workloads([wl], trials=len(traces), log_dir=str(tmp_path), progress=False)
    assert result.measured == len(traces) and result.errors == 0
    logged = records.Log(records.folder(str(tmp_path), HOST)).get_all_tuning_records()
    assert sorted(program(r.trace) for r in logged) == sorted(program(t) for t in traces)


def test_trials_follow_the_stack_time_and_the_largest_goes_first(tmp_path):
    big, small = ConvWorkload(1, 16, 16, 32, 32, (3, 3), padding="same"), ConvWorkload(1, 4, 4, 8, 8, (1, 1))
    seconds = tuning.stack_seconds([big, small], [1, 3], HOST)
    assert seconds[0] > seconds[1] > 0
    budgets = tuning.trial_budgets([big, small], 40, min_trials=4, weights=seconds)
    assert budgets[0] > budgets[1] >= 4
    # With a budget that ends after the first round, the workload with the larger share got it.
    results = tuning.tune_workloads([small, big], trials=40, min_trials=4, counts=[3, 1], log_dir=str(tmp_path),
                                    time_budget=0.01, progress=False)
    assert [r.workload for r in results] == [small, big]
    assert results[1].measured > 0 and results[0].measured == 0 and results[0].stopped == "time budget"


@pytest.mark.slow
def test_a_time_budget_is_shared_by_the_stack_time(tmp_path):
    # Two workloads of about the same time, a budget of about four rounds and trials for many more: the
    # first one's slice (half the budget) ends after a round or two, and the second gets the rest (before,
    # the first one kept the whole budget as long as it had trials left).
    same, valid = ConvWorkload(1, 16, 16, 32, 32, (3, 3), padding="same"), ConvWorkload(1, 18, 18, 32, 32, (3, 3))
    started = time.monotonic()
    (probe,) = tuning.tune_workloads([same], trials=16, log_dir=str(tmp_path / "probe"), progress=False)
    round_seconds = time.monotonic() - started
    results = tuning.tune_workloads([same, valid], trials=800, min_trials=16, log_dir=str(tmp_path / "run"),
                                    time_budget=4 * round_seconds, progress=False)
    assert probe.measured == 16
    assert all(0 < r.measured < 400 and r.stopped == "time budget" for r in results), results
