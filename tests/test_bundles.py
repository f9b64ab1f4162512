"""Bundles as code: ed25519 signatures, a loader that trusts nothing in the folder (fixed file names, regular
files only, every manifest field checked, the bytes it hashed are the bytes it loads), and the instruction sets
a bundle's code needs."""
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import tvmconv
from tvmconv import bundle, cli, reference, runtime, targets


def small_model():
    model = tvmconv.Sequential()
    init = tvmconv.initializers.GlorotUniform(seed=5)
    tvmconv.layer_conv_2d(model, 8, 3, padding="same", activation="relu", input_shape=(6, 6, 3),
                          kernel_initializer=init, bias_initializer="ones")
    tvmconv.layer_conv_2d(model, 4, 1, activation="tanh", kernel_initializer=init)
    return model


def expected(model, x):
    """The model's output in float64 numpy."""
    y = x.astype(np.float64)
    for layer in model.layers:
        z = reference.conv2d(y, layer.kernel, layer.bias, layer.strides, layer.padding, layer.dilation_rate,
                             layer.groups)
        y = reference.ACTIVATIONS[layer.activation](z)
    return y


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return {name: (str(folder / name), bundle.generate_key(folder / name)) for name in ("ours", "theirs")}


@pytest.fixture(scope="module")
def signed(tmp_path_factory, keys):
    """(model, a bundle signed with the "ours" key)."""
    model = small_model()
    path = tmp_path_factory.mktemp("signed") / "bundle"
    tvmconv.export(model, (2, 6, 6, 3), str(path), sign=keys["ours"][0])
    return model, path


@pytest.fixture
def copy(signed, tmp_path):
    """A copy of the signed bundle to damage."""
    shutil.copytree(signed[1], tmp_path / "bundle")
    return tmp_path / "bundle"


