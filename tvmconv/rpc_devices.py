"""Remote devices over TVM RPC: one session per address and process, libraries uploaded once.

A board (a Raspberry Pi, a Jetson, the emulated one of scripts/arm_board.sh) runs TVM's RPC server,
directly or registered with an RPC tracker; layers with `remote=` and the tuner's re-timing run
kernels there through these sessions.
"""
import os
import threading

import numpy as np
import tvm.runtime
from tvm import rpc


def _address(value: str) -> bool:
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def standardize(value, argument: str = "remote"):
    """A `remote` (or tuning's `rpc`) argument checked at the edge: None, "HOST:PORT" (an RPC server),
    {"tracker": "HOST:PORT", "key": KEY} (a device from a tracker's pool) or an RPC session."""
    if value is None or (isinstance(value, str) and _address(value)):
        return value
    if isinstance(value, dict) and set(value) == {"tracker", "key"} and isinstance(value["tracker"], str) \
            and _address(value["tracker"]) and isinstance(value["key"], str) and value["key"]:
        return dict(value)
    if isinstance(value, rpc.RPCSession):
        return value
    raise ValueError(f"The `{argument}` argument must be None, 'HOST:PORT' of a TVM RPC server, "
                     "{'tracker': 'HOST:PORT', 'key': KEY} for a device from an RPC tracker, or a "
                     f"tvm.rpc session. Received: {argument}={value!r}")


_sessions: dict[str, rpc.RPCSession] = {}
_remote_kernels: dict[tuple, "RemoteKernel"] = {}
_lock = threading.Lock()


def connect(remote):
    """An RPC session from "HOST:PORT" (a server), {"tracker": "HOST:PORT", "key": KEY} (a device
    from a tracker's pool) or a session itself. One session per address and process: TVM's RPC
    server serves one session at a time, so a second one would wait for the first to close."""
    if isinstance(remote, rpc.RPCSession):
        return remote
    address = remote if isinstance(remote, str) else f"{remote['tracker']}/{remote['key']}"
    with _lock:
        if address not in _sessions:
            try:
                if isinstance(remote, dict):
                    host, port = remote["tracker"].rsplit(":", 1)
                    _sessions[address] = rpc.connect_tracker(host, int(port)).request(remote["key"])
                else:
                    host, port = remote.rsplit(":", 1)
                    _sessions[address] = rpc.connect(host, int(port))
            except Exception as err:  # TVM reports a refused connection as its own InternalError
                raise ConnectionError(f"Cannot reach the `remote` device {remote!r} ({err}). Is its RPC server "
                                      "running? (An emulated aarch64 board: scripts/arm_board.sh start)") from None
        return _sessions[address]


def disconnect(remote) -> None:
    """Close this process's session with `remote` (as `connect` takes it), so that another process (a
    tuner's measuring workers) can have the device; layers using it reconnect on their next call."""
    address = remote if isinstance(remote, str) else f"{remote['tracker']}/{remote['key']}"
    with _lock:
        session = _sessions.pop(address, None)
        for key in [k for k in _remote_kernels if k[0] == id(session)]:
            del _remote_kernels[key]


def remote_kernel(session, library: str) -> "RemoteKernel":
    """The library loaded on the session's device, once: uploading a library again over one that is
    loaded crashes the server."""
    with _lock:
        key = (id(session), library)
        if key not in _remote_kernels:
            _remote_kernels[key] = RemoteKernel(session, library)
        return _remote_kernels[key]


class RemoteKernel:
    """A compiled library run on an RPC server's CPU (a board): uploaded once, weights uploaded once
    per change, the input and output copied per call."""

    def __init__(self, session, library: str, entry: str = "main"):
        self.device = ("rpc", id(session))  # weights uploaded over one session are not seen by another
        session.upload(library)
        self.module, self.entry = session.load_module(os.path.basename(library)), entry
        self.function = self.module[entry]
        self.remote_device = session.cpu()

    def weights(self, arrays) -> list:
        return [tvm.runtime.tensor(np.ascontiguousarray(a), device=self.remote_device) for a in arrays]

    def output_for(self, array: np.ndarray) -> np.ndarray:
        return array  # the result is copied into it

    def __call__(self, x: np.ndarray, weights: list, out: np.ndarray, threads: int | None = None) -> None:
        """(The board's own thread pool runs it: `threads` is for this host's kernels.)"""
        result = tvm.runtime.empty(out.shape, str(out.dtype), self.remote_device)
        self.function(tvm.runtime.tensor(np.ascontiguousarray(x), device=self.remote_device), *weights, result)
        out[...] = result.numpy()
