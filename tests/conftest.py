"""Shared fixtures for tests that run real edgesplit processes on loopback.

* ``reaper`` (session): every process started through these helpers is killed at the end of the
  session, even when a test fails or times out.
* ``start_worker(*flags) -> (proc, port)``: ``edgesplit worker`` on ``127.0.0.1:0``; returns once
  the port file exists and the standard gRPC health service answers SERVING.
* ``run_agent(*flags, timeout=...) -> CompletedProcess``; ``spawn_agent(*flags) -> Popen``.
* ``worker`` (session): one shared worker serving the bundled models (``--torch-threads 1``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
TINY_NET = "tests/data/tiny_net.py:build"  # relative to REPO, the cwd of every process

# The planner fixtures (aio, planner) live with the planner helpers, the store on both engines (store,
# store_where) in store_fixtures; registered here so test modules use them without importing names
# that pytest then injects.
pytest_plugins = ["planner_helpers", "store_fixtures"]

START_TIMEOUT = 60.0  # seconds for a daemon to bind and report SERVING


def child_env() -> dict[str, str]:
    """The test's environment minus any EDGESPLIT_* settings (they would change daemon config)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESPLIT_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "runtime.cli.main", *args]


class Reaper:
    """Starts processes and guarantees they are gone at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def spawn(self, argv: list[str], log: Path | None = None, **kw) -> subprocess.Popen:
        kw.setdefault("cwd", REPO)
        kw.setdefault("env", child_env())
        kw.setdefault("stdin", subprocess.DEVNULL)
        if log is not None:
            fh = open(log, "wb")  # noqa: SIM115 (handed to the child, closed below)
            kw.setdefault("stdout", fh)
            kw.setdefault("stderr", subprocess.STDOUT)
        proc = subprocess.Popen(argv, **kw)
        if log is not None:
            fh.close()  # the child holds its own descriptor
        proc.log_path = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture(scope="session")
def reaper():
    r = Reaper()
    try:
        yield r
    finally:
        r.kill_all()


def log_text(proc: subprocess.Popen) -> str:
    path = getattr(proc, "log_path", None)
    if path is None or not Path(path).exists():
        return ""
    return Path(path).read_text(errors="replace")[-4000:]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, proc: subprocess.Popen | None = None,
             interval: float = 0.05):
    """Poll ``predicate`` until truthy (returned) or ``timeout``; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode} while waiting for {what}\n{log_text(proc)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}" + (f"\n{log_text(proc)}" if proc else ""))
        time.sleep(interval)


def health_status(address: str, service: str = "", timeout: float = 1.0) -> str:
    """The gRPC health status name of ``address`` ("SERVING", ...), or the RPC error code name."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def wait_serving(address: str, proc: subprocess.Popen | None = None, timeout: float = START_TIMEOUT) -> None:
    wait_for(lambda: health_status(address) == "SERVING", timeout, f"{address} SERVING", proc, interval=0.1)


def free_port() -> int:
    """A loopback port nobody listens on (bound, read, closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def start_worker(reaper, tmp_path_factory):
    """``start_worker(*flags) -> (proc, port)``: a worker process that is SERVING."""
    counter = iter(range(10**6))

    def start(*flags: str) -> tuple[subprocess.Popen, int]:
        d = tmp_path_factory.mktemp(f"worker{next(counter)}")
        port_file = d / "port"
        argv = cli("worker", "--listen", "127.0.0.1:0", "--port-file", str(port_file), *flags)
        proc = reaper.spawn(argv, log=d / "worker.log")

        def port() -> int | None:
            try:
                text = port_file.read_text()
            except FileNotFoundError:
                return None
            # the worker writes "PORT\n" in one go; wait for the newline so a partial read never counts
            return int(text) if text.endswith("\n") and text.strip().isdigit() else None

        p = wait_for(port, START_TIMEOUT, "the worker's port file", proc)
        wait_serving(f"127.0.0.1:{p}", proc)
        return proc, p

    return start


@pytest.fixture(scope="session")
def worker(start_worker):
    """A shared worker (bundled models only) as ``(proc, port)``."""
    return start_worker("--torch-threads", "1")


@pytest.fixture(scope="session")
def spawn_agent(reaper, tmp_path_factory):
    """``spawn_agent(*flags, log=None) -> Popen``: an agent process (stdout to ``log`` or a pipe)."""

    def spawn(*flags: str, log: Path | None = None, **kw) -> subprocess.Popen:
        if log is None:
            kw.setdefault("stdout", subprocess.PIPE)
            kw.setdefault("stderr", subprocess.PIPE)
        return reaper.spawn(cli("agent", *flags), log=log, **kw)

    return spawn


@pytest.fixture(scope="session")
def run_agent(spawn_agent):
    """``run_agent(*flags, timeout=120) -> CompletedProcess`` (text stdout/stderr)."""

    def run(*flags: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        proc = spawn_agent(*flags)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"agent did not finish within {timeout}s\n{err.decode(errors='replace')[-4000:]}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())

    return run


def terminate(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM and wait (bounded); returns the exit code."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module: bit-identical comparisons need a fixed thread count
    (the workers in these tests run with torch_threads=1 too)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
