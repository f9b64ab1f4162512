"""Other targets: NEON code for aarch64 (built here, run on the emulated board), CUDA for sm_80/sm_90.

Tests marked `arm` run kernels on the board that `scripts/arm_board.sh start` serves; without one
they skip, saying so. $TVMCONV_BOARD names another board (default 127.0.0.1:9095).
CUDA kernels are built wherever nvcc is; the tests that run them skip without a CUDA GPU (on a GPU
machine without apache-tvm, scripts/gpu_check.py checks them with the runtime alone).
"""
import re
import shutil

import numpy as np
import pytest
import tvm
from farm import board_address, free_port, tracker_with_server
from paths import PATHS

import tvmconv
from tvmconv import build, reference, targets
from tvmconv import rpc_devices
from tvmconv.compute import ConvWorkload
from tvmconv.schedules import arm, cuda, find_rule


def _compiled_source(wl, target, kind="asm"):
    rule = find_rule(target)
    func = build.scheduled(wl, target, rule, rule.default_knobs(wl, target))
    module = tvm.compile(func, target=target).mod
    if kind == "asm":
        return module.inspect_source("asm")
    return next(m for m in module.imports if m.kind == "cuda").inspect_source()


@pytest.mark.parametrize("preset", ["aarch64", "aarch64-neoverse"])
@pytest.mark.parametrize("name", PATHS)
def test_arm_builds_use_neon_fmas(preset, name):
    target = targets.resolve(preset)
    assert find_rule(target) is arm.RULE
    asm = _compiled_source(PATHS[name], target)
    assert len(re.findall(r"\bfmla\s+v\d+\.4s", asm)) >= 4


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="no aarch64 cross compiler: apt-get install g++-aarch64-linux-gnu")
def test_aarch64_library_is_an_arm_elf():
    compiled = build.get_kernel(PATHS["3x3"], targets.resolve("aarch64"))
    assert compiled.kernel is None  # not loadable here
    with open(compiled.library, "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64


def test_foreign_layer_without_remote_says_how_to_run_it():
    layer = tvmconv.Conv2D(4, 3, target="aarch64")
    with pytest.raises(ValueError, match="remote='HOST:PORT'.*arm_board.sh"):
        layer(np.ones((1, 5, 5, 2), np.float32))


def test_unreachable_remote_names_the_argument():
    layer = tvmconv.Conv2D(4, 3, remote=f"127.0.0.1:{free_port()}")
    with pytest.raises(ConnectionError, match="`remote`.*arm_board.sh"):
        layer(np.ones((1, 5, 5, 2), np.float32))


@pytest.mark.parametrize("remote", ["127.0.0.1", "host:port", {"tracker": "127.0.0.1:9190"}, 9095])
def test_bad_remote_is_refused(remote):
    with pytest.raises(ValueError, match="remote"):
        tvmconv.Conv2D(4, 3, target="aarch64", remote=remote)


@pytest.fixture(scope="module")
def board() -> str:
    """The board's address, checked once per module."""
    return board_address()


@pytest.mark.arm
@pytest.mark.parametrize("name", PATHS)
def test_paths_run_on_the_board(name, board):
    wl = PATHS[name]
    rng = np.random.default_rng(0)
    layer = tvmconv.Conv2D(wl.filters, wl.kernel_size, strides=wl.strides, padding=wl.padding, groups=wl.groups,
                           activation="relu", target="aarch64", remote=board)
    x = rng.standard_normal(wl.input_shape).astype(np.float32)
    layer.build(x.shape)
    layer.set_weights([rng.standard_normal(w.shape).astype(np.float32) for w in layer.get_weights()])
    kernel, bias = layer.get_weights()
    for inputs in (x, 2 * x):  # the second call reuses the uploaded kernel and weights
        expected = np.maximum(reference.conv2d(inputs, kernel, bias, wl.strides, wl.padding, groups=wl.groups), 0)
        np.testing.assert_allclose(layer(inputs), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("preset", ["cuda-sm_80", "cuda-sm_90"])
@pytest.mark.parametrize("wl", [PATHS["3x3"], PATHS["grouped"], PATHS["stride 2"],
                                ConvWorkload(1, 6, 6, 4, 8, (3, 3), data_format="channels_first", activation="relu"),
                                ConvWorkload(1, 6, 6, 4, 8, (1, 1), activation="softmax")], ids=repr)
def test_cuda_sources_build(preset, wl):
    target = targets.resolve(preset)
    assert find_rule(target) is cuda.RULE
    source = _compiled_source(wl, target, kind="cuda")
    for construct in ("__global__", "__shared__", "__syncthreads()", "threadIdx.x", "blockIdx.x"):
        assert construct in source
    # nvcc built the device code: a fatbin (magic 0xBA55ED50) holding a CUDA ELF (EM_CUDA = 190) for
    # that SM version (e_flags bits 8-15).
    with open(build.get_kernel(wl, target).device_code, "rb") as f:
        fatbin = f.read()
    assert int.from_bytes(fatbin[:4], "little") == 0xBA55ED50
    header = fatbin[fatbin.index(b"\x7fELF"):][:52]
    assert int.from_bytes(header[18:20], "little") == 190
    assert f"sm_{(int.from_bytes(header[48:52], 'little') >> 8) & 0xFF}" == preset.split("-")[1]


def test_remote_through_a_tracker_on_localhost(tmp_path):
    """A device farm in miniature: a tracker, a (host CPU) server registered under a key, and a layer
    that asks the tracker for a device by that key."""
    with tracker_with_server(tmp_path, "tvmconv-test-cpu") as remote:
        layer = tvmconv.Conv2D(8, 3, padding="same", activation="relu", remote=remote)
        x = np.random.default_rng(0).standard_normal((1, 6, 6, 4)).astype(np.float32)
        layer.build(x.shape)
        kernel, bias = layer.get_weights()
        expected = np.maximum(reference.conv2d(x, kernel, bias, padding="same"), 0)
        np.testing.assert_allclose(layer(x), expected, rtol=1e-4, atol=1e-5)
        assert layer.get_config()["remote"] == remote
        rpc_devices.disconnect(remote)


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
needs_gpu = pytest.mark.skipif(not tvmconv.runtime.cuda_available(), reason="no CUDA GPU on this machine")


@needs_nvcc
@pytest.mark.skipif(tvmconv.runtime.cuda_available(), reason="this machine has a CUDA GPU")
def test_cuda_layer_without_a_gpu_says_so():
    layer = tvmconv.Conv2D(8, 3, target="cuda")
    x = np.ones((1, 6, 6, 4), np.float32)
    layer.build(x.shape)
    assert layer.compiled_kernel(x.shape).device_code.endswith(".fatbin")
    with pytest.raises(ValueError, match="need a CUDA GPU"):
        layer(x)


@needs_nvcc
@needs_gpu
@pytest.mark.parametrize("wl", [PATHS["3x3"], PATHS["grouped"], PATHS["stride 2"]], ids=repr)
def test_cuda_layer_on_the_gpu(wl):
    # The "cuda" preset (sm_80) runs on any newer GPU: its fatbin carries PTX.
    layer = tvmconv.Conv2D(wl.filters, wl.kernel_size, wl.strides, wl.padding, groups=wl.groups, activation="relu",
                           target="cuda")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(wl.input_shape).astype(np.float32)
    layer.build(x.shape)
    kernel, bias = layer.get_weights()
    expected = np.maximum(reference.conv2d(x, kernel, bias, wl.strides, wl.padding, groups=wl.groups), 0)
    np.testing.assert_allclose(layer(x), expected, rtol=1e-4, atol=1e-5)


@needs_nvcc
def test_cuda_bundle_carries_its_device_code(tmp_path):
    model = tvmconv.Sequential([tvmconv.Conv2D(8, 3, padding="same", activation="relu"), tvmconv.Conv2D(4, 1)])
    manifest = tvmconv.export(model, (1, 8, 8, 4), str(tmp_path), target="cuda-sm_90")
    assert manifest["device"] == "cuda" and manifest["architecture"] == "x86_64"
    assert set(manifest["files"]) == {"library", "device_code", "weights"}
    with open(tmp_path / "kernels.fatbin", "rb") as f:
        assert int.from_bytes(f.read(4), "little") == 0xBA55ED50
    if not tvmconv.runtime.cuda_available():
        with pytest.raises(RuntimeError, match="runs on a CUDA GPU"):
            tvmconv.runtime.load(str(tmp_path))
        return
    x = np.random.default_rng(0).standard_normal((3, 8, 8, 4)).astype(np.float32)
    # The model's own layers run on this host's CPU: an independent build of the same convolutions.
    np.testing.assert_allclose(tvmconv.runtime.load(str(tmp_path))(x), model(x), rtol=1e-4, atol=1e-5)
