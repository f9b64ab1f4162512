"""An inference service for an exported bundle: FastAPI on uvicorn, the runtime alone (no compiler).

  GET  /health, /metadata; POST /predict      this service's own: npy bytes, or JSON as TF Serving takes it
  GET  /v2, /v2/health/live, /v2/health/ready the Open Inference Protocol (KServe v2), REST
  GET  /v2/models/{name}, /v2/models/{name}/ready
  POST /v2/models/{name}/infer                JSON tensors, or Triton's binary-data extension
  GET  /metrics                               Prometheus: requests by endpoint and code, latency, batch
                                              sizes, queue depth, bytes in, buffered bytes
  GET  /docs, /openapi.json                   only with Options(docs=True)

Every client mistake gets a 4xx and {"error": "..."}; the server never trusts a body. A declared body
over the limit gets its 413 before any of it is read; headers and bodies have deadlines; all requests'
bodies together stay under one bound (a request waits for room, then gets a 503); JSON is parsed and
printed in worker processes, so that a large body never holds the event loop. With a token file, every
endpoint but the health probes wants `Authorization: Bearer TOKEN`.

At most `concurrency` model calls run at once, each on `threads` kernel threads; with `max_batch`,
concurrent requests are merged into calls of the bundle's batch (batching.py). On SIGTERM the server
turns not ready, refuses new inference requests, finishes those in flight, and exits 0.
"""
import contextlib
import copy
import dataclasses
import functools
import hmac
import logging
import math
import os
import re
import time

import anyio
import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import __version__, batching, protocol, runtime

log = logging.getLogger("tvmconv.serving")

NPY_TYPES = ("application/octet-stream", "application/x-npy")
PROBES = ("/health", "/v2/health/live", "/v2/health/ready")  # open without a token: liveness and readiness probes
INFERENCE = ("/predict", "/v2/models/{name}/infer")  # the endpoints that read a body and run the model
CLOSE = {"connection": "close"}
DROPPED_BODY_FACTOR = 16  # a refused request's body up to this many times the limit is read and dropped (_Gate)
# JSON bodies and answers over this size are parsed and printed in a worker process (about 20000 numbers):
# json and tolist hold the interpreter lock throughout, 50 ms per MB here, and the event loop would wait.
JSON_IN_WORKER_BYTES = 256 << 10
JSON_BYTES_PER_NUMBER = 12
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
FLAGS = {"max_request_bytes": "max-request-mb", "max_buffered_bytes": "max-buffered-mb"}  # the CLI takes MiB


@dataclasses.dataclass(frozen=True)
class Options:
    """How the service runs; `tvmconv serve`'s flags (--model-name, --max-batch, ...)."""

    model_name: str | None = None         # default: the bundle folder's name
    trusted_keys: tuple = ()              # public keys (PEM paths or bytes): refuse a bundle none of them signed
    threads: int | None = None            # kernel threads per model call (default: TVM_NUM_THREADS, else every CPU)
    # Model calls at once; None: 4, or 1 with max_batch. Concurrent batches are short ones, each running the
    # whole compiled batch on cores the others need too (Zen 3, a ResNet block at client concurrency 8:
    # 27.9 requests/s with 4 calls at once, 57.1 with 1; docs/benchmarks.md).
    concurrency: int | None = None
    max_batch: int | None = None          # dynamic batching, at the bundle's compiled batch
    max_delay_ms: float = 5.0             # how long a request waits for others to batch with
    max_request_bytes: int = 64 << 20
    max_buffered_bytes: int = 256 << 20   # every request's body together
    header_timeout: float = 10.0          # seconds for a request's headers, from connecting or the last answer
    body_timeout: float = 60.0            # seconds for a body to arrive, and for room in the buffer bound
    drain_timeout: float = 30.0           # seconds SIGTERM waits for requests in flight
    token_file: str | None = None
    docs: bool = False

    def __post_init__(self):
        def flag(name):
            return f"{name} (--{FLAGS.get(name, name.replace('_', '-'))})"

        for name in ("concurrency", "max_request_bytes", "max_buffered_bytes", "threads", "max_batch"):
            value = getattr(self, name)
            if not (value is None and name in ("concurrency", "threads", "max_batch")) and (
                    type(value) is not int or value < 1):
                raise ValueError(f"{flag(name)} must be a positive int, got {value!r}")
        if self.concurrency is None:
            object.__setattr__(self, "concurrency", 4 if self.max_batch is None else 1)
        for name, unit in (("max_delay_ms", "milliseconds"), ("header_timeout", "seconds"),
                           ("body_timeout", "seconds"), ("drain_timeout", "seconds")):
            value, least = getattr(self, name), "non-negative" if name == "max_delay_ms" else "positive"
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or value < 0 or (value == 0 and least == "positive"):
                raise ValueError(f"{flag(name)} must be a {least} number of {unit}, got {value!r}")
        if self.max_buffered_bytes < self.max_request_bytes:
            raise ValueError(f"{flag('max_buffered_bytes')} ({self.max_buffered_bytes} bytes) is below "
                             f"{flag('max_request_bytes')} ({self.max_request_bytes}): a request that size could "
                             "never run")
        name = self.model_name
        if name is not None and not (isinstance(name, str) and MODEL_NAME.fullmatch(name)):
            raise ValueError(f"{flag('model_name')} must be 1 to 128 letters, digits, '_', '.' or '-' (starting with a "
                             f"letter or digit), got {self.model_name!r}")
        if self.token_file is not None and not isinstance(self.token_file, str):
            raise TypeError(f"{flag('token_file')} must be a path, got {type(self.token_file).__name__}")
        if not isinstance(self.docs, bool):
            raise TypeError(f"docs (--docs) must be True or False, got {self.docs!r}")


