"""Export: a model's convolutions compiled for a target into a bundle that the runtime alone can run.

A bundle is a folder (see runtime.BUNDLE_FILES):
  kernels.so     every layer's kernel, linked into one shared library by the target's toolchain
                 (a cross compiler for another CPU), each under the symbol "layer_<i>";
  kernels.fatbin CUDA targets only: the GPU code nvcc built from the library's CUDA source, which
                 the runtime loads in its place (no compiler is needed where the bundle runs);
  weights.npz    each layer's weights as its kernel reads them (packed, in the compute dtype);
  manifest.json  tvmconv and TVM versions, target and target key, input and output shapes, data
                 format, dtype, the layer graph, and the SHA-256 of the two files above.
Kernels use the target's best tuning record when there is one (records.py), else the defaults.
"""
import dataclasses
import json
import os

import numpy as np
import tvm

from . import __version__, build, runtime, targets
from .compute import pack_weights
from .graph import layer_calls
from .model import Model, output_calls


def _x86_flags(target) -> list[str]:
    if targets.architecture(target) != "x86_64":
        return []
    bits = targets.vector_bits(target)
    return ["avx2", "fma"] + (["avx512f"] if bits >= 512 else []) if bits >= 256 else []


def export(model_or_layer, input_shape, path: str, target="host") -> dict:
    """Compile `model_or_layer` for `target` at `input_shape` (batch included, or 3D for batch 1) and
    write a bundle folder at `path`; returns its manifest. `target`: "host", a preset such as
    "aarch64", or a TVM target dict."""
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
        weight_block = tuned.weight_block if tuned else build.weight_block(knobs)
        symbol = f"layer_{i}"
        functions[symbol] = function.with_attr("global_symbol", symbol)
        bias, dtype = call.layer.bias, call.workload.dtype
        # "<symbol>.kernel": Keras's name for the convolution's weights (bundles keep it).
        names = [f"{symbol}.kernel"] + ([f"{symbol}.bias"] if bias is not None else [])
        weights[names[0]] = pack_weights(call.layer.kernel.astype(dtype), weight_block)
        if bias is not None:
            weights[names[1]] = bias.astype(dtype)
        layers.append({"name": call.layer.name, "function": symbol, "reads": call.source, "weights": names,
                       "dtype": dtype,
                       "input_shape": list(call.workload.input_shape), "output_shape": list(call.workload.output_shape),
                       "workload": dataclasses.asdict(call.workload),
                       "tuning": str(tuned) if tuned else None})

    library = os.path.join(path, runtime.BUNDLE_FILES["library"])
    module = tvm.compile(tvm.IRModule(functions), target=target).mod
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
        # The ISA extensions its code uses, as /proc/cpuinfo names them: the runtime checks them.
        "cpu_flags": _x86_flags(target),
        "data_format": first.data_format, "dtype": first.dtype,
        "input_shape": list(first.input_shape),
        "outputs": output_calls(model_or_layer), "single_output": single_output,
        "layers": layers,
        "files": {role: {"name": runtime.BUNDLE_FILES[role],
                         "sha256": runtime.file_sha256(os.path.join(path, runtime.BUNDLE_FILES[role]))}
                  for role in roles},
    }
    with open(os.path.join(path, runtime.BUNDLE_FILES["manifest"]), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest
