"""An HTTP inference service for an exported bundle: FastAPI on uvicorn, the runtime alone (no compiler).

  GET  /health    {"status": "ok"}
  GET  /metadata  the bundle's input and output shapes, dtype, data format, target, layers
  POST /predict   npy bytes in (Content-Type application/octet-stream or application/x-npy), npy bytes
                  out (npz for several outputs); or JSON as TF Serving takes it: {"inputs": batch}
                  → {"outputs": ...}, {"instances": [sample, ...]} → {"predictions": [...]}.
Bad bodies, shapes and dtypes get a 4xx answer with a message; bodies over the size limit a 413.
All requests share one loaded module; at most `concurrency` run at once, the rest wait their turn;
each runs its kernels on `threads` threads.
"""
import io
import json

import anyio
import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from . import __version__, runtime

NPY_TYPES = ("application/octet-stream", "application/x-npy")


async def _body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 when it is over `limit` bytes. An oversized body is still read (and
    dropped), up to 16 times the limit: a server that answers before the client has sent everything
    resets the connection, and the client then sees a broken pipe instead of the 413."""
    declared = request.headers.get("content-length")
    too_large = declared is not None and declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            too_large, chunks = True, []
        if too_large:
            if size > 16 * limit:
                break
            continue
        chunks.append(chunk)
    if too_large:
        raise HTTPException(413, f"request body of {declared or f'over {size}'} bytes is over the limit of "
                                 f"{limit} bytes")
    return b"".join(chunks)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def create_app(bundle: str, max_request_bytes: int = 64 << 20, concurrency: int = 4,
               threads: int | None = None) -> FastAPI:
    predictor = runtime.load(bundle, threads)
    manifest = predictor.manifest
    limiter = anyio.CapacityLimiter(concurrency)
    output_names = [manifest["layers"][i]["name"] for i in manifest["outputs"]]
    app = FastAPI(title="tvmconv", version=__version__)

    async def predict_array(x: np.ndarray):
        try:
            return await anyio.to_thread.run_sync(predictor, x, limiter=limiter)
        except (TypeError, ValueError) as err:  # the predictor's shape and dtype checks
            raise HTTPException(400, str(err)) from None

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/metadata")
    def metadata():
        return {"tvmconv": manifest["tvmconv"], "target_key": manifest["target_key"],
                "input": {"shape": [None, *predictor.input_shape[1:]], "dtype": manifest["dtype"],
                          "data_format": manifest["data_format"], "compiled_batch": predictor.input_shape[0]},
                "outputs": [{"name": name, "shape": [None, *shape[1:]]}
                            for name, shape in zip(output_names, predictor.output_shapes, strict=True)],
                "layers": [layer["name"] for layer in manifest["layers"]]}

    @app.post("/predict")
    async def predict(request: Request):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await _body(request, max_request_bytes)
        if kind in NPY_TYPES:
            try:
                x = np.load(io.BytesIO(body), allow_pickle=False)
            except (ValueError, OSError, EOFError) as err:
                raise HTTPException(400, f"the body is not a .npy array: {err}") from None
            result = await predict_array(x)
            if isinstance(result, list):
                buffer = io.BytesIO()
                np.savez(buffer, **dict(zip(output_names, result, strict=True)))
                return Response(buffer.getvalue(), media_type="application/x-npz")
            return Response(_npy(result), media_type="application/x-npy")
        if kind == "application/json":
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise HTTPException(400, f"the body is not JSON: {err}") from None
            if not isinstance(payload, dict) or len({"inputs", "instances"} & set(payload)) != 1:
                raise HTTPException(400, 'expected {"inputs": batch} or {"instances": [sample, ...]}')
            key = "inputs" if "inputs" in payload else "instances"
            try:
                x = np.asarray(payload[key], dtype=predictor.dtype)
            except (TypeError, ValueError) as err:
                raise HTTPException(400, f'"{key}" is not a numeric array: {err}') from None
            result = await predict_array(x)
            outputs = result if isinstance(result, list) else [result]
            if key == "inputs":
                value = outputs[0].tolist() if len(outputs) == 1 else {
                    name: y.tolist() for name, y in zip(output_names, outputs, strict=True)}
                return JSONResponse({"outputs": value})
            if len(outputs) == 1:
                return JSONResponse({"predictions": outputs[0].tolist()})
            return JSONResponse({"predictions": [{name: y[i].tolist() for name, y in zip(output_names, outputs,
                                                                                          strict=True)}
                                                 for i in range(len(x))]})
        raise HTTPException(415, f"unsupported Content-Type {kind or '(none)'!r}: send application/x-npy, "
                                 "application/octet-stream (npy bytes) or application/json")

    return app


def run(bundle: str, host: str = "127.0.0.1", port: int = 8000, max_request_bytes: int = 64 << 20,
        concurrency: int = 4, threads: int | None = None) -> None:
    import uvicorn
    uvicorn.run(create_app(bundle, max_request_bytes, concurrency, threads), host=host, port=port, log_level="info")
