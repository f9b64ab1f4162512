"""Autotuning end to end on tiny workloads: records per target key, applied at the next build, resumed,
never crossing targets; the RPC paths; the logs commands; damaged logs."""
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from farm import board_address, tracker_with_server

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
    assert set(os.listdir(result.folder)) == {records.WORKLOADS_FILE, records.RECORDS_FILE, records.SUMMARY_FILE}
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


def test_larger_batch_reuses_the_batch_1_record(tuned, rng):
    root, _ = tuned
    wl = dataclasses.replace(WL, batch=3)
    compiled = build.get_kernel(wl, HOST, log_roots=[root])
    assert compiled.tuning is not None and compiled.tuning.reused == "batch=1"
    layer = tvmconv.Conv2D(16, 3, padding="same")
    x = rng.standard_normal(wl.input_shape).astype(np.float32)
    layer.build(x.shape)
    kernel, bias = layer.get_weights()
    y = runtime.aligned_empty(wl.output_shape, np.float32)
    packed = tvmconv.compute.pack_weights(kernel, compiled.weight_block)
    compiled.kernel(x, compiled.kernel.weights([packed, bias]), y)
    np.testing.assert_allclose(y, reference.conv2d(x, kernel, bias, padding="same"), rtol=1e-4, atol=1e-4)


def test_same_conv_with_another_epilogue_reuses_the_record(tuned, monkeypatch, rng):
    root, _ = tuned
    monkeypatch.setenv("TVMCONV_TUNING_LOGS", root)
    layer = tvmconv.Conv2D(16, 3, padding="same", use_bias=False, activation="elu")
    x = rng.standard_normal((2, 8, 8, 8)).astype(np.float32)
    layer.build(x.shape)
    tuning_used = layer.compiled_kernel(x.shape).tuning
    assert tuning_used is not None and tuning_used.reused == "batch=1, use_bias=True, activation=linear"
    z = reference.conv2d(x, layer.get_weights()[0], None, padding="same")
    np.testing.assert_allclose(layer(x), np.where(z > 0, z, np.expm1(z)), rtol=1e-4, atol=1e-4)


def test_records_never_apply_to_another_target(tuned):
    root, _ = tuned
    assert records.best(WL, HOST, [root]) is not None
    for other in ("x86-avx2", "x86-avx512", "aarch64"):
        target = targets.resolve(other)
        if targets.target_key(target) != targets.target_key(HOST):
            assert records.best(WL, target, [root]) is None
            assert build.get_kernel(WL, target, log_roots=[root]).tuning is None
    # Another workload (one more filter) has no record either.
    assert records.best(dataclasses.replace(WL, filters=17), HOST, [root]) is None


def test_a_record_slower_than_the_defaults_gives_way_to_them(tuned, tmp_path, monkeypatch, rng):
    """Builds pass over a record that re-timed slower than the defaults after tuning (summary.json), for the
    workload and for the layers it would stand in for; `logs list` says so."""
    root, _ = tuned
    copy = str(tmp_path / "logs")
    shutil.copytree(root, copy)
    folder = records.folder(copy, HOST)
    monkeypatch.setenv("TVMCONV_TUNING_LOGS", copy)
    x = rng.standard_normal((2, 8, 8, 8)).astype(np.float32)
    for record_gflops, default_gflops, used in ((1.0, 2.0, False), (2.0, 1.0, True), (1.0, None, True)):
        note_comparison(folder, WL, record_gflops, default_gflops)
        assert (records.best(WL, HOST, [copy]) is not None) == used
        assert records.best(WL, HOST, [copy], keep_slower=True).trials == 4
        (row,) = records.summarize(folder)
        assert row["used"] == used and row["default_gflops"] == default_gflops
        for wl in (WL, dataclasses.replace(WL, batch=2, activation="relu")):  # a stand-in follows the same rule
            compiled = build.get_kernel(wl, HOST, log_roots=[copy])
            assert (compiled.schedule == "tuning record") == used and (compiled.tuning is None) != used
        layer = tvmconv.Conv2D(16, 3, padding="same", activation="relu")
        layer.build(x.shape)
        assert (layer.compiled_kernel(x.shape).tuning is not None) == used
        z = reference.conv2d(x, *layer.get_weights(), padding="same")
        np.testing.assert_allclose(layer(x), np.maximum(z, 0), rtol=1e-4, atol=1e-4)


