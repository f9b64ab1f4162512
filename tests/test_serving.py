"""The HTTP service against live servers (`tvmconv serve` in a subprocess): the Open Inference Protocol
through Triton's own client, this service's /predict, Prometheus metrics, dynamic batching, a server
that holds under abuse (sizes, timeouts, the buffer bound, deep JSON, non-finite numbers, tokens), and
a drain on SIGTERM. Outputs are checked against float64 numpy references of the layers."""
import contextlib
import dataclasses
import io
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from farm import free_port
from test_bundles import expected
from test_export import small_model

import tvmconv
from tvmconv import bundle, cli, protocol, reference, runtime

pytest.importorskip("fastapi", reason="serving needs the serve extra: pip install .[serve]")
triton = pytest.importorskip("tritonclient.http", reason="the protocol tests use Triton's client: pip install .[test]")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402  (with the serve extra)

REPO = pathlib.Path(__file__).resolve().parent.parent
TOKEN = "s3cret-token-of-32-characters-xx"


def layer_reference(layer, x):
    z = reference.conv2d(x, layer.kernel, layer.bias, layer.strides, layer.padding, layer.dilation_rate, layer.groups)
    return reference.ACTIVATIONS[layer.activation](z)


def twin_model():
    """A functional model with two outputs: conv(conv(x)) and conv(x)."""
    init = tvmconv.initializers.GlorotUniform(seed=5)
    inputs = tvmconv.layer_input((9, 9, 4))
    a = tvmconv.layer_conv_2d(inputs, 8, 3, activation="relu", kernel_initializer=init, bias_initializer="ones")
    b = tvmconv.layer_conv_2d(a, 5, 1, kernel_initializer=init)
    c = tvmconv.layer_conv_2d(inputs, 3, 5, padding="same", activation="sigmoid", kernel_initializer=init)
    model = tvmconv.Model(inputs, [b, c])
    first, second, third = (layer for layer in model.layers if isinstance(layer, tvmconv.Conv2D))

    def outputs_of(x):
        return [layer_reference(second, layer_reference(first, x)), layer_reference(third, x)]

    return model, outputs_of


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two signing key pairs, "release" and "other": {name: (private key file, public key file, fingerprint)}."""
    folder = tmp_path_factory.mktemp("keys")
    return {name: (str(folder / name), str(folder / f"{name}.pub"), bundle.generate_key(folder / name))
            for name in ("release", "other")}


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory, keys):
    """The three-layer model, exported at batch 4 into a folder named "model", signed with the release key."""
    model = small_model()
    path = tmp_path_factory.mktemp("bundle") / "model"
    tvmconv.export(model, (4, 10, 10, 3), str(path), sign=keys["release"][0])
    return model, str(path)


@pytest.fixture(scope="module")
def twin_bundle(tmp_path_factory):
    model, outputs_of = twin_model()
    path = tmp_path_factory.mktemp("twin") / "twin"
    tvmconv.export(model, (2, 9, 9, 4), str(path))
    return outputs_of, str(path)


@dataclasses.dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: pathlib.Path

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)

    def logged(self) -> str:
        return self.log.read_text()


@contextlib.contextmanager
def served(path: str, folder: pathlib.Path, *flags):
    """`tvmconv serve PATH FLAGS` on a free port of 127.0.0.1, up and live; stopped (SIGTERM) after."""
    port = free_port()
    log = folder / f"serve-{port}.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "tvmconv.cli", "serve", path, "--port", str(port), *flags],
                                   stdout=subprocess.DEVNULL, stderr=sink, cwd=folder)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, server.logged()
        try:
            urllib.request.urlopen(server.url + "/v2/health/live", timeout=2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "the server did not come up:\n" + server.logged()
            time.sleep(0.2)
    try:
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(60)


def call(url: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) of one request; errors are answers too."""
    request = urllib.request.Request(url + path, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def exchange(server: Server, data: bytes, wait: float = 20.0) -> tuple[bytes, bool]:
    """Send raw bytes on a new connection; what came back until the server closed it, and whether it
    did close it within `wait` seconds."""
    with socket.create_connection(server.address) as connection:
        connection.sendall(data)
        connection.settimeout(wait)
        received = b""
        try:
            while chunk := connection.recv(1 << 16):
                received += chunk
        except TimeoutError:
            return received, False
    return received, True


def metrics(server: Server, headers: dict | None = None) -> dict:
    """Every sample of /metrics by (name, sorted labels)."""
    status, _, body = call(server.url, "/metrics", headers=headers)
    assert status == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


def infer_input(x, binary: bool):
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


@pytest.fixture(scope="module")
def server(small_bundle, keys, tmp_path_factory):
    """The three-layer bundle, its signature checked, with small limits: 16 MiB bodies, 1 s for headers, 2 s
    for bodies."""
    folder = tmp_path_factory.mktemp("serve")
    with served(small_bundle[1], folder, "--trusted-key", keys["other"][1], "--trusted-key", keys["release"][1],
                "--max-request-mb", "16", "--header-timeout", "1", "--body-timeout", "2") as running:
        yield running


@pytest.fixture(scope="module")
def secured(twin_bundle, tmp_path_factory):
    """The two-output bundle behind a bearer token, named "twins", with /docs."""
    folder = tmp_path_factory.mktemp("secured")
    (folder / "token").write_text(TOKEN + "\n")
    with served(twin_bundle[1], folder, "--token-file", str(folder / "token"), "--model-name", "twins",
                "--docs") as running:
        yield running


AUTH = {"Authorization": f"Bearer {TOKEN}"}  # give Triton's client a copy: it adds its own headers to the dict


# ---------------------------------------------------------------- the Open Inference Protocol


def test_triton_client_reads_health_and_metadata(server):
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("model")
    assert client.get_server_metadata() == {"name": "tvmconv", "version": tvmconv.__version__,
                                            "extensions": ["binary_tensor_data"]}
    assert client.get_model_metadata("model") == {
        "name": "model", "platform": "tvmconv_bundle",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 10, 10, 3]}],
        "outputs": [{"name": small_model_output_name(server), "datatype": "FP32", "shape": [-1, 5, 5, 6]}]}
    assert not client.is_model_ready("other")
    with pytest.raises(triton.InferenceServerException, match="unknown model 'other'"):
        client.get_model_metadata("other")