def read_token(path: str) -> bytes:
    """The bearer token in the file at `path` (surrounding white space dropped)."""
    try:
        with open(path, "rb") as f:
            token = f.read(4097).strip()  # at most a page: the path could name /dev/zero
    except OSError as err:
        raise ValueError(f"--token-file {path}: {err.strerror}") from None
    if not 16 <= len(token) <= 4096 or not all(0x21 <= c <= 0x7E for c in token):
        raise ValueError(f"--token-file {path} must hold one token of 16 to 4096 printable ASCII characters "
                         "without spaces (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return token


class _Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("tvmconv_requests", "HTTP requests answered, by endpoint and status code (errors: "
                                "codes 4xx and 5xx)", ["endpoint", "code"], registry=self.registry)
        self.latency = Histogram("tvmconv_request_duration_seconds", "Time from a request's headers to its answer",
                                 ["endpoint"], registry=self.registry)
        self.bytes_in = Counter("tvmconv_request_body_bytes", "Request body bytes received", ["endpoint"],
                                registry=self.registry)
        self.batch_sizes = Histogram("tvmconv_batch_size", "Samples per model call (several requests' when batching)",
                                     buckets=[2 ** i for i in range(11)], registry=self.registry)
        self.queue_depth = Gauge("tvmconv_queue_depth", "Requests waiting for a model call", registry=self.registry)
        self.in_flight = Gauge("tvmconv_requests_in_flight", "Requests being answered", registry=self.registry)
        self.buffered = Gauge("tvmconv_buffered_request_bytes", "Request body bytes held now (bounded by "
                              "--max-buffered-mb)", registry=self.registry)


class _ByteBudget:
    """The bound on request bytes held at once. Requests reserve their declared size in arrival order
    and hold it until answered; the first in line waits for room, the others behind it."""

    def __init__(self, total: int, gauge):
        self.free = total
        self._gauge = gauge
        self._turn = anyio.Lock()
        self._released = anyio.Event()

    async def reserve(self, size: int) -> None:
        async with self._turn:
            while self.free < size:
                self._released = anyio.Event()
                await self._released.wait()
            self.free -= size
            self._gauge.inc(size)

    def release(self, size: int) -> None:
        self.free += size
        self._gauge.dec(size)
        self._released.set()


class _Service:
    """The loaded bundle and the state every request shares."""

    def __init__(self, bundle: str, options: Options):
        self.options = options
        self.bundle = bundle
        self.predictor = runtime.load(bundle, options.threads, trusted_keys=options.trusted_keys or None)
        compiled = self.predictor.input_shape[0]
        if options.max_batch is not None and options.max_batch != compiled:
            raise ValueError(f"--max-batch {options.max_batch} needs a bundle exported at batch {options.max_batch}, "
                             f"and {bundle} is compiled for batch {compiled}: export it with `tvmconv export MODEL -o "
                             f"DIR --batch {options.max_batch}`, or serve it with --max-batch {compiled}")
        name = options.model_name or os.path.basename(os.path.normpath(bundle))
        if not MODEL_NAME.fullmatch(name):
            raise ValueError(f"the bundle folder's name {name!r} is not a model name (letters, digits, '_', '.', '-'): "
                             "give one with --model-name")
        self.model = protocol.interface(self.predictor, name)
        self.token = read_token(options.token_file) if options.token_file else None
        self.metrics = _Metrics()
        self.in_flight = 0
        self.draining_since: float | None = None
        # Made in the event loop (lifespan): anyio's primitives belong to one.
        self.budget: _ByteBudget | None = None
        self.calls: batching.ModelCalls | None = None
        self.json_workers: anyio.CapacityLimiter | None = None

    @property
    def ready(self) -> bool:
        return self.draining_since is None

    def drain(self) -> None:
        self.draining_since = time.monotonic()
        log.info("draining: not ready, refusing new inference requests; %d requests in flight", self.in_flight)

    def check_model(self, name: str) -> None:
        if name != self.model.name:
            raise HTTPException(404, f"unknown model {name!r}: this server serves {self.model.name!r}")

    async def read_body(self, request: Request) -> bytearray:
        """The body, whose declared size the gate has checked and reserved; a body without a declared size
        (chunked) is cut off at the limit."""
        declared = request.headers.get("content-length")
        body = bytearray(int(declared)) if declared is not None else bytearray()
        size = 0
        try:
            with anyio.fail_after(self.options.body_timeout):
                async for chunk in request.stream():
                    if declared is None and size + len(chunk) > self.options.max_request_bytes:
                        raise HTTPException(413, f"request body over the limit of {self.options.max_request_bytes} "
                                                 "bytes", headers=CLOSE)
                    body[size:size + len(chunk)] = chunk
                    size += len(chunk)
        except TimeoutError:
            raise HTTPException(408, f"the request body did not arrive within {self.options.body_timeout} s",
                                headers=CLOSE) from None
        except ClientDisconnect:
            raise HTTPException(400, "the client disconnected before sending its whole body") from None
        return body

    async def run_model(self, x: np.ndarray) -> list[np.ndarray]:
        try:
            return await self.calls(x)
        except (TypeError, ValueError) as err:  # the predictor's own checks
            raise HTTPException(400, str(err)) from None

    async def codec(self, function, *args, json_bytes: int = 0):
        """A protocol function in a thread, or with `json_bytes` of JSON or more, in a worker process;
        its ValueError as a 400."""
        try:
            if json_bytes > JSON_IN_WORKER_BYTES:
                return await anyio.to_process.run_sync(function, *args, limiter=self.json_workers)
            return await anyio.to_thread.run_sync(function, *args)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        except (MemoryError, anyio.BrokenWorkerProcess):  # the worker may be killed for its memory
            raise HTTPException(503, "the server ran out of memory for this JSON: retry, or send npy or binary "
                                     "tensors", headers={"retry-after": "1"}) from None

    def log_startup(self) -> None:
        manifest, model, options = self.predictor.manifest, self.model, self.options
        log.info("serving %s as model %r: target key %s, input (N, %s) %s, outputs %s", os.path.abspath(self.bundle),
                 model.name, manifest["target_key"], ", ".join(map(str, model.input.shape)), model.input.dtype,
                 [output.name for output in model.outputs])
        signature = self.predictor.signature
        log.info("signature: %s", f"verified, signed by key {signature}" if signature else
                 "not verified (unsigned, or no --trusted-key given)")
        log.info("model calls: %d at once on %d kernel threads each; %s", options.concurrency, self.predictor.threads,
                 f"batching up to {options.max_batch} samples, waiting at most {options.max_delay_ms} ms"
                 if options.max_batch else "no batching")
        log.info("limits: %d bytes per request, %d buffered in all; headers within %s s, bodies within %s s; "
                 "bearer token %s; /docs %s", options.max_request_bytes, options.max_buffered_bytes,
                 options.header_timeout, options.body_timeout, "required" if self.token else "off",
                 "on" if options.docs else "off")


class _Gate:
    """The ASGI layer every request passes first: metrics, then the bearer token, draining, the declared
    size and the buffer bound, all before the body is kept anywhere."""

    def __init__(self, app, service: _Service, routes: list):
        self.app = app
        self.service = service
        self.routes = routes  # the app's, filled in as its endpoints are declared

    def endpoint(self, scope) -> str:
        """The route a request is for, as metrics label it (its template, never the raw path)."""
        for route in self.routes:
            if route.matches(scope)[0] != Match.NONE:
                return route.path
        return "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan
            return await self.app(scope, receive, send)
        service, metrics = self.service, self.service.metrics
        endpoint = self.endpoint(scope)
        started, status = time.perf_counter(), 500

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                metrics.bytes_in.labels(endpoint).inc(len(message.get("body", b"")))
            return message

        service.in_flight += 1
        metrics.in_flight.inc()
        try:
            await self._admit(scope, endpoint, counted_receive, counted_send)
        finally:
            service.in_flight -= 1
            metrics.in_flight.dec()
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    async def _admit(self, scope, endpoint, receive, send):
        service, options = self.service, self.service.options
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        size = int(declared) if declared is not None else 0  # h11 let only digits through

        async def refuse(code: int, message: str, extra=None):
            extra = dict(extra or {})
            # Clients that send their whole body before reading the answer (urllib, requests) see a broken
            # pipe instead when the answer comes first and the connection closes: a body of up to
            # DROPPED_BODY_FACTOR times the limit is read and dropped first, unless the client waits for
            # "100 Continue" (then it has sent nothing). A body declared beyond that is cut off at once.
            waits = headers.get(b"expect", b"").lower() == b"100-continue"
            if size > DROPPED_BODY_FACTOR * options.max_request_bytes or waits:
                extra.update(CLOSE)
            elif size or headers.get(b"transfer-encoding"):
                with anyio.move_on_after(options.body_timeout) as dropping:
                    while (await receive()).get("more_body"):
                        pass
                if dropping.cancelled_caught:
                    extra.update(CLOSE)
            await JSONResponse({"error": message}, code, headers=extra)(scope, receive, send)

        if service.token is not None and endpoint not in PROBES:
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), service.token):
                return await refuse(401, "this server wants an Authorization: Bearer token",
                                    {"www-authenticate": "Bearer"})
        inference = endpoint in INFERENCE and scope["method"] == "POST"
        if inference and not service.ready:
            return await refuse(503, "the server is shutting down", {**CLOSE, "retry-after": "1"})
        if size > options.max_request_bytes:
            return await refuse(413, f"request body of {size} bytes is over the limit of {options.max_request_bytes} "
                                     "bytes")
        if not inference:
            return await self.app(scope, receive, send)
        reserved = size if declared is not None else options.max_request_bytes
        try:
            with anyio.fail_after(options.body_timeout):
                await service.budget.reserve(reserved)
        except TimeoutError:
            return await refuse(503, f"the server holds {options.max_buffered_bytes - service.budget.free} bytes of "
                                     f"request bodies, near its bound of {options.max_buffered_bytes}: retry later",
                                {**CLOSE, "retry-after": "1"})
        try:
            await self.app(scope, receive, send)
        finally:
            service.budget.release(reserved)