def edit_manifest(path, edit) -> None:
    manifest_file = path / runtime.BUNDLE_FILES["manifest"]
    manifest = json.loads(manifest_file.read_text())
    manifest = edit(manifest) or manifest
    manifest_file.write_text(json.dumps(manifest))


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_in_a_process(path) -> subprocess.CompletedProcess:
    """runtime.load(path) in a child process, which prints the error it raised: a crash or a hang there
    cannot take the test run with it."""
    script = textwrap.dedent(f"""
        from tvmconv import runtime
        try:
            runtime.load({str(path)!r})
            print("loaded")
        except Exception as err:
            print(type(err).__name__, err)
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- signatures


def test_keygen_and_a_signed_bundle_that_loads(signed, keys, rng):
    model, path = signed
    private, fingerprint = keys["ours"]
    assert os.stat(private).st_mode & 0o777 == 0o600
    assert pathlib.Path(private).read_bytes().startswith(b"-----BEGIN PRIVATE KEY")
    public = pathlib.Path(private + ".pub").read_bytes()
    assert public.startswith(b"-----BEGIN PUBLIC KEY")
    raw = serialization.load_pem_public_key(public).public_bytes(serialization.Encoding.Raw,
                                                                  serialization.PublicFormat.Raw)
    assert fingerprint == hashlib.sha256(raw).hexdigest()
    x = rng.standard_normal((3, 6, 6, 3)).astype(np.float32)
    for trusted in ([private + ".pub"], [public], [keys["theirs"][0] + ".pub", public]):
        predict = runtime.load(str(path), trusted_keys=trusted)
        assert predict.signature == fingerprint
        np.testing.assert_allclose(predict(x), expected(model, x), rtol=1e-5, atol=1e-5)
    assert runtime.load(str(path)).signature is None  # no key asked for: nothing checked


def test_unsigned_and_wrongly_signed_bundles_are_refused(signed, keys, copy):
    theirs = [keys["theirs"][0] + ".pub"]
    with pytest.raises(ValueError, match="not signed by any of the trusted keys"):
        runtime.load(str(signed[1]), trusted_keys=theirs)
    (copy / runtime.BUNDLE_FILES["signature"]).write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="not signed by any of the trusted keys"):
        runtime.load(str(copy), trusted_keys=[keys["ours"][0] + ".pub"])
    (copy / runtime.BUNDLE_FILES["signature"]).unlink()
    with pytest.raises(ValueError, match="is not signed .*manifest.sig"):
        runtime.load(str(copy), trusted_keys=[keys["ours"][0] + ".pub"])


def test_a_replaced_library_with_its_checksum_updated_passes_checksums_but_not_the_signature(signed, keys, copy,
                                                                                               tmp_path, rng):
    other = small_model()
    other.layers[0].activation = "sigmoid"
    tvmconv.export(other, (2, 6, 6, 3), str(tmp_path / "other"))
    shutil.copy(tmp_path / "other" / "kernels.so", copy / "kernels.so")

    def new_checksum(manifest):
        manifest["files"]["library"]["sha256"] = sha256(copy / "kernels.so")
    edit_manifest(copy, new_checksum)
    # Checksums catch damage, not tampering: the other code loads, and computes something else.
    x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
    assert np.abs(runtime.load(str(copy))(x) - expected(signed[0], x)).max() > 1e-2
    with pytest.raises(ValueError, match="not signed by any of the trusted keys"):
        runtime.load(str(copy), trusted_keys=[keys["ours"][0] + ".pub"])


def test_trusted_keys_are_checked(signed, keys, tmp_path):
    path = str(signed[1])
    with pytest.raises(TypeError, match="`trusted_keys` must be a list"):
        runtime.load(path, trusted_keys=keys["ours"][0] + ".pub")
    with pytest.raises(ValueError, match="`trusted_keys` is empty"):
        runtime.load(path, trusted_keys=[])
    with pytest.raises(TypeError, match=r"`trusted_keys\[0\]` must be a path"):
        runtime.load(path, trusted_keys=[42])
    with pytest.raises(ValueError, match=r"trusted_keys\[0\] .*is not a PEM public key"):
        runtime.load(path, trusted_keys=[keys["ours"][0]])  # the private key
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ValueError, match="RSAPublicKey.*ed25519"):
        runtime.load(path, trusted_keys=[pem])
    with pytest.raises(FileNotFoundError):
        runtime.load(path, trusted_keys=[str(tmp_path / "absent.pub")])
    with pytest.raises(ValueError, match="`threads`"):
        runtime.load(path, threads=0)


def test_cli_keygen_and_export_sign(keras, tmp_path, capsys, rng):
    source = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, activation="relu")])
    source.save(tmp_path / "m.keras")
    key = str(tmp_path / "signing")
    assert cli.main(["keygen", key]) == 0
    fingerprint = capsys.readouterr().out.split("fingerprint: ")[1].strip()
    assert cli.main(["keygen", key]) == 2  # never overwrites a key
    assert "exists; tvmconv keygen never overwrites a key" in capsys.readouterr().err
    (tmp_path / "other.pub").write_text("")
    assert cli.main(["keygen", str(tmp_path / "other")]) == 2 and not (tmp_path / "other").exists()
    assert cli.main(["export", str(tmp_path / "m.keras"), "-o", str(tmp_path / "b"), "--sign", key]) == 0
    predict = runtime.load(str(tmp_path / "b"), trusted_keys=[key + ".pub"])
    assert predict.signature == fingerprint
    x = rng.standard_normal((2, 6, 6, 2)).astype(np.float32)
    np.testing.assert_allclose(predict(x), source.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    assert cli.main(["export", str(tmp_path / "m.keras"), "-o", str(tmp_path / "c"), "--sign", key + ".pub"]) == 2
    assert "not an unencrypted PEM private key" in capsys.readouterr().err
    # An unsigned export over a signed bundle drops its signature, which would no longer match.
    assert cli.main(["export", str(tmp_path / "m.keras"), "-o", str(tmp_path / "b")]) == 0
    assert not (tmp_path / "b" / runtime.BUNDLE_FILES["signature"]).exists()


# ---------------------------------------------------------------- what the loader reads


def test_the_loaded_library_is_a_private_copy_of_the_bytes_it_hashed(signed):
    runtime.load(str(signed[1]))
    with open("/proc/self/maps") as f:
        maps = f.read()
    assert str(signed[1] / "kernels.so") not in maps
    assert "/memfd:kernels.so" in maps


@pytest.mark.parametrize("outside", ["../elsewhere/kernels.so", "absolute"])
def test_a_library_outside_the_bundle_is_never_loaded(copy, tmp_path, outside):
    """A manifest naming a library elsewhere, with its right hash: refused, and its constructor never runs."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++ to build the foreign library")
    marker = tmp_path / "constructor-ran"
    (tmp_path / "elsewhere").mkdir()
    library = tmp_path / "elsewhere" / "kernels.so"
    source = tmp_path / "evil.c"
    source.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void run(void) '
                      f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    subprocess.run(["g++", "-x", "c", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    name = str(library) if outside == "absolute" else outside

    def point_elsewhere(manifest):
        manifest["files"]["library"] = {"name": name, "sha256": sha256(library)}
    edit_manifest(copy, point_elsewhere)
    with pytest.raises(ValueError, match=r"`files.library.name` must be 'kernels.so'"):
        runtime.load(str(copy))
    assert not marker.exists()


def test_dev_zero_in_the_manifest_does_not_hang(copy):
    def add_dev_zero(manifest):
        manifest["files"]["extra"] = {"name": "/dev/zero", "sha256": "0" * 64}
    edit_manifest(copy, add_dev_zero)
    result = load_in_a_process(copy)
    assert "ValueError" in result.stdout and "`files.extra` is no file of a bundle" in result.stdout, result


def test_symlinks_and_special_files_are_refused(copy, tmp_path):
    weights = copy / runtime.BUNDLE_FILES["weights"]
    shutil.move(weights, tmp_path / "weights.npz")
    weights.symlink_to(tmp_path / "weights.npz")
    with pytest.raises(ValueError, match="weights.npz is a symbolic link"):
        runtime.load(str(copy))
    weights.unlink()
    os.mkfifo(weights)  # opening a FIFO for reading blocks until a writer comes
    result = load_in_a_process(copy)
    assert "ValueError" in result.stdout and "weights.npz is not a regular file" in result.stdout, result


def test_a_truncated_library_with_a_matching_checksum_is_refused_without_a_crash(copy):
    library = copy / runtime.BUNDLE_FILES["library"]
    library.write_bytes(library.read_bytes()[:os.path.getsize(library) // 2])

    def matching(manifest):
        manifest["files"]["library"]["sha256"] = sha256(library)
    edit_manifest(copy, matching)
    result = load_in_a_process(copy)
    assert result.returncode == 0, f"the process died (status {result.returncode}): {result.stderr[-2000:]}"
    assert "ValueError" in result.stdout and "the file is truncated" in result.stdout, result.stdout


def _set(path: str, value):
    """An edit that sets the manifest field at `path` ("layers.0.reads") to `value` (None: deletes it)."""
    def edit(manifest):
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        entries = manifest
        for parent in parents:
            entries = entries[parent]
        if value is None:
            del entries[last]
        else:
            entries[last] = value
    return edit


@pytest.mark.parametrize(("edit", "message"), [
    (_set("files.library", None), r"`files.library` is missing"),
    (_set("files.weights.sha256", 12), r"`files.weights.sha256` must be 64 hex digits"),
    (_set("files.weights.name", "../weights.npz"), r"`files.weights.name` must be 'weights.npz'"),
    (_set("files.library", "kernels.so"), r"`files.library` must be a JSON object"),
    (_set("format", "tvmconv-bundle-1"), r"`format` must be 'tvmconv-bundle-2'"),
    (_set("isa_features", None), r"`isa_features` is missing"),
    (_set("isa_features", "avx2"), r"`isa_features` must be a list"),
    (_set("device", "tpu"), r"`device` must be 'cpu' or 'cuda'"),
    (_set("dtype", 32), r"`dtype` must be one of"),
    (_set("input_shape", [2, -6, 6, 3]), r"`input_shape` must be 4 positive integers"),
    (_set("layers", []), r"`layers` must be a non-empty list"),
    (_set("layers.0", "conv"), r"`layers\[0\]` must be a JSON object"),
    (_set("layers.0.reads", 0), r"`layers\[0\].reads` must be -1 \(the input\)"),
    (_set("layers.1.reads", 7), r"`layers\[1\].reads` must be -1 \(the input\) or an earlier layer's index \(0 to 0\)"),
    (_set("layers.1.reads", True), r"`layers\[1\].reads` must be"),
    (_set("layers.0.output_shape", [2, 6, 6, -8]), r"`layers\[0\].output_shape` must be 4 positive integers"),
    (_set("layers.1.input_shape", [2, 6, 6, 9]), r"`layers\[1\].input_shape` must be the shape it reads"),
    (_set("layers.1.function", "layer_0"), r"`layers\[1\].function` must be 'layer_1'"),
    (_set("layers.1.weights", [1]), r"`layers\[1\].weights` must be a list of 1 or 2 weight names"),
    (_set("layers.1.weights", ["layer_1.kernel", "layer_9.bias"]), r"no array 'layer_9.bias' \(layers\[1\].weights\)"),
    (_set("outputs", [2]), r"`outputs` must be a non-empty list of layer indices \(0 to 1\)"),
    (_set("single_output", "yes"), r"`single_output` must be a boolean"),
    (lambda manifest: [manifest], r"the manifest must be a JSON object"),
])
def test_every_malformed_manifest_field_is_named(copy, edit, message):
    edit_manifest(copy, edit)
    with pytest.raises(ValueError, match=message):
        runtime.load(str(copy))


@pytest.mark.parametrize("text", [b"{not json", b"[" * 100000, b"\xff\xfe"])
def test_a_manifest_that_is_not_json_is_refused(copy, text):
    (copy / runtime.BUNDLE_FILES["manifest"]).write_bytes(text)
    with pytest.raises(ValueError, match="damaged bundle manifest"):
        runtime.load(str(copy))


# ---------------------------------------------------------------- instruction sets


def test_the_manifest_lists_every_instruction_set_and_the_host_has_them(signed):
    manifest = json.loads((signed[1] / runtime.BUNDLE_FILES["manifest"]).read_text())
    host = targets.resolve(None)
    assert manifest["isa_features"] == targets.isa_features(host)
    assert set(manifest["isa_features"]) <= runtime.cpu_flags()
    if targets.architecture(host) == "x86_64":  # beyond the vector ISA: the baseline, under cpuinfo's names
        assert {"sse2", "sse4_1", "pni", "cx16", "popcnt"} <= set(manifest["isa_features"])


def test_a_float16_bundle_for_sapphire_rapids_is_refused_where_avx512_fp16_is_missing(tmp_path):
    """LLVM's sapphirerapids model has AVX512-FP16, whose instructions (vcvtps2phx) kill an Ice Lake with SIGILL."""
    if runtime.host_architecture() != "x86_64":
        pytest.skip("an x86 target")
    layer = tvmconv.Conv2D(8, 3, padding="same", dtype="float16")
    target = {"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}
    manifest = tvmconv.export(layer, (1, 6, 6, 4), str(tmp_path / "spr"), target=target)
    assert {"avx512_fp16", "avx512_bf16", "amx_tile", "avx512f", "avx512vl"} <= set(manifest["isa_features"])
    missing = sorted(set(manifest["isa_features"]) - runtime.cpu_flags())
    if not missing:
        pytest.skip("this CPU has every instruction set of a Sapphire Rapids")
    with pytest.raises(ValueError, match=f"instructions this CPU lacks \\({', '.join(missing)}\\)"
                                         ".*Illegal instruction"):
        runtime.load(str(tmp_path / "spr"))