def small_model_output_name(server: Server) -> str:
    _, _, body = call(server.url, "/metadata")
    return json.loads(body)["outputs"][0]["name"]


@pytest.mark.parametrize(("binary_in", "binary_out"), [(False, False), (True, True), (True, False), (False, True)])
def test_triton_client_infers_json_and_binary_tensors(server, small_bundle, rng, binary_in, binary_out):
    model, _ = small_bundle
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    output = small_model_output_name(server)
    x = rng.standard_normal((3, 10, 10, 3)).astype(np.float32)
    result = client.infer("model", [infer_input(x, binary_in)], request_id="r-7",
                          outputs=[triton.InferRequestedOutput(output, binary_data=binary_out)])
    y = result.as_numpy(output)
    assert y.dtype == np.float32 and y.shape == (3, 5, 5, 6)
    np.testing.assert_allclose(y, expected(model, x), rtol=1e-4, atol=1e-5)
    response = result.get_response()
    assert response["id"] == "r-7" and response["model_name"] == "model"
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) == binary_out


def test_triton_client_chooses_among_several_outputs(secured, twin_bundle, rng):
    outputs_of, _ = twin_bundle
    client = triton.InferenceServerClient(secured.url.removeprefix("http://"))
    names = [t["name"] for t in client.get_model_metadata("twins", headers={**AUTH})["outputs"]]
    x = rng.standard_normal((3, 9, 9, 4)).astype(np.float32)
    want = outputs_of(x)
    # Both outputs, the second first, one as JSON and one as binary data.
    result = client.infer("twins", [infer_input(x, True)], headers={**AUTH},
                          outputs=[triton.InferRequestedOutput(names[1], binary_data=False),
                                   triton.InferRequestedOutput(names[0], binary_data=True)])
    assert [o["name"] for o in result.get_response()["outputs"]] == [names[1], names[0]]
    for name, y in zip(names, want, strict=True):
        np.testing.assert_allclose(result.as_numpy(name), y, rtol=1e-4, atol=1e-5)
    # No outputs named: all of them, as binary data (the client's default).
    result = client.infer("twins", [infer_input(x, False)], headers={**AUTH})
    for name, y in zip(names, want, strict=True):
        np.testing.assert_allclose(result.as_numpy(name), y, rtol=1e-4, atol=1e-5)


def infer_body(x, **changes) -> bytes:
    request = {"id": "1", "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                      "data": x.ravel().tolist()}]}
    request["inputs"][0].update(changes)
    return json.dumps(request).encode()


X = np.zeros((1, 10, 10, 3), np.float32)
BINARY_HEADER = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 10, 10, 3],
                                        "parameters": {"binary_data_size": 1200}}]}).encode()


@pytest.mark.parametrize(("body", "headers", "status", "message"), [
    (infer_body(X, name="x"), {}, 400, "unknown input 'x': the model's input is \"input\""),
    (infer_body(X, datatype="FP64"), {}, 400, "has datatype 'FP64', the model takes FP32"),
    (infer_body(X, shape=[1, 10, 10, 4]), {}, 400, "expected input shape (N, 10, 10, 3)"),
    (infer_body(X, shape=[1, 10, 10]), {}, 400, "expected input shape (N, 10, 10, 3)"),
    (infer_body(X, shape="1x10"), {}, 400, '"shape" of input "input" must be a list'),
    (infer_body(X, data=[1.0] * 5), {}, 400, 'has 5 values in "data", its shape [1, 10, 10, 3] holds 300'),
    (infer_body(X, data=["1.5"] * 300), {}, 400, "not a numeric array: it holds strings"),
    (infer_body(X, data=[True] * 300), {}, 400, "not a numeric array: it holds booleans"),
    (infer_body(X, data=[[1.0], [2.0, 3.0]]), {}, 400, "not a numeric array"),
    (b'{"inputs": []}', {}, 400, '"inputs" must be a list of one tensor'),
    (b'{"inputs": [{"name": "input"}], "id": 5}', {}, 400, '"id" must be a string'),
    (b"[1, 2]", {}, 400, "must be a JSON object"),
    (b"{nope", {}, 400, "the body is not JSON"),
    (b'{"a": ' * 100000 + b"1" + b"}" * 100000, {}, 400, "nests too deep"),
    (BINARY_HEADER + bytes(1199), {"Inference-Header-Content-Length": str(len(BINARY_HEADER))}, 400,
     "the body has 1199 bytes after its JSON header, input \"input\" declares 1200"),
    (BINARY_HEADER + bytes(1200), {"Inference-Header-Content-Length": "99999"}, 400,
     "Inference-Header-Content-Length '99999' is not a length within"),
    (BINARY_HEADER + bytes(1200), {}, 400, "the body is not JSON"),
    (infer_body(X)[:-1] + b', "outputs": [{"name": "nope"}]}', {}, 400, "unknown output 'nope'"),
    (infer_body(X)[:-1] + b', "parameters": {"binary_data_output": 1}}', {}, 400,
     'parameter "binary_data_output" of the request must be true or false'),
    (infer_body(X), {"Content-Encoding": "gzip"}, 415, "Content-Encoding 'gzip' is not accepted"),
])
def test_infer_refuses_bad_requests_with_a_json_error(server, body, headers, status, message):
    got, answer_headers, answer = call(server.url, "/v2/models/model/infer", body, headers)
    assert got == status and answer_headers["content-type"] == "application/json"
    assert message in json.loads(answer)["error"]
    assert call(server.url, "/v2/health/ready")[0] == 200


def test_unknown_models_and_endpoints_get_404s_with_json_errors(server):
    for path in ("/v2/models/other", "/v2/models/other/ready", "/v2/models/model/versions/1/infer", "/v3"):
        status, _, body = call(server.url, path, b"{}" if path.endswith("infer") else None)
        assert status == 404 and json.loads(body)["error"]


# ---------------------------------------------------------------- /predict (npy and TF Serving's JSON)


def test_predict_answers_concurrent_npy_requests(server, small_bundle):
    model, _ = small_bundle
    inputs = [np.random.default_rng(i).standard_normal((1 + i % 6, 10, 10, 3)).astype(np.float32) for i in range(12)]
    answers = [None] * len(inputs)

    def ask(i):
        answers[i] = call(server.url, "/predict", npy(inputs[i]), {"Content-Type": "application/x-npy"})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for x, (status, _, body) in zip(inputs, answers, strict=True):
        assert status == 200
        np.testing.assert_allclose(np.load(io.BytesIO(body)), expected(model, x), rtol=1e-4, atol=1e-5)
    meta = json.loads(call(server.url, "/metadata")[2])
    assert meta["input"] == {"shape": [None, 10, 10, 3], "dtype": "float32", "data_format": "channels_last",
                             "compiled_batch": 4}


