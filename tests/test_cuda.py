"""CUDA without a GPU, and with one: the templates' design spaces, the tensor cores, TF32, gradients, DLPack.

Without a GPU, a CUDA schedule is checked two ways: it compiles for sm_80 and sm_90 (nvcc builds its
fatbin; the CUDA source holds the instructions it should), and it is *emulated* on this CPU: the same
scheduled program, its thread and block loops run one after the other, compiled for LLVM. That checks
every index the schedule computes (tiles, shared-memory stages, im2col, padding, the tensor cores'
fragment layouts: their copies stay, only the tensorized instructions are left out), not races or the
instructions themselves. The tests marked `needs_gpu` run the kernels on a GPU, against float64.
"""
import dataclasses
import re
import shutil

import numpy as np
import pytest
import tvm
import tvm.script
from tvm import s_tir

import tvmconv
from tvmconv import build, reference, runtime, targets, tuning
from tvmconv.compute import ConvWorkload, pack_weights
from tvmconv.schedules import cuda, find_rule, tensor_cores

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
needs_gpu = pytest.mark.skipif(not runtime.cuda_available(), reason="no CUDA GPU on this machine")
SM80, SM90 = targets.resolve("cuda-sm_80"), targets.resolve("cuda-sm_90")
HOST = targets.resolve(None)
# Tolerances against float64, relative to the largest magnitude of the reference: float32 accumulates in
# float32; float16 multiplies exactly and accumulates in float32, then rounds the output to float16
# (2^-11); TF32 rounds each input to a 10-bit mantissa (2^-11) and accumulates in float32.
TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "tf32": 2e-3}


def emulated(workload, target, knobs=None) -> runtime.Kernel:
    """The program of `workload`'s CUDA schedule (`knobs`, else the rule's defaults), compiled for this CPU:
    the schedule replayed without its tensorized instructions, thread and block loops made serial, shared,
    warp and local memory ordinary buffers."""
    rule = find_rule(target)
    knobs = rule.default_knobs(workload, target) if knobs is None else knobs
    func = workload.prim_func(*build.layout(knobs))
    sch = s_tir.Schedule(func)
    rule.schedule(workload, sch, target, knobs)
    plain = s_tir.Schedule(func)
    s_tir.Trace([i for i in sch.trace.insts if i.kind.name != "Tensorize"], {}).apply_to_schedule(
        plain, remove_postproc=False)
    text = re.sub(r'T\.thread_binding\(([^,]+), thread="[^"]+"\)', r"T.serial(\1)", plain.mod["main"].script())
    text = re.sub(r', scope="(shared\.dyn|shared|warp)"', "", text)
    return runtime.Kernel(tvm.compile(tvm.script.from_source(text), target=HOST).mod)


