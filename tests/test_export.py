"""Export bundles and the runtime-only predictor: round trips, isolation from the compiler, tampering,
aarch64 bundles (and on the board). The HTTP service is in test_serving.py."""
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import tvmconv
from tvmconv import runtime

REPO = pathlib.Path(__file__).resolve().parent.parent


def small_model():
    model = tvmconv.Sequential()
    init = tvmconv.initializers.GlorotUniform(seed=3)
    tvmconv.layer_conv_2d(model, 16, 3, padding="same", activation="relu", input_shape=(10, 10, 3),
                          kernel_initializer=init, bias_initializer="ones")
    tvmconv.layer_conv_2d(model, 16, 3, strides=2, padding="same", groups=4, activation="tanh", kernel_initializer=init)
    tvmconv.layer_conv_2d(model, 6, 1, activation="softmax", kernel_initializer=init)
    return model


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    model = small_model()
    path = tmp_path_factory.mktemp("bundle") / "model"
    manifest = tvmconv.export(model, (2, 10, 10, 3), str(path))
    return model, str(path), manifest


def test_round_trip_matches_the_layers(bundle, rng):
    model, path, manifest = bundle
    predict = runtime.load(path)
    for batch in (2, 1, 5):  # the compiled batch, then a smaller and a larger one (run in chunks)
        x = rng.standard_normal((batch, 10, 10, 3)).astype(np.float32)
        np.testing.assert_allclose(predict(x), model(x), rtol=1e-6, atol=1e-7)
    assert manifest["input_shape"] == [2, 10, 10, 3] and predict.output_shapes == [(2, 5, 5, 6)]
    assert manifest["target_key"] == tvmconv.targets.target_key(tvmconv.targets.resolve(None))
    assert [layer["name"] for layer in manifest["layers"]] == [layer.name for layer in model.layers]
    assert set(os.listdir(path)) == {runtime.BUNDLE_FILES[role] for role in ("library", "weights", "manifest")}