@pytest.mark.parametrize("y", [np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.arange(12.0).reshape(3, 4).T,
                               np.zeros((0, 3), np.float32), np.arange(6, dtype=np.float16).reshape(1, 6)],
                         ids=["C order", "Fortran order", "empty", "float16"])
def test_npy_answers_load_back_as_the_outputs(y):
    body, media_type = protocol.write_npy([y], None)
    assert media_type == "application/x-npy"
    loaded = np.load(io.BytesIO(body), allow_pickle=False)
    assert loaded.dtype == y.dtype and loaded.shape == y.shape
    np.testing.assert_array_equal(loaded, y)


def test_predict_speaks_tf_serving_json(server, small_bundle, rng):
    model, _ = small_bundle
    x = rng.standard_normal((2, 10, 10, 3)).astype(np.float32)
    for key, answer_key in (("inputs", "outputs"), ("instances", "predictions")):
        status, _, body = call(server.url, "/predict", json.dumps({key: x.tolist()}).encode(),
                               {"Content-Type": "application/json"})
        assert status == 200
        np.testing.assert_allclose(np.asarray(json.loads(body)[answer_key]), expected(model, x),
                                   rtol=1e-4, atol=1e-5)


def test_predict_with_several_outputs(secured, twin_bundle, rng):
    outputs_of, _ = twin_bundle
    x = rng.standard_normal((3, 9, 9, 4)).astype(np.float32)
    names = [t["name"] for t in json.loads(call(secured.url, "/metadata", headers=AUTH)[2])["outputs"]]
    status, headers, body = call(secured.url, "/predict", npy(x), {"Content-Type": "application/x-npy", **AUTH})
    assert status == 200 and headers["content-type"] == "application/x-npz"
    with np.load(io.BytesIO(body)) as answer:
        for name, y in zip(names, outputs_of(x), strict=True):
            np.testing.assert_allclose(answer[name], y, rtol=1e-4, atol=1e-5)
    status, _, body = call(secured.url, "/predict", json.dumps({"instances": x.tolist()}).encode(),
                           {"Content-Type": "application/json", **AUTH})
    rows = json.loads(body)["predictions"]
    assert status == 200 and len(rows) == 3
    for name, y in zip(names, outputs_of(x), strict=True):
        np.testing.assert_allclose(np.asarray([row[name] for row in rows]), y, rtol=1e-4, atol=1e-5)


