"""The bodies the service reads and writes: npy bytes, TF Serving's JSON, and the Open Inference
Protocol's JSON (KServe v2) with Triton's binary-data extension.

Plain functions of bytes and arrays, no HTTP: each refuses what does not fit the model with a
ValueError whose message the service sends back with a 400. Nothing here trusts the body: an npy
header is checked against the model before its data is touched, and JSON numbers must be numbers.
Non-finite outputs are written in JSON as TF Serving writes them: NaN, Infinity, -Infinity (Python's
json module and Triton's client read them).
"""
import dataclasses
import io
import json
import math

import numpy as np

# The Open Inference Protocol's names for the dtypes a bundle computes in.
DATATYPES = {"float16": "FP16", "float32": "FP32", "float64": "FP64"}
INPUT_NAME = "input"  # a bundle's one input (bundles record no name for it)
NPY_HEADER_LIMIT = 10000  # numpy's own bound on the header it parses


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]  # the batch axis excluded


@dataclasses.dataclass(frozen=True)
class ModelInterface:
    """What a client sees of a loaded bundle."""

    name: str
    input: Tensor
    outputs: tuple[Tensor, ...]
    compiled_batch: int


def interface(predictor, name: str) -> ModelInterface:
    manifest = predictor.manifest
    outputs = tuple(Tensor(manifest["layers"][i]["name"], manifest["layers"][i]["dtype"],
                           tuple(manifest["layers"][i]["output_shape"][1:])) for i in manifest["outputs"])
    return ModelInterface(name, Tensor(INPUT_NAME, str(predictor.dtype), tuple(predictor.input_shape[1:])), outputs,
                          predictor.input_shape[0])


def check_input(shape: tuple, dtype: np.dtype, model: ModelInterface) -> None:
    """The predictor's own checks, made before any data is read or converted."""
    if dtype != np.dtype(model.input.dtype):
        raise ValueError(f"expected input dtype {model.input.dtype}, got {dtype}")
    if len(shape) != 1 + len(model.input.shape) or tuple(shape[1:]) != model.input.shape or shape[0] < 1:
        raise ValueError(f"expected input shape (N, {', '.join(map(str, model.input.shape))}) with N >= 1, "
                         f"got {tuple(shape)}")


# ---------------------------------------------------------------- npy (this service's /predict)


def read_npy(body: bytearray, model: ModelInterface) -> np.ndarray:
    """The array of an npy body, read in place (the body's own memory, no copy)."""
    head = io.BytesIO(bytes(memoryview(body)[:NPY_HEADER_LIMIT + 12]))
    try:
        version = np.lib.format.read_magic(head)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"npy format {version[0]}.{version[1]} is not read here (1.0 and 2.0 are)")
        shape, fortran_order, dtype = readers[version](head, max_header_size=NPY_HEADER_LIMIT)
    except (ValueError, TypeError, EOFError, SyntaxError) as err:
        raise ValueError(f"the body is not a .npy array: {err}") from None
    check_input(shape, dtype, model)
    count = math.prod(shape)
    data = len(body) - head.tell()
    if data != count * dtype.itemsize:
        raise ValueError(f"the .npy header declares shape {shape} ({count * dtype.itemsize} bytes of data), the "
                         f"body holds {data} bytes of data")
    array = np.frombuffer(body, dtype, count, head.tell())
    return array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)


def write_npy(outputs: list[np.ndarray], model: ModelInterface) -> tuple[bytes, str]:
    """npy bytes for one output, npz (by output name) for several; and the media type."""
    buffer = io.BytesIO()
    if len(outputs) == 1:
        # The header, then the array's memory joined to it: one copy of the data, where np.save through a
        # BytesIO makes three (a 56x56x256 block's answer: ~1/5 of the server's time, py-spy).
        y = np.ascontiguousarray(outputs[0])
        np.lib.format.write_array_header_1_0(buffer, np.lib.format.header_data_from_array_1_0(y))
        return b"".join((buffer.getvalue(), y.reshape(-1).view(np.uint8))), "application/x-npy"
    np.savez(buffer, **{tensor.name: y for tensor, y in zip(model.outputs, outputs, strict=True)})
    return buffer.getvalue(), "application/x-npz"