def _check_forward(wl: ConvWorkload, kernel: runtime.Kernel, weight_block: int = 0, seed: int = 0) -> float:
    """The kernel's output against float64 (inputs rounded to the workload's dtype); returns the error."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(wl.input_shape).astype(wl.dtype)
    w = (rng.standard_normal(wl.weights_shape) / np.sqrt(np.prod(wl.weights_shape[:3]))).astype(wl.dtype)
    b = rng.standard_normal(wl.filters).astype(wl.dtype) if wl.use_bias else None
    y = runtime.aligned_empty(wl.output_shape, wl.dtype)
    kernel(x, kernel.weights([pack_weights(w, weight_block)] + ([b] if b is not None else [])), y)
    expected = reference.ACTIVATIONS[wl.activation](reference.conv2d(
        x, w, b, wl.strides, wl.padding, wl.dilation, wl.groups, wl.channels_last))
    error = float(np.abs(y - expected).max() / np.abs(expected).max())
    assert error < TOLERANCE["tf32" if wl.tf32 else wl.dtype], (wl.label, error)
    return error


def _cuda_source(workload, target, knobs=None) -> str:
    rule = find_rule(target)
    knobs = rule.default_knobs(workload, target) if knobs is None else knobs
    module = tvm.compile(build.scheduled(workload, target, rule, knobs), target=target).mod
    return next(m for m in module.imports if m.kind == "cuda").inspect_source()


SIMT = {
    "3x3 same, relu": ConvWorkload(1, 9, 10, 8, 16, (3, 3), padding="same", activation="relu"),
    "stride 2": ConvWorkload(2, 10, 10, 8, 12, (3, 3), (2, 2), padding="same"),
    "depthwise": ConvWorkload(1, 8, 8, 16, 16, (3, 3), padding="same", groups=16),
    "channels_first, dilated": ConvWorkload(1, 11, 9, 4, 8, (3, 3), dilation=(2, 2), data_format="channels_first"),
    "softmax": ConvWorkload(1, 6, 6, 4, 8, (1, 1), activation="softmax"),
}
TENSOR_CORES = {
    "float16 3x3": ConvWorkload(1, 14, 14, 32, 48, (3, 3), padding="same", dtype="float16", activation="relu"),
    "float16 stem-like": ConvWorkload(2, 9, 7, 3, 24, (3, 3), (2, 2), padding="same", dtype="float16"),
    "float16 1x1 channels_first softmax": ConvWorkload(1, 6, 6, 20, 8, (1, 1), data_format="channels_first",
                                                      dtype="float16", activation="softmax"),
    "tf32 3x3": ConvWorkload(1, 9, 7, 5, 24, (3, 3), padding="same", tf32=True, activation="gelu"),
    "tf32 1x1 stride 2": ConvWorkload(2, 8, 8, 40, 64, (1, 1), (2, 2), tf32=True),
    # M and K whole tiles: no padding stage, A's stage is the reindex of x (element-aligned) itself
    "float16 1x1 whole tiles": ConvWorkload(1, 8, 8, 32, 32, (1, 1), dtype="float16"),
    "tf32 1x1 whole tiles": ConvWorkload(2, 8, 4, 16, 16, (1, 1), tf32=True),
}


# ---------------------------------------------------------------- the templates, emulated


@pytest.mark.parametrize("name", SIMT)
def test_simt_template_defaults_and_both_stagings(name):
    wl = SIMT[name]
    default = cuda.RULE.default_knobs(wl, SM90)
    for knobs in (default, dataclasses.replace(default, window_stage=not default.window_stage),
                  cuda.Knobs(3, 5, 2, 3, 3, True)):  # tiles that divide nothing
        _check_forward(wl, emulated(wl, SM90, knobs))


@pytest.mark.parametrize("name", TENSOR_CORES)
def test_tensor_core_template(name):
    wl = TENSOR_CORES[name]
    knobs = cuda.RULE.default_knobs(wl, SM80)
    assert isinstance(knobs, tensor_cores.Knobs)
    _check_forward(wl, emulated(wl, SM80, knobs))
    _check_forward(wl, emulated(wl, SM80, tensor_cores.Knobs(1, 1, 1, 1, 1)))


@pytest.mark.parametrize("name", TENSOR_CORES)
def test_tensor_core_schedule_is_tensorized(name):
    """Every fragment's fill, load and product becomes its instruction (the emulation above leaves them out),
    also where the GEMM needs no padding: batch-8 1x1 layers such as ResNet-50's 56x56x64 failed there."""
    wl = TENSOR_CORES[name]
    text = build.scheduled(wl, SM80, cuda.RULE, cuda.RULE.default_knobs(wl, SM80)).script()
    assert "T.ptx_legacy.mma(" in text and "T.cuda.mma_fill_legacy(" in text
    assert ("T.ptx_legacy.ldmatrix(" in text) == (wl.dtype == "float16")


@needs_nvcc
@pytest.mark.parametrize("target", [SM80, SM90], ids=["sm_80", "sm_90"])
def test_tensor_cores_compile_to_mma(target):
    """float16 loads fragments with ldmatrix and multiplies with mma m16n8k16; TF32 with mma m16n8k8 after
    rounding each input; both accumulate in float32. nvcc builds their fatbins for the target."""
    float16, tf32 = TENSOR_CORES["float16 3x3"], TENSOR_CORES["tf32 3x3"]
    source = _cuda_source(float16, target)
    assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in source and "ldmatrix.sync.aligned.m8n8.x4.trans" in source
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in source
    source = _cuda_source(tf32, target)
    assert "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32" in source
    assert "(uint)4096) & (uint)4294959104" in source  # + 0x1000, & 0xFFFFE000: rounded to TF32
    for wl in (float16, tf32):
        with open(build.get_kernel(wl, target).device_code, "rb") as f:
            assert int.from_bytes(f.read(4), "little") == 0xBA55ED50  # a fatbin


def _shared_memory_bytes(workload, target) -> int:
    """The shared memory a block of the defaults' kernel allocates, as TVM's pipeline sizes it (after compacting
    each stage to what a block reads)."""
    func = build.scheduled(workload, target, cuda.RULE, cuda.RULE.default_knobs(workload, target))
    default, _, _ = tvm.tirx.get_tir_pipeline("default")
    lowered = default(tvm.IRModule({"main": func.with_attr("target", target)}))
    text = "\n".join(f.script() for f in lowered.functions.values())
    # T.alloc_shared((2560,), "float16", align=2); float32, the default, goes unnamed
    return sum(int(np.prod([int(d) for d in shape.split(",") if d.strip()])) * np.dtype(dtype or "float32").itemsize
               for shape, dtype in re.findall(r'T\.alloc_shared\(\(([^)]*)\)(?:, "(\w+)")?', text))


@pytest.mark.parametrize("batch", [1, 8])
def test_the_float32_defaults_fit_a_block_for_every_network_layer(batch):
    """The SIMT template's defaults for every layer of ResNet-50 and MobileNetV2 stage at most a block's 48 KB.
    MobileNetV2's 7x7x576 -> 160 and 7x7x960 -> 160 layers, with blocks overhanging both the 7-wide rows and
    the 160 filters, once staged 18 and 52 MB (ptxas refused them)."""
    from tvmconv.networks import conv_workload, network_workloads
    for network in ("resnet50", "mobilenet_v2"):
        for layer in network_workloads(network):
            wl = conv_workload(layer, batch)
            used = _shared_memory_bytes(wl, SM90)
            assert 0 < used <= cuda.shared_bytes(SM90), (layer.name, used)


def test_tensor_cores_only_where_they_apply():
    fp32 = ConvWorkload(1, 8, 8, 8, 16, (3, 3))
    assert isinstance(cuda.RULE.default_knobs(dataclasses.replace(fp32, dtype="float16"), SM80), tensor_cores.Knobs)
    assert isinstance(cuda.RULE.default_knobs(dataclasses.replace(fp32, tf32=True), SM90), tensor_cores.Knobs)
    sm75 = targets.resolve({**targets.PRESETS["cuda-sm_80"](), "arch": "sm_75"})
    for wl, target in ((fp32, SM90), (dataclasses.replace(fp32, dtype="float16"), sm75),
                       (dataclasses.replace(fp32, dtype="float16", groups=2), SM90)):
        assert isinstance(cuda.RULE.default_knobs(wl, target), cuda.Knobs), (wl.label, target)


# ---------------------------------------------------------------- the design space