def npy_claiming(shape: tuple) -> bytes:
    """An npy header claiming `shape` in float32, and the data of a (1, 10, 10, 3) array."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + bytes(1200)


@pytest.mark.parametrize(("body", "kind", "status", "message"), [
    (b"not npy", "application/x-npy", 400, "not a .npy array"),
    (npy(np.zeros((1, 10, 10, 4), np.float32)), "application/octet-stream", 400, "expected input shape"),
    (npy(np.zeros((1, 10, 10, 3), np.float64)), "application/x-npy", 400, "expected input dtype float32"),
    (npy(np.zeros((1, 10, 10, 3), ">f4")), "application/x-npy", 400, "expected input dtype float32, got >f4"),
    (npy(np.zeros((1, 10, 10), np.float32)), "application/x-npy", 400, "expected input shape"),
    (npy(np.array([{"a": 1}], dtype=object)), "application/x-npy", 400, "expected input dtype float32, got object"),
    (npy_claiming((10 ** 12, 10, 10, 3)), "application/x-npy", 400,
     "declares shape (1000000000000, 10, 10, 3) (1200000000000000 bytes of data), the body holds 1200"),
    (npy_claiming((2, 10, 10, 3)), "application/x-npy", 400, "(2400 bytes of data), the body holds 1200"),
    (npy(np.zeros((1, 10, 10, 3), np.float32))[:-4], "application/x-npy", 400, "the body holds 1196"),
    (b"{not json", "application/json", 400, "not JSON"),
    (b'{"inputs": [[1, 2], [3]]}', "application/json", 400, "not a numeric array"),
    (b'{"inputs": [[[["1", "2", "3"]]]]}', "application/json", 400, "not a numeric array: it holds strings"),
    (b'{"inputs": [[[[' + b"9" * 5000 + b', 2, 3]]]]}', "application/json", 400, "not JSON"),
    (b'{"inputs": [[[[' + b"9" * 400 + b', 2, 3]]]]}', "application/json", 400, "integers beyond 64 bits"),
    (b'{"inputs": ' + b"[" * 100000 + b"]" * 100000 + b"}", "application/json", 400, "nests too deep"),
    (b'{"rows": []}', "application/json", 400, "expected {"),
    (b"x", "text/plain", 415, "unsupported Content-Type"),
    (npy(np.zeros((7, 100, 100, 60), np.float32)), "application/x-npy", 413, "is over the limit of 16777216 bytes"),
])
def test_predict_refuses_bad_requests_and_stays_up(server, body, kind, status, message):
    got, _, answer = call(server.url, "/predict", body, {"Content-Type": kind})
    assert got == status and message in json.loads(answer)["error"]
    assert json.loads(call(server.url, "/health")[2]) == {"status": "ok"}


def test_non_finite_outputs_are_written_as_tf_serving_writes_them(server, small_bundle):
    """NaN in, and 1e39 (beyond float32: +inf once cast): the answers carry the bundle's NaNs as NaN tokens, as
    TF Serving writes them. (How kernels treat NaN and infinities is theirs: the bundle is the reference.)"""
    _, path = small_bundle
    x = np.random.default_rng(3).standard_normal((2, 10, 10, 3))
    x[0, 4, 4, 0], x[1, 2, 2, 1] = np.nan, 1e39
    with np.errstate(over="ignore"):
        want = runtime.load(path)(x.astype(np.float32))
    assert np.isnan(want).any()
    status, _, body = call(server.url, "/predict", json.dumps({"inputs": x.tolist()}).encode(),
                           {"Content-Type": "application/json"})
    assert status == 200 and b"NaN" in body
    np.testing.assert_array_equal(np.asarray(json.loads(body)["outputs"]), want)  # json reads NaN and Infinity
    status, _, body = call(server.url, "/v2/models/model/infer", infer_body(x))
    assert status == 200 and b"NaN" in body
    np.testing.assert_array_equal(np.asarray(json.loads(body)["outputs"][0]["data"]).reshape(want.shape), want)


# ---------------------------------------------------------------- limits, timeouts, the buffer bound


def test_a_declared_oversize_body_gets_413_at_once(server):
    """Content-Length 10^12 and 10 bytes: the 413 comes before the body (which never will), the connection closes."""
    answer, closed = exchange(server, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                                      b"Content-Length: 1000000000000\r\n\r\n0123456789")
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"error":"request body of 1000000000000 bytes' in answer
    assert closed


def test_headers_have_a_deadline(server):
    """Headers cut off half way hold no connection past --header-timeout (1 s here), nor does a second request's."""
    answer, closed = exchange(server, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Le")
    assert closed and answer == b""
    answer, closed = exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /heal")
    assert closed and answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1") == 1


def test_bodies_have_a_deadline(server):
    answer, closed = exchange(server, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                                      b"Content-Length: 5000\r\n\r\n0123456789")
    assert closed and answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 2.0 s" in answer


def test_large_json_does_not_hold_the_event_loop(server, small_bundle):
    """An 11 MB JSON body is parsed and printed in a worker process: /health keeps answering meanwhile.
    (Parsed in the server's own process, /health waited 1.2 s of a 2.1 s request here; in a worker, 40 ms.)"""
    model, _ = small_bundle
    x = np.random.default_rng(5).standard_normal((1750, 10, 10, 3)).astype(np.float32)
    body = json.dumps({"inputs": x.tolist()}).encode()
    assert len(body) > 11e6
    waits, done = [], threading.Event()

    def poll():
        while not done.is_set():
            started = time.perf_counter()
            assert call(server.url, "/health")[0] == 200
            waits.append(time.perf_counter() - started)
            time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    started = time.perf_counter()
    status, _, answer = call(server.url, "/predict", body, {"Content-Type": "application/json"})
    duration = time.perf_counter() - started
    done.set()
    poller.join()
    assert status == 200
    np.testing.assert_allclose(np.asarray(json.loads(answer)["outputs"]), expected(model, x),
                               rtol=1e-4, atol=1e-5)
    assert len(waits) > 10 and max(waits) < duration / 4, (max(waits), duration)


def memory(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(field + ":"))


def test_buffered_request_bytes_are_bounded(tmp_path, rng):
    """Eight concurrent 60 MiB uploads under --max-buffered-mb 128: the server holds at most two bodies at once
    (its gauge of buffered bytes, sampled throughout), its peak RSS grows by about that, not by eight bodies
    (511 MiB without the bound here), and every answer is right."""
    layer = tvmconv.Conv2D(2, 1, kernel_initializer=tvmconv.initializers.GlorotUniform(seed=1))
    tvmconv.export(layer, (256, 8, 8, 64), str(tmp_path / "wide"))  # 16 KiB in, 512 bytes out per sample
    x = rng.standard_normal((3840, 8, 8, 64)).astype(np.float32)
    body = npy(x)
    assert len(body) > 60 << 20
    with served(str(tmp_path / "wide"), tmp_path, "--max-request-mb", "64", "--max-buffered-mb", "128") as running:
        assert call(running.url, "/predict", npy(x[:4]), {"Content-Type": "application/x-npy"})[0] == 200
        pid = running.process.pid
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS (Linux): the peak below is the uploads' own
        before = memory(pid, "VmRSS")
        answers, held = [None] * 8, []

        def upload(i):
            answers[i] = call(running.url, "/predict", body, {"Content-Type": "application/x-npy"})

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 300
        while any(thread.is_alive() for thread in threads) and time.monotonic() < deadline:
            held.append(metrics(running)[("tvmconv_buffered_request_bytes", ())])
            time.sleep(0.02)
        growth = memory(pid, "VmHWM") - before
    want = layer_reference(layer, x)
    for status, _, answer in answers:
        assert status == 200
        np.testing.assert_allclose(np.load(io.BytesIO(answer)), want, rtol=1e-4, atol=1e-5)
    assert max(held) == 2 * len(body) and max(held) <= 128 << 20, (max(held), len(body))
    # Two bodies are 120 MiB; what the server allocates besides them (answers, outputs, the allocator's slack)
    # comes on top: 133-135 MiB in all on an idle machine, once 195 MiB with the test suite running beside it.
    assert growth < 4 * len(body), f"peak RSS grew by {growth >> 20} MiB"


# ---------------------------------------------------------------- auth, docs, names, options


def test_a_token_file_turns_on_bearer_auth(secured):
    for headers in ({}, {"Authorization": "Bearer wrong-token-of-enough-length"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}):
        for path in ("/v2/models/twins", "/metrics", "/metadata", "/v2"):
            status, answer_headers, body = call(secured.url, path, headers=headers)
            assert status == 401 and answer_headers["www-authenticate"] == "Bearer"
            assert "Authorization: Bearer" in json.loads(body)["error"]
    status, _, body = call(secured.url, "/v2/models/twins/infer", infer_body(np.zeros((1, 9, 9, 4))))
    assert status == 401
    for path in ("/health", "/v2/health/live", "/v2/health/ready"):  # probes carry no token
        assert call(secured.url, path)[0] == 200
    assert call(secured.url, "/v2/models/twins", headers=AUTH)[0] == 200
    assert call(secured.url, "/v2/models/twins", headers={"Authorization": f"bearer  {TOKEN}"})[0] == 200
    client = triton.InferenceServerClient(secured.url.removeprefix("http://"))
    with pytest.raises(triton.InferenceServerException, match="Bearer"):
        client.get_model_metadata("twins")


def test_docs_are_off_unless_asked_for(server, secured):
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert call(server.url, path)[0] == 404
    assert call(secured.url, "/docs", headers=AUTH)[0] == 200
    assert "/v2/models/{name}/infer" in json.loads(call(secured.url, "/openapi.json", headers=AUTH)[2])["paths"]


def test_the_model_name_is_the_folder_or_model_name(server, secured):
    assert json.loads(call(server.url, "/v2/models/model")[2])["name"] == "model"
    assert call(secured.url, "/v2/models/twin", headers=AUTH)[0] == 404
    assert json.loads(call(secured.url, "/v2/models/twins/ready", headers=AUTH)[2]) == {"name": "twins", "ready": True}


def test_startup_logs_the_bundle_its_target_key_and_signature(server, secured, small_bundle, twin_bundle, keys):
    for running, path, signature in ((server, small_bundle[1], f"verified, signed by key {keys['release'][2]}"),
                                     (secured, twin_bundle[1], "not verified (unsigned, or no --trusted-key given)")):
        manifest = json.loads((pathlib.Path(path) / "manifest.json").read_text())
        log = running.logged()
        assert f"serving {path} as model " in log and f"target key {manifest['target_key']}" in log
        assert f"signature: {signature}" in log


def test_trusted_keys_refuse_bundles_they_did_not_sign(small_bundle, twin_bundle, keys, capsys):
    assert cli.main(["serve", twin_bundle[1], "--trusted-key", keys["release"][1]]) == 2
    assert f"the bundle at {twin_bundle[1]} is not signed" in capsys.readouterr().err
    assert cli.main(["serve", small_bundle[1], "--trusted-key", keys["other"][1]]) == 2
    assert f"the bundle at {small_bundle[1]} is not signed by any of the trusted keys" in capsys.readouterr().err


@pytest.mark.parametrize(("arguments", "message"), [
    ({"max_batch": 0}, "max_batch (--max-batch) must be a positive int, got 0"),
    ({"concurrency": True}, "concurrency (--concurrency) must be a positive int, got True"),
    ({"max_delay_ms": -1}, "max_delay_ms (--max-delay-ms) must be a non-negative number of milliseconds"),
    ({"header_timeout": 0}, "header_timeout (--header-timeout) must be a positive number of seconds"),
    ({"body_timeout": float("inf")}, "body_timeout (--body-timeout) must be a positive number"),
    ({"max_buffered_bytes": 1 << 20}, "is below max_request_bytes (--max-request-mb)"),
    ({"model_name": "a/b"}, "model_name (--model-name) must be 1 to 128 letters"),
])
def test_options_are_checked(arguments, message):
    from tvmconv import serving
    with pytest.raises(ValueError, match=re.escape(message)):
        serving.Options(**arguments)


def test_model_calls_at_once_default_to_one_with_batching(monkeypatch):
    """Concurrent batches are short ones: with --max-batch the server runs one model call at a time unless told."""
    from tvmconv import serving
    assert serving.Options().concurrency == 4
    assert serving.Options(max_batch=8).concurrency == 1
    assert serving.Options(max_batch=8, concurrency=3).concurrency == 3
    started = []
    monkeypatch.setattr(serving, "run", lambda bundle, options, host, port: started.append(options))
    for flags in ([], ["--max-batch", "8"], ["--max-batch", "8", "--concurrency", "2"]):
        assert cli.main(["serve", "bundle", *flags]) == 0
    assert [options.concurrency for options in started] == [4, 1, 2]


def test_serve_refuses_bad_arguments_with_a_message(small_bundle, tmp_path, capsys):
    assert cli.main(["serve", small_bundle[1], "--max-batch", "8"]) == 2
    assert ("--max-batch 8 needs a bundle exported at batch 8, and " + small_bundle[1] + " is compiled for batch 4"
            in capsys.readouterr().err)
    (tmp_path / "short").write_text("abc\n")
    assert cli.main(["serve", small_bundle[1], "--token-file", str(tmp_path / "short")]) == 2
    assert "must hold one token of 16 to 4096 printable ASCII characters" in capsys.readouterr().err
    assert cli.main(["serve", small_bundle[1], "--token-file", str(tmp_path / "missing")]) == 2
    assert "No such file or directory" in capsys.readouterr().err
    for flag, value in (("--max-batch", "0"), ("--concurrency", "-1"), ("--threads", "0"), ("--max-delay-ms", "nan")):
        assert cli.main(["serve", small_bundle[1], flag, value]) == 2
        assert f"({flag}) must be a" in capsys.readouterr().err


# ---------------------------------------------------------------- metrics


def test_metrics_count_requests_errors_bytes_latency_and_batches(server):
    infer = ("tvmconv_requests_total", (("code", "200"), ("endpoint", "/v2/models/{name}/infer")))
    refused = ("tvmconv_requests_total", (("code", "400"), ("endpoint", "/v2/models/{name}/infer")))
    bytes_in = ("tvmconv_request_body_bytes_total", (("endpoint", "/v2/models/{name}/infer"),))
    latency = ("tvmconv_request_duration_seconds_count", (("endpoint", "/v2/models/{name}/infer"),))
    samples = ("tvmconv_batch_size_sum", ())
    calls = ("tvmconv_batch_size_count", ())
    before = metrics(server)
    bodies = [infer_body(np.ones((2, 10, 10, 3))), infer_body(np.ones((5, 10, 10, 3))), infer_body(X, name="x")]
    for body in bodies:
        call(server.url, "/v2/models/model/infer", body)
    after = metrics(server)

    def grew(key):
        return after.get(key, 0) - before.get(key, 0)

    assert grew(infer) == 2 and grew(refused) == 1 and grew(latency) == 3
    assert grew(bytes_in) == sum(len(body) for body in bodies)
    assert grew(samples) == 7 and grew(calls) == 2  # unbatched: one call per request
    assert after[("tvmconv_queue_depth", ())] == 0 and after[("tvmconv_buffered_request_bytes", ())] == 0
    assert after[("tvmconv_requests_in_flight", ())] == 1  # this scrape
    buckets = ("tvmconv_request_duration_seconds_bucket", (("endpoint", "/v2/models/{name}/infer"), ("le", "+Inf")))
    assert grew(buckets) == 3  # a server that has not served this endpoint yet has no buckets for it


# ---------------------------------------------------------------- dynamic batching


def test_batching_merges_requests_and_answers_each_as_alone(small_bundle, tmp_path):
    """Concurrent requests of 1-3 samples, through Triton's client and /predict, against a server batching
    at the bundle's batch of 4: fewer model calls than requests, and each answer identical to the bundle's
    unbatched output for that request."""
    model, path = small_bundle
    alone = runtime.load(path)
    inputs = [np.random.default_rng(10 + i).standard_normal((1 + i % 3, 10, 10, 3)).astype(np.float32)
              for i in range(12)]
    answers = [None] * len(inputs)
    with served(path, tmp_path, "--max-batch", "4", "--max-delay-ms", "300", "--concurrency", "1") as running:
        output = small_model_output_name(running)

        def ask(i):
            if i % 2:  # a client per thread: Triton's is gevent's, one per thread
                client = triton.InferenceServerClient(running.url.removeprefix("http://"))
                answers[i] = client.infer("model", [infer_input(inputs[i], True)]).as_numpy(output)
            else:
                status, _, body = call(running.url, "/predict", npy(inputs[i]), {"Content-Type": "application/x-npy"})
                assert status == 200
                answers[i] = np.load(io.BytesIO(body))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(inputs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        after = metrics(running)
    for x, y in zip(inputs, answers, strict=True):
        np.testing.assert_array_equal(y, alone(x))
        np.testing.assert_allclose(y, expected(model, x), rtol=1e-4, atol=1e-5)
    total = sum(x.shape[0] for x in inputs)
    assert after[("tvmconv_batch_size_sum", ())] == total
    assert total / 4 <= after[("tvmconv_batch_size_count", ())] < len(inputs)
    assert after[("tvmconv_batch_size_bucket", (("le", "1.0"),))] < after[("tvmconv_batch_size_count", ())]


# ---------------------------------------------------------------- operations


def test_sigterm_drains_requests_in_flight_and_exits_0(small_bundle, tmp_path):
    """Requests held in the batcher (2 s delay) are in flight when SIGTERM comes: the server turns not ready,
    refuses new inference, answers them, then exits 0."""
    model, path = small_bundle
    x = np.random.default_rng(2).standard_normal((1, 10, 10, 3)).astype(np.float32)
    answers = []
    with served(path, tmp_path, "--max-batch", "4", "--max-delay-ms", "2000") as running:
        threads = [threading.Thread(target=lambda: answers.append(
            call(running.url, "/predict", npy(x), {"Content-Type": "application/x-npy"}))) for _ in range(2)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while metrics(running)[("tvmconv_queue_depth", ())] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        running.process.send_signal(signal.SIGTERM)
        while (ready := call(running.url, "/v2/health/ready"))[0] == 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert ready[0] == 503 and json.loads(ready[2]) == {"ready": False}
        assert call(running.url, "/v2/models/model/ready")[0] == 503
        assert call(running.url, "/v2/health/live")[0] == 200
        status, _, body = call(running.url, "/predict", npy(x), {"Content-Type": "application/x-npy"})
        assert status == 503 and json.loads(body) == {"error": "the server is shutting down"}
        for thread in threads:
            thread.join(60)
        assert running.process.wait(60) == 0
        log = running.logged()
    assert [status for status, _, _ in answers] == [200, 200]
    for _, _, body in answers:
        np.testing.assert_allclose(np.load(io.BytesIO(body)), expected(model, x), rtol=1e-4, atol=1e-5)
    assert re.search(r"draining: not ready, refusing new inference requests; [23] requests in flight", log), log
    assert "drained after" in log and "0 requests still in flight" in log
    with pytest.raises(OSError):
        urllib.request.urlopen(running.url + "/v2/health/live", timeout=5)


def test_loadtest_script_reports_latency_and_throughput(server):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "loadtest.py"), "--url", server.url,
                             "--requests", "24", "--concurrency", "4", "--batch", "2"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["requests_ok"] == 24 and report["errors"] == 0
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