def test_rerun_resumes_and_adds_only_missing_trials(tuned, tmp_path):
    root, _ = tuned
    copy = str(tmp_path / "logs")
    shutil.copytree(root, copy)
    (more,) = tuning.tune_workloads([WL], trials=8, log_dir=copy, progress=False)
    assert more.measured == 4 and more.trials == 8
    (again,) = tuning.tune_workloads([WL], trials=8, log_dir=copy, progress=False)
    assert again.measured == 0 and again.trials == 8
    # logs prune keeps the fastest records, and the trial count survives it.
    folder = more.folder
    assert records.prune(folder, keep=2) == (8, 2)
    (row,) = records.summarize(folder)
    assert row["records"] == 2 and row["trials"] == 8 and row["tuner_gflops"] > 0
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
    compiled = build.get_kernel(wl, HOST, record=records.best(wl, HOST, [str(tmp_path)], keep_slower=True))
    assert compiled.tuning is not None and compiled.schedule == "tuning record"
    x = rng.standard_normal(wl.input_shape).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 4, 8)).astype(np.float32)
    y = runtime.aligned_empty(wl.output_shape, np.float32)
    packed = tvmconv.compute.pack_weights(kernel, compiled.weight_block)
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


def test_gradient_kernels_tune_and_builds_use_a_record_only_where_it_is_faster(tmp_path, monkeypatch, rng):
    """The gradient kernels that are not convolutions (dW's own kernels for pointwise and depthwise layers,
    the activation's derivative, dW's regrouped input) tune in MetaSchedule's generated space; the record
    and the kernel's own schedule are re-timed, and builds take the record only if it won."""
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
        assert (used is not None) == (result.gflops >= result.default_gflops)
        record = records.best(kernel, HOST, keep_slower=True)
        assert record.trials == result.trials
        # The record's schedule computes what the kernel's own schedule does.
        arrays = [rng.standard_normal([int(d) for d in p.shape]).astype(np.float32) for p in func.params]
        outputs = []
        for choice in (record, False):
            out = runtime.aligned_empty(arrays[-1].shape, np.float32)
            build.get_kernel(kernel, HOST, record=choice).kernel.function(
                *[runtime.input_tensor(a) for a in arrays[:-1]], runtime.to_tensor(out))
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


def test_corrupt_log_names_the_file(tuned, tmp_path):
    root, _ = tuned
    copy = tmp_path / "logs"
    shutil.copytree(root, copy)
    log = copy / targets.target_key(HOST) / records.RECORDS_FILE
    with open(log, "a") as f:
        f.write('[0, ["truncated"\n')
    records._indexes.clear()
    with pytest.raises(ValueError, match=f"corrupt tuning log {log}, line 5"):
        build.get_kernel(WL, HOST, log_roots=[str(copy)])
    summary = copy / targets.target_key(HOST) / records.SUMMARY_FILE
    summary.write_text("{not json")
    with pytest.raises(ValueError, match=f"corrupt tuning log {summary}"):
        records.read_summary(str(summary.parent))


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


def test_ctrl_c_ends_the_run_after_a_round_and_keeps_its_records(tmp_path):
    """The CLI, interrupted once it has measured a round: it re-times what it has and exits normally."""
    log = tmp_path / targets.target_key(HOST) / records.RECORDS_FILE
    process = subprocess.Popen([sys.executable, "-m", "tvmconv.cli", "tune", "8x8x8:16:3x3:padding=same",
                                "--trials", "64", "--log-dir", str(tmp_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (log.exists() and log.read_text().count("\n") >= 1):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "(interrupted)" in out
    trials = log.read_text().count("\n")
    assert 0 < trials < 64 and records.best(WL, HOST, [str(tmp_path)], keep_slower=True).trials == trials


def test_shipped_logs_are_readable_and_apply_where_they_match():
    folders = records.target_folders(records.shipped_root())
    for folder in folders:
        rows = records.summarize(folder)
        assert rows and all(row["records"] >= 1 and row["trials"] >= row["records"] for row in rows)
    host_folder = records.folder(records.shipped_root(), HOST)
    if host_folder in folders:  # on the CPU they were made for, records apply where they beat the defaults
        for row in records.summarize(host_folder)[:4]:
            assert (build.get_kernel(row["workload"], HOST).tuning is not None) == row["used"]