@pytest.mark.parametrize("wl", [SIMT["stride 2"], TENSOR_CORES["float16 3x3"]], ids=["float32", "float16"])
def test_the_space_samples_replay_and_compute_the_convolution(wl):
    """Each structural variant, its tile sizes sampled (seeded): the sampled program replays from its trace
    (as tuning records are applied) and, emulated, computes the convolution."""
    variants = cuda.RULE.tunable_knobs(wl, SM90)
    assert [type(k) for k in variants] == ([tensor_cores.Knobs] if wl.dtype == "float16" else []) + [cuda.Knobs] * 2
    assert {k.window_stage for k in variants if isinstance(k, cuda.Knobs)} == {True, False}
    checked = 0
    for seed in range(1, 13):
        for knobs in variants:
            sch = s_tir.Schedule(wl.prim_func(0), seed=seed)
            sampled = cuda.RULE.sample_tiles(sch, wl, SM90, knobs)
            assert any(isinstance(v, tvm.tirx.Var) for v in dataclasses.astuple(sampled))
            try:
                cuda.RULE.schedule(wl, sch, SM90, sampled)
            except s_tir.ScheduleError:  # tensor-core tiles that together do not divide the GEMM: rejected
                assert isinstance(knobs, tensor_cores.Knobs)
                continue
            replayed = s_tir.Schedule(wl.prim_func(0))
            sch.trace.apply_to_schedule(replayed, remove_postproc=False)
            tvm.ir.assert_structural_equal(replayed.mod, sch.mod)
            if checked < 4:  # the sampled values, in the order sample_tiles sampled the knobs' fields
                decided = iter(int(inst.attrs[0][int(sch.trace.decisions[inst])]) for inst in sch.trace.insts
                               if inst.kind.name == "SampleCategorical")
                values = type(knobs)(*(next(decided) if isinstance(v, tvm.tirx.Var) else v
                                       for v in dataclasses.astuple(sampled)))
                _check_forward(wl, emulated(wl, SM90, values), seed=seed)
            checked += 1
    assert checked >= 12


@pytest.mark.parametrize("wl", [ConvWorkload(1, 14, 14, 64, 96, (1, 1)), SIMT["softmax"]], ids=["1x1", "softmax"])
def test_a_sampled_trace_replays_with_every_other_decision(wl):
    """Tuning's first round and the search's mutations replay a trace with decisions changed one at a time:
    each must replay, whatever loops the new tiles leave (a unit loop is dropped). The templates' last
    step once asked every block for its loops, an instruction whose outputs varied with the tiles."""
    for knobs in cuda.RULE.tunable_knobs(wl, SM90):
        sch = s_tir.Schedule(wl.prim_func(0), seed=3)
        cuda.RULE.schedule(wl, sch, SM90, cuda.RULE.sample_tiles(sch, wl, SM90, knobs))
        trace = sch.trace
        samples = [inst for inst in trace.insts if inst.kind.name == "SampleCategorical"]
        assert samples
        for inst in samples:
            for decision in range(len(inst.attrs[0])):
                trace.with_decision(inst, decision, remove_postproc=True).apply_to_schedule(
                    s_tir.Schedule(wl.prim_func(0)), remove_postproc=True)


@pytest.mark.slow
def test_tuning_tasks_propose_candidates_of_every_variant():
    """tuning.tasks for a CUDA target is the template's space; its search strategy proposes tensor-core and
    SIMT candidates, which MetaSchedule's GPU verification accepted."""
    from tvm.s_tir import meta_schedule as ms
    wl = TENSOR_CORES["float16 3x3"]
    (context,) = tuning.tasks(wl, SM90, "template")
    context.pre_tuning(max_trials=32, num_trials_per_iter=32, design_spaces=context.generate_design_space(),
                       database=ms.database.MemoryDatabase(), cost_model=ms.cost_model.RandomModel())
    candidates = context.generate_measure_candidates()
    tensorized = [any(i.kind.name == "Tensorize" for i in c.sch.trace.insts) for c in candidates]
    assert len(candidates) == 32 and any(tensorized) and not all(tensorized)


# ---------------------------------------------------------------- TF32 as a layer argument


def test_tf32_is_opt_in_named_in_the_config_and_refused_where_it_cannot_run():
    layer = tvmconv.Conv2D(8, 3, target="cuda-sm_80", tf32=True)
    assert layer.tf32 and layer.get_config()["tf32"] is True
    assert tvmconv.Conv2D.from_config(layer.get_config()).workload((1, 6, 6, 4)).tf32
    assert "tf32" not in tvmconv.Conv2D(8, 3, target="cuda-sm_80").get_config()
    assert layer.workload((1, 6, 6, 4)).key != tvmconv.Conv2D(8, 3, target="cuda-sm_80").workload((1, 6, 6, 4)).key
    with pytest.raises(ValueError, match=r"`tf32=True`.*sm_80.*Received: target=llvm"):
        tvmconv.Conv2D(8, 3, tf32=True)
    with pytest.raises(ValueError, match=r"`tf32=True`.*sm_80"):
        tvmconv.Conv2D(8, 3, target={**targets.PRESETS["cuda-sm_80"](), "arch": "sm_75"}, tf32=True)
    with pytest.raises(ValueError, match="`tf32=True` is for float32 layers; this layer computes in float16"):
        tvmconv.Conv2D(8, 3, target="cuda-sm_90", tf32=True, dtype="mixed_float16")
    with pytest.raises(TypeError, match="tf32"):
        tvmconv.Conv2D(8, 3, target="cuda-sm_90", tf32="yes")


# ---------------------------------------------------------------- a layer and its gradients on CUDA, emulated


@pytest.fixture
def cuda_emulated_here(monkeypatch):
    """Layers with a CUDA target run their CUDA schedules, emulated on this CPU (`emulated`); returns the list
    of (workload, knobs) they built."""
    real, built = build.get_kernel, []

    def get_kernel(workload, target, knobs=None, log_roots=None, record=None):
        if target.kind.name != "cuda":
            return real(workload, target, knobs, log_roots, record)
        knobs = find_rule(target).default_knobs(workload, target)
        built.append((workload, knobs))
        return build.CompiledKernel(workload, targets.target_key(target), "cuda", knobs, build.layout(knobs),
                                    "compiled", "", emulated(workload, target, knobs))
    monkeypatch.setattr(build, "get_kernel", get_kernel)
    monkeypatch.setattr(targets, "check_runnable_here", lambda target: None)
    return built


# Each layer, and the gradient kernels besides convolutions it runs (dz, and dW's own kernel or regrouped input).
GRADIENT_CONFIGS = {
    "stride 2, same, groups, gelu": (dict(filters=4, kernel_size=3, strides=2, padding="same", groups=2,
                                          activation="gelu"), {"ActivationGradient", "WeightGradientImage"}),
    "depthwise, log_softmax": (dict(filters=4, kernel_size=3, padding="same", groups=4, activation="log_softmax"),
                               {"ActivationGradientFromOutput", "DepthwiseWeightGradient"}),
    "pointwise, own dW kernel, relu": (dict(filters=16, kernel_size=1, strides=2, activation="relu"),
                                       {"ActivationGradientFromOutput", "PointwiseWeightGradient"}),
    "channels_first, glu": (dict(filters=4, kernel_size=3, strides=2, data_format="channels_first", activation="glu"),
                            {"ActivationGradient", "WeightGradientImage"}),
    "float16 on the tensor cores": (dict(filters=16, kernel_size=3, padding="same", dtype="float16",
                                         activation="tanh"), {"ActivationGradientFromOutput", "WeightGradientImage"}),
}