def test_predictor_is_safe_from_many_threads(bundle):
    model, path, _ = bundle
    predict = runtime.load(path)
    inputs = [np.random.default_rng(i).standard_normal((1 + i % 4, 10, 10, 3)).astype(np.float32) for i in range(24)]
    outputs = [None] * len(inputs)

    def work(i):
        for _ in range(5):
            outputs[i] = predict(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for x, y in zip(inputs, outputs, strict=True):
        np.testing.assert_allclose(y, model(x), rtol=1e-6, atol=1e-7)


def test_functional_model_with_two_outputs(tmp_path, rng):
    inputs = tvmconv.layer_input((9, 9, 4))
    a = tvmconv.layer_conv_2d(inputs, 8, 3, activation="relu")
    b = tvmconv.layer_conv_2d(a, 5, 1, dilation_rate=1)
    c = tvmconv.layer_conv_2d(inputs, 3, 5, padding="same", data_format="channels_last")
    model = tvmconv.Model(inputs, [b, c])
    tvmconv.export(model, None, str(tmp_path / "m"))
    x = rng.standard_normal((1, 9, 9, 4)).astype(np.float32)
    for got, want in zip(runtime.load(str(tmp_path / "m"))(x), model(x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_layers_of_different_dtypes(tmp_path, rng):
    model = tvmconv.Sequential()
    tvmconv.layer_conv_2d(model, 4, 3, input_shape=(7, 7, 2), dtype="float64", activation="tanh")
    tvmconv.layer_conv_2d(model, 3, 1, dtype="float32")
    tvmconv.export(model, (1, 7, 7, 2), str(tmp_path / "b"))
    x = rng.standard_normal((2, 7, 7, 2))
    y = runtime.load(str(tmp_path / "b"))(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, model(x), rtol=1e-6, atol=1e-7)


def test_inputs_are_checked(bundle):
    predict = runtime.load(bundle[1])
    with pytest.raises(ValueError, match=r"dtype float32, got float64"):
        predict(np.zeros((1, 10, 10, 3)))
    with pytest.raises(ValueError, match=r"shape \(N, 10, 10, 3\).*got \(1, 10, 10, 4\)"):
        predict(np.zeros((1, 10, 10, 4), np.float32))
    with pytest.raises(ValueError, match="got \\(0, 10, 10, 3\\)"):
        predict(np.zeros((0, 10, 10, 3), np.float32))
    with pytest.raises(TypeError, match="numpy array"):
        predict([[1.0]])


@pytest.mark.parametrize("role", ["library", "weights"])
def test_tampered_bundle_is_refused(bundle, tmp_path, role):
    copy = tmp_path / "copy"
    shutil.copytree(bundle[1], copy)
    damaged = copy / runtime.BUNDLE_FILES[role]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{damaged} does not match its checksum"):
        runtime.load(str(copy))
    (copy / runtime.BUNDLE_FILES["manifest"]).unlink()
    with pytest.raises(FileNotFoundError, match="not a tvmconv bundle"):
        runtime.load(str(copy))


def test_callable_activation_cannot_be_exported(tmp_path):
    layer = tvmconv.Conv2D(4, 3, activation=lambda x: x * 2)
    with pytest.raises(ValueError, match="callable as its activation"):
        tvmconv.export(layer, (1, 6, 6, 2), str(tmp_path / "b"))


def test_runtime_alone_loads_and_runs(bundle, tmp_path, rng):
    """In a fresh process where neither tvmconv's compile modules nor TVM's Python package (its
    compiler) can be imported, the bundle loads through tvm_ffi and TVM's runtime library and gives
    the layers' outputs."""
    model, path, _ = bundle
    x = rng.standard_normal((2, 10, 10, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        # tvmconv's compiler side, and all of TVM's Python package: the runtime needs tvm_ffi only.
        BLOCKED = ("tvm.", "tvmconv.compute", "tvmconv.schedules", "tvmconv.build", "tvmconv.tuning",
                   "tvmconv.records", "tvmconv.layer", "tvmconv.model", "tvmconv.bundle", "tvmconv.rpc_devices",
                   "tvmconv.engine", "tvmconv.graph", "tvmconv.keras", "tvmconv.backward")
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "tvm" or name.startswith(BLOCKED):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import numpy as np
        from tvmconv import runtime
        y = runtime.load({path!r})(np.load({str(tmp_path / "x.npy")!r}))
        np.save({str(tmp_path / "y.npy")!r}, y)
        print(sorted(m for m in sys.modules if m.startswith(("tvmconv", "tvm."))) + ["tvm" in sys.modules])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['tvmconv', 'tvmconv.runtime', False]"
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), model(x), rtol=1e-6, atol=1e-7)


def test_aarch64_bundle_is_an_arm_elf_and_refused_here(tmp_path):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("no aarch64 cross compiler: apt-get install g++-aarch64-linux-gnu")
    manifest = tvmconv.export(small_model(), (1, 10, 10, 3), str(tmp_path / "arm"), target="aarch64")
    assert manifest["architecture"] == "aarch64" and manifest["target"]["mcpu"] == "cortex-a72"
    elf = (tmp_path / "arm" / runtime.BUNDLE_FILES["library"]).read_bytes()
    assert elf[:4] == b"\x7fELF" and int.from_bytes(elf[18:20], "little") == 183  # EM_AARCH64
    with pytest.raises(ValueError, match="compiled for aarch64, this machine is x86_64"):
        runtime.load(str(tmp_path / "arm"))


@pytest.mark.arm
def test_aarch64_bundle_runs_on_the_board_with_the_runtime_alone(tmp_path):
    if not (pathlib.Path(os.environ.get("TVMCONV_BOARD_DIR", pathlib.Path.home() / ".cache/tvmconv/arm_board"))
            / "rootfs/opt/tvm/bin/python").exists():
        pytest.skip("the emulated board is not set up: scripts/arm_board.sh setup")
    missing = [tool for tool in ("aarch64-linux-gnu-g++", "qemu-aarch64-static", "proot") if shutil.which(tool) is None]
    if missing:  # the board's folder outlives the tools that run it and build for it
        pytest.skip(f"{', '.join(missing)} not installed: apt-get install g++-aarch64-linux-gnu qemu-user-static proot")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "board_bundle_check.py"), "--workdir",
                             str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "board modules: ['tvmconv', 'tvmconv.runtime'] tvm imported: False" in result.stdout
    assert "-> OK" in result.stdout


def test_cli_exports_a_keras_model_and_keras_agrees(keras, tmp_path, rng):
    source = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(6, 3, padding="same", activation="relu"),
                               keras.layers.Conv2D(4, 3, strides=2, use_bias=False, activation="sigmoid")])
    source.save(tmp_path / "m.keras")
    from tvmconv import cli
    assert cli.main(["export", str(tmp_path / "m.keras"), "-o", str(tmp_path / "bundle"), "--batch", "2"]) == 0
    x = rng.standard_normal((3, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(runtime.load(str(tmp_path / "bundle"))(x), source.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