# ---------------------------------------------------------------- JSON


def _parse(text: bytes) -> object:
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("the body is not JSON this server reads: it nests too deep") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, integers of over 4300 digits
        raise ValueError(f"the body is not JSON: {err}") from None


def _print(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _numbers(value, dtype: str, what: str) -> np.ndarray:
    """A JSON array of numbers as an array of `dtype`; strings, booleans, objects and ragged lists are refused
    (numpy would parse "1.5" as a number). Values beyond the dtype's range become infinities, as in a cast."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as err:  # ragged, or nested beyond numpy's 64 axes
        raise ValueError(f"{what} is not a numeric array: {err}") from None
    if array.dtype.kind not in "iuf":
        held = "booleans" if array.dtype.kind == "b" else "strings, objects or integers beyond 64 bits"
        raise ValueError(f"{what} is not a numeric array: it holds {held}")
    with np.errstate(over="ignore"):
        return array.astype(dtype)


def read_tf_json(body: bytes, model: ModelInterface) -> tuple[str, np.ndarray]:
    """TF Serving's request, {"inputs": batch} (columnar) or {"instances": [sample, ...]} (rows): its key, its array."""
    payload = _parse(body)
    if not isinstance(payload, dict) or len({"inputs", "instances"} & set(payload)) != 1:
        raise ValueError('expected {"inputs": batch} or {"instances": [sample, ...]}')
    key = "inputs" if "inputs" in payload else "instances"
    x = _numbers(payload[key], model.input.dtype, f'"{key}"')
    check_input(x.shape, x.dtype, model)
    return key, x


def write_tf_json(key: str, outputs: list[np.ndarray], model: ModelInterface) -> bytes:
    """TF Serving's answer: {"outputs": ...} to "inputs", {"predictions": [...]} to "instances"; several
    outputs by name (per sample for "predictions")."""
    names = [tensor.name for tensor in model.outputs]
    if key == "inputs":
        return _print({"outputs": outputs[0].tolist() if len(outputs) == 1 else
                       {name: y.tolist() for name, y in zip(names, outputs, strict=True)}})
    if len(outputs) == 1:
        return _print({"predictions": outputs[0].tolist()})
    rows = [y.tolist() for y in outputs]
    return _print({"predictions": [dict(zip(names, sample, strict=True)) for sample in zip(*rows, strict=True)]})


# ---------------------------------------------------------------- the Open Inference Protocol


@dataclasses.dataclass(frozen=True)
class InferRequest:
    """A checked inference request. The input is `data` when the JSON carried it; else its bytes follow
    the JSON header (binary-data extension), `shape` in the model's dtype."""

    id: str | None
    shape: tuple[int, ...]
    data: np.ndarray | None
    outputs: tuple[tuple[int, bool], ...]  # (index among the model's outputs, as binary data), in answer order


def _parameters(owner: dict, what: str) -> dict:
    parameters = owner.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ValueError(f'"parameters" of {what} must be an object, got {type(parameters).__name__}')
    return parameters


def _flag(parameters: dict, name: str, default: bool, what: str) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise ValueError(f'parameter "{name}" of {what} must be true or false, got {value!r}')
    return value


def read_infer(header: bytes, binary_size: int, model: ModelInterface) -> InferRequest:
    """An inference request's JSON object, checked against the model; `binary_size` bytes of tensor data
    follow it in the body."""
    payload = _parse(header)
    if not isinstance(payload, dict):
        raise ValueError("the inference request must be a JSON object")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ValueError(f'"id" must be a string, got {type(request_id).__name__}')
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ValueError(f'"inputs" must be a list of one tensor: the model has one input, "{model.input.name}"')
    tensor = inputs[0]
    if tensor.get("name") != model.input.name:
        raise ValueError(f'unknown input {tensor.get("name")!r}: the model\'s input is "{model.input.name}"')
    what = f'input "{model.input.name}"'
    datatype = DATATYPES[model.input.dtype]
    if tensor.get("datatype") != datatype:
        raise ValueError(f"{what} has datatype {tensor.get('datatype')!r}, the model takes {datatype}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f'"shape" of {what} must be a list of non-negative integers, got {shape!r}')
    check_input(tuple(shape), np.dtype(model.input.dtype), model)
    count = math.prod(shape)
    size = _parameters(tensor, what).get("binary_data_size")
    if size is None:
        if binary_size:
            raise ValueError(f"the body has {binary_size} bytes after its JSON header, and {what} declares no "
                             '"binary_data_size"')
        if "data" not in tensor:
            raise ValueError(f'{what} has neither "data" nor the parameter "binary_data_size"')
        data = _numbers(tensor["data"], model.input.dtype, f'the "data" of {what}')
        if data.size != count:
            raise ValueError(f'{what} has {data.size} values in "data", its shape {shape} holds {count}')
        data = data.reshape(shape)
    else:
        nbytes = count * np.dtype(model.input.dtype).itemsize
        if "data" in tensor:
            raise ValueError(f'{what} has both "data" and "binary_data_size"')
        if type(size) is not int or size != nbytes:
            raise ValueError(f'"binary_data_size" of {what} is {size!r}; its shape {shape} in {datatype} is '
                             f"{nbytes} bytes")
        if binary_size != size:
            raise ValueError(f"the body has {binary_size} bytes after its JSON header, {what} declares {size}")
        data = None

    binary = _flag(_parameters(payload, "the request"), "binary_data_output", False, "the request")
    names = [output.name for output in model.outputs]
    requested = payload.get("outputs")
    if requested is None:
        outputs = tuple((i, binary) for i in range(len(names)))
    else:
        if not isinstance(requested, list) or not all(isinstance(r, dict) for r in requested):
            raise ValueError('"outputs" must be a list of objects such as {"name": "..."}')
        outputs = []
        for output in requested:
            if output.get("name") not in names:
                raise ValueError(f"unknown output {output.get('name')!r}: the model's outputs are {names}")
            parameters = _parameters(output, f'output "{output["name"]}"')
            if "classification" in parameters:
                raise ValueError("the classification extension is not supported: ask for the output tensor")
            outputs.append((names.index(output["name"]),
                            _flag(parameters, "binary_data", binary, f'output "{output["name"]}"')))
        if len({i for i, _ in outputs}) != len(outputs):
            raise ValueError('"outputs" names an output twice')
    return InferRequest(request_id, tuple(shape), data, tuple(outputs))


def write_infer(request: InferRequest, outputs: list[np.ndarray], model: ModelInterface) -> tuple[bytes, int | None]:
    """The inference response: its body, and the length of its JSON header when binary output data follows."""
    entries, binary = [], []
    for index, as_binary in request.outputs:
        y, tensor = outputs[index], model.outputs[index]
        entry = {"name": tensor.name, "datatype": DATATYPES[tensor.dtype], "shape": list(y.shape)}
        if as_binary:
            y = np.ascontiguousarray(y, y.dtype.newbyteorder("<"))  # the extension's byte order
            entry["parameters"] = {"binary_data_size": y.nbytes}
            binary.append(y.data.cast("B"))
        else:
            entry["data"] = y.ravel().tolist()
        entries.append(entry)
    answer = {"model_name": model.name, **({"id": request.id} if request.id is not None else {}), "outputs": entries}
    header = _print(answer)
    if not binary:
        return header, None
    return b"".join([header, *binary]), len(header)