def _check_layer_and_gradients(config: dict, target: str, rng) -> tvmconv.Conv2D:
    """`layer(x)` and `layer.gradients` of a layer for `target` against the same layer in float64 (the
    gradients to 4x the forward tolerance: they sum over more terms); returns the layer."""
    shape = (2, 4, 7, 9) if config.get("data_format") == "channels_first" else (2, 7, 8, 4)
    layer = tvmconv.Conv2D(target=target, **config)
    exact = tvmconv.Conv2D(**{**config, "dtype": "float64"})
    x = rng.standard_normal(shape).astype(layer.compute_dtype)
    y = layer(x)
    exact.build(x.shape)
    exact.set_weights([w.astype(np.float64) for w in layer.get_weights()])
    tolerance = TOLERANCE[layer.compute_dtype]
    expected = exact(x.astype(np.float64))
    np.testing.assert_allclose(y, expected, atol=tolerance * np.abs(expected).max(), rtol=0)
    dy = rng.standard_normal(y.shape).astype(layer.compute_dtype)
    got, want = layer.gradients(x, dy, output=y), exact.gradients(x.astype(np.float64), dy.astype(np.float64))
    for part in ("input", "kernel", "bias"):
        np.testing.assert_allclose(got[part], want[part], atol=4 * tolerance * np.abs(want[part]).max(), rtol=0,
                                   err_msg=part)
    return layer


@pytest.mark.parametrize("name", GRADIENT_CONFIGS)
def test_layer_and_gradients_run_the_cuda_schedules(name, cuda_emulated_here, rng):
    """`layer(x)` and `layer.gradients` of a CUDA layer: dx and dW on the CUDA templates (forward convolutions),
    the other gradient kernels on their CUDA schedules, all emulated, against the same layer in float64."""
    config, expected_kernels = GRADIENT_CONFIGS[name]
    layer = _check_layer_and_gradients(config, "cuda-sm_90", rng)
    # Every kernel the layer ran was a CUDA schedule: the templates' for the convolutions (the forward pass, dx's
    # phases, dW's convolution), the fixed ones for the others.
    kinds = {(type(wl).__name__, type(knobs).__module__.rsplit(".", 1)[-1]) for wl, knobs in cuda_emulated_here}
    convolution = "tensor_cores" if layer.compute_dtype == "float16" else "cuda"
    assert ("ConvWorkload", convolution) in kinds and {k for k in kinds if k[0] == "ConvWorkload"} <= {
        ("ConvWorkload", "cuda"), ("ConvWorkload", "tensor_cores")}
    assert {k for k in kinds if k[0] != "ConvWorkload"} == {(kind, "builtins") for kind in expected_kernels}


# ---------------------------------------------------------------- on a GPU


@needs_nvcc
@needs_gpu
@pytest.mark.parametrize("precision", ["float32", "float16", "tf32"])
def test_layer_on_the_gpu_against_float64(precision, rng):
    layer = tvmconv.Conv2D(64, 3, padding="same", activation="relu", target="cuda-sm_80",
                           dtype="float16" if precision == "float16" else None, tf32=precision == "tf32")
    x = rng.standard_normal((2, 14, 14, 32)).astype(layer.compute_dtype)
    y = layer(x)
    kernel, bias = layer.get_weights()
    expected = np.maximum(reference.conv2d(x, kernel, bias, padding="same"), 0)
    np.testing.assert_allclose(y, expected, atol=TOLERANCE[precision] * np.abs(expected).max(), rtol=0)


@needs_nvcc
@needs_gpu
@pytest.mark.parametrize("name", GRADIENT_CONFIGS)
def test_gradients_on_the_gpu_against_float64(name, rng):
    _check_layer_and_gradients(GRADIENT_CONFIGS[name][0], "cuda-sm_80", rng)


@needs_nvcc
@needs_gpu
def test_torch_tensors_stay_on_the_gpu(rng):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    layer = tvmconv.Conv2D(16, 3, padding="same", target="cuda-sm_80")
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    y = layer(torch.from_numpy(x).cuda())
    assert isinstance(y, torch.Tensor) and y.is_cuda
    np.testing.assert_allclose(y.cpu().numpy(), layer(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="compute dtype float32"):
        layer(torch.from_numpy(x).cuda().double())
