"""Export: a model's convolutions compiled for a target into a bundle that the runtime alone can run.

A bundle is a folder (see runtime.BUNDLE_FILES):
  kernels.so     every layer's kernel, linked into one shared library by the target's toolchain
                 (a cross compiler for another CPU), each under the symbol "layer_<i>";
  kernels.fatbin CUDA targets only: the GPU code nvcc built from the library's CUDA source, which
                 the runtime loads in its place (no compiler is needed where the bundle runs);
  weights.npz    each layer's weights as its kernel reads them (packed, in the compute dtype);
  manifest.json  tvmconv and TVM versions, target and target key, the instruction sets its code uses,
                 input and output shapes, data format, dtype, the layer graph, and the SHA-256 of the
                 files above;
  manifest.sig   when signed (export's `sign`): the ed25519 signature of manifest.json's bytes.
Kernels use the target's best tuning record when there is one (records.py), else the defaults.
"""
import dataclasses
import json
import os

import numpy as np
import tvm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from . import __version__, build, lowering, runtime, targets
from .compute import pack_weights
from .graph import layer_calls
from .model import Model, output_calls


def generate_key(path) -> str:
    """Write a new ed25519 signing key to `path` (PEM, readable by its owner only) and its public key to
    `path`.pub (PEM); returns the key's fingerprint. An existing file is never overwritten."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path = os.fspath(path)
    for file in (path, path + ".pub"):  # checked first: no private key is left without its public one
        if os.path.lexists(file):
            raise FileExistsError(f"{file} exists; tvmconv keygen never overwrites a key")
    for file, data, mode in ((path, private, 0o600), (path + ".pub", public, 0o644)):
        with open(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
            f.write(data)
    return runtime.key_fingerprint(key.public_key())


def _signing_key(key_file) -> ed25519.Ed25519PrivateKey:
    if not isinstance(key_file, (str, os.PathLike)):
        raise TypeError(f"`sign` must be the path of a private key file (tvmconv keygen), got "
                        f"{type(key_file).__name__}")
    with open(key_file, "rb") as f:
        data = f.read()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:  # TypeError: the key is encrypted
        raise ValueError(f"`sign`: {os.fspath(key_file)} is not an unencrypted PEM private key ({err})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"`sign`: {os.fspath(key_file)} is a {type(key).__name__}; bundles are signed with ed25519 "
                         "keys (tvmconv keygen)")
    return key


def export(model_or_layer, input_shape, path: str, target="host", sign=None) -> dict:
    """Compile `model_or_layer` for `target` at `input_shape` (batch included, or 3D for batch 1) and
    write a bundle folder at `path`; returns its manifest. `target`: "host", a preset such as
    "aarch64", or a TVM target dict. `sign`: a private key file (tvmconv keygen) that signs the bundle,
    for runtime.load(..., trusted_keys=[its .pub])."""
    signing_key = None if sign is None else _signing_key(sign)
    target = targets.resolve(None if target == "host" else target)
    calls = layer_calls(model_or_layer, input_shape)
    for call in calls:
        if not isinstance(call.layer.activation, str):
            raise ValueError(f"Layer '{call.layer.name}' has a Python callable as its activation, which a compiled "
                             "bundle cannot run: use one of Keras's named activations to export it")
    os.makedirs(path, exist_ok=True)
    functions, weights, layers = {}, {}, []
    for i, call in enumerate(calls):
        function, knobs, tuned = build.scheduled_function(call.workload, target)
        block, _, winograd = tuned.layout if tuned else build.layout(knobs)
        symbol = f"layer_{i}"
        functions[symbol] = function.with_attr("global_symbol", symbol)
        bias, dtype = call.layer.bias, call.workload.dtype
        # "<symbol>.kernel": Keras's name for the convolution's weights (bundles keep it).
        names = [f"{symbol}.kernel"] + ([f"{symbol}.bias"] if bias is not None else [])
        weights[names[0]] = pack_weights(call.layer.kernel.astype(dtype), block, winograd)
        if bias is not None:
            weights[names[1]] = bias.astype(dtype)
        layers.append({"name": call.layer.name, "function": symbol, "reads": call.source, "weights": names,
                       "dtype": dtype,
                       "input_shape": list(call.workload.input_shape), "output_shape": list(call.workload.output_shape),
                       "workload": dataclasses.asdict(call.workload),
                       "tuning": str(tuned) if tuned else None})

    library = os.path.join(path, runtime.BUNDLE_FILES["library"])
    module = lowering.compile(tvm.IRModule(functions), target)
    module.export_library(library, fcompile=targets.cross_compiler(target))
    roles = ["library", "weights"]
    if target.kind.name == "cuda":
        with open(os.path.join(path, runtime.BUNDLE_FILES["device_code"]), "wb") as f:
            f.write(build.device_code(module, target))
        roles.append("device_code")
    weights_file = os.path.join(path, runtime.BUNDLE_FILES["weights"])
    np.savez(weights_file, **weights)

    first = calls[0].workload
    single_output = not isinstance(model_or_layer, Model) or model_or_layer._single_output
    manifest = {
        "format": runtime.BUNDLE_FORMAT, "tvmconv": __version__, "tvm": tvm.__version__,
        "target": {k: v if isinstance(v, (str, int, float, bool)) else [str(e) for e in v]
                   for k, v in target.export().items()},
        "target_key": targets.target_key(target),
        "architecture": targets.architecture(target),
        "device": "cuda" if target.kind.name == "cuda" else "cpu",
        # The instruction sets its code may use, as /proc/cpuinfo names them: the runtime checks them.
        "isa_features": targets.isa_features(target),
        "data_format": first.data_format, "dtype": first.dtype,
        "input_shape": list(first.input_shape),
        "outputs": output_calls(model_or_layer), "single_output": single_output,
        "layers": layers,
        "files": {role: {"name": runtime.BUNDLE_FILES[role],
                         "sha256": runtime.file_sha256(os.path.join(path, runtime.BUNDLE_FILES[role]))}
                  for role in roles},
    }
    text = json.dumps(manifest, indent=1).encode()
    with open(os.path.join(path, runtime.BUNDLE_FILES["manifest"]), "wb") as f:
        f.write(text)
    signature = os.path.join(path, runtime.BUNDLE_FILES["signature"])
    if signing_key is not None:
        with open(signature, "wb") as f:
            f.write(signing_key.sign(text))
    elif os.path.exists(signature):  # a previous export's: it would not match this manifest
        os.remove(signature)
    return manifest