class _TimedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's headers, from connecting or from the last
    answer. uvicorn's keep-alive timeout ends idle connections, but is cancelled by any byte that arrives:
    a client that sends headers slowly, or half of them, or a body that was refused and is being dropped,
    held the connection open indefinitely."""

    def __init__(self, *args, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._header_deadline = None

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self):
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc):
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        super().connection_lost(exc)

    def _arm(self):
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        self._header_deadline = self.loop.call_later(self._header_timeout, self._expire)

    def _expire(self):
        self._header_deadline = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()  # no request is being answered: the headers did not come in time


class _Server(uvicorn.Server):
    """uvicorn's server with a drain: the first SIGTERM or SIGINT makes the service not ready and refuse new
    inference requests; the server stops once none is in flight (or after the drain timeout), and the
    process exits 0. A second signal stops at once."""

    def __init__(self, config, service: _Service):
        super().__init__(config)
        self._service = service

    def handle_exit(self, sig, frame):
        # uvicorn records the signal and raises it again after shutting down, so that the process would
        # end by it (status 143 for SIGTERM): a drained server exits 0 instead.
        if self._service.ready:
            self._service.drain()
        else:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        service = self._service
        if not service.ready and not self.should_exit:
            waited = time.monotonic() - service.draining_since
            if service.in_flight == 0 or waited > service.options.drain_timeout:
                log.info("drained after %.1f s; %d requests still in flight", waited, service.in_flight)
                self.should_exit = True
        return await super().on_tick(counter)


def create_app(bundle: str, options: Options = Options()) -> FastAPI:
    """The service for the bundle at `bundle` (loaded now: a bad bundle or option raises here)."""
    service = _Service(bundle, options)
    model = service.model

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        metrics = service.metrics
        service.budget = _ByteBudget(options.max_buffered_bytes, metrics.buffered)
        service.calls = batching.ModelCalls(service.predictor, options.concurrency, options.max_batch,
                                            options.max_delay_ms / 1e3, metrics.batch_sizes, metrics.queue_depth)
        service.json_workers = anyio.CapacityLimiter(len(os.sched_getaffinity(0)))  # a process per CPU at most
        service.log_startup()
        async with anyio.create_task_group() as group:
            if options.max_batch:
                group.start_soon(service.calls.batch_forever)
            yield
            group.cancel_scope.cancel()

    docs = {} if options.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="tvmconv", version=__version__, lifespan=lifespan, **docs)
    app.state.service = service
    app.add_middleware(_Gate, service=service, routes=app.router.routes)

    @app.exception_handler(StarletteHTTPException)
    async def error(request, err):
        return JSONResponse({"error": err.detail}, err.status_code, headers=err.headers)

    def tensor(t: protocol.Tensor) -> dict:
        return {"name": t.name, "datatype": protocol.DATATYPES[t.dtype], "shape": [-1, *t.shape]}

    @app.get("/health")
    def health():
        return {"status": "ok"} if service.ready else JSONResponse({"status": "draining"}, 503)

    @app.get("/metadata")
    def metadata():
        manifest = service.predictor.manifest
        return {"tvmconv": manifest["tvmconv"], "target_key": manifest["target_key"],
                "input": {"shape": [None, *model.input.shape], "dtype": model.input.dtype,
                          "data_format": manifest["data_format"], "compiled_batch": model.compiled_batch},
                "outputs": [{"name": t.name, "shape": [None, *t.shape]} for t in model.outputs],
                "layers": [layer["name"] for layer in manifest["layers"]]}

    @app.post("/predict")
    async def predict(request: Request):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in (*NPY_TYPES, "application/json"):
            raise HTTPException(415, f"unsupported Content-Type {kind or '(none)'!r}: send application/x-npy, "
                                     "application/octet-stream (npy bytes) or application/json")
        body = await service.read_body(request)
        if kind in NPY_TYPES:
            outputs = await service.run_model(await service.codec(protocol.read_npy, body, model))
            content, media_type = await service.codec(protocol.write_npy, outputs, model)
            return Response(content, media_type=media_type)
        key, x = await service.codec(protocol.read_tf_json, body, model, json_bytes=len(body))
        outputs = await service.run_model(x)
        content = await service.codec(protocol.write_tf_json, key, outputs, model,
                                      json_bytes=JSON_BYTES_PER_NUMBER * sum(y.size for y in outputs))
        return Response(content, media_type="application/json")

    @app.get("/v2")
    def server_metadata():
        return {"name": "tvmconv", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    def ready():
        return JSONResponse({"ready": service.ready}, 200 if service.ready else 503)

    @app.get("/v2/models/{name}")
    def model_metadata(name: str):
        service.check_model(name)
        return {"name": model.name, "platform": "tvmconv_bundle", "inputs": [tensor(model.input)],
                "outputs": [tensor(t) for t in model.outputs]}

    @app.get("/v2/models/{name}/ready")
    def model_ready(name: str):
        service.check_model(name)
        return JSONResponse({"name": model.name, "ready": service.ready}, 200 if service.ready else 503)

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request):
        service.check_model(name)
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise HTTPException(415, f"Content-Encoding {encoding!r} is not accepted: send the body uncompressed")
        body = await service.read_body(request)
        declared = request.headers.get("inference-header-content-length")
        if declared is not None and not (declared.isdigit() and int(declared) <= len(body)):
            raise HTTPException(400, f"Inference-Header-Content-Length {declared!r} is not a length within the "
                                     f"body's {len(body)} bytes")
        header_size = int(declared) if declared is not None else len(body)
        inference = await service.codec(protocol.read_infer, bytes(memoryview(body)[:header_size]),
                                        len(body) - header_size, model, json_bytes=header_size)
        x = inference.data
        if x is None:  # binary data after the JSON header, in place
            x = np.frombuffer(body, model.input.dtype, offset=header_size).reshape(inference.shape)
            if not x.flags.aligned:
                x = x.copy()
        outputs = await service.run_model(x)
        printed = sum(outputs[i].size for i, binary in inference.outputs if not binary)
        content, json_size = await service.codec(protocol.write_infer, inference, outputs, model,
                                                 json_bytes=JSON_BYTES_PER_NUMBER * printed)
        if json_size is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream",
                        headers={"inference-header-content-length": str(json_size)})

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def run(bundle: str, options: Options = Options(), host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the bundle until SIGTERM or SIGINT (then drain)."""
    app = create_app(bundle, options)
    logging_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    logging_config["loggers"]["tvmconv"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    config = uvicorn.Config(app, host=host, port=port, lifespan="on", ws="none", log_config=logging_config,
                            http=functools.partial(_TimedH11, header_timeout=options.header_timeout),
                            timeout_keep_alive=5, timeout_graceful_shutdown=1)
    _Server(config, app.state.service).run()
