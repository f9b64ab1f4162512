"""RPC devices for tests: the emulated aarch64 board (scripts/arm_board.sh) and a miniature device farm
(a tracker and a host-CPU server registered under a key), both on 127.0.0.1 only."""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import tvm

BOARD = os.environ.get("TVMCONV_BOARD", "127.0.0.1:9095")


def board_address() -> str:
    """The board's address; skips the test when no board listens there, or when kernels for it cannot be built
    here (a board another checkout started, on a machine without the cross compiler)."""
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("no aarch64 cross compiler to build for the board: apt-get install g++-aarch64-linux-gnu")
    host, port = BOARD.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError:
        pytest.skip(f"no aarch64 board at {BOARD}: start one with scripts/arm_board.sh start")
    return BOARD


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, process, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{process.args} exited with status {process.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@contextlib.contextmanager
def tracker_with_server(workdir, key: str):
    """Yields {"tracker": "127.0.0.1:PORT", "key": key} once a host-CPU server has registered under `key`."""
    tracker_port, server_port = free_port(), free_port()
    # Own process groups: the server forks workers that outlive a plain terminate().
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                "--port", str(tracker_port), "--port-end", str(tracker_port + 1)],
                               start_new_session=True, cwd=workdir)
    server = None
    try:
        _wait_for_port(tracker_port, tracker)
        server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--tracker",
                                   f"127.0.0.1:{tracker_port}", "--key", key, "--host", "127.0.0.1",
                                   "--port", str(server_port), "--port-end", str(server_port + 1)],
                                  start_new_session=True, cwd=workdir)
        deadline = time.monotonic() + 60
        while tvm.rpc.connect_tracker("127.0.0.1", tracker_port).text_summary().count(key) < 2:
            assert time.monotonic() < deadline, "the server never registered with the tracker"
            time.sleep(0.5)
        yield {"tracker": f"127.0.0.1:{tracker_port}", "key": key}
    finally:
        for proc in (server, tracker):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
