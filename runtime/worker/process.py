"""Start an edge worker as a child process and wait until it is SERVING (demo, bench)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runtime.contracts.errors import Unavailable


def wait_serving(address: str, timeout: float) -> None:
    """Poll the standard health service until SERVING; Unavailable after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise Unavailable(f"{address} did not become SERVING within {timeout:g}s")
            time.sleep(0.05)


@dataclass
class WorkerProcess:
    proc: subprocess.Popen
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (drain), then SIGKILL if it does not exit in time; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def spawn_worker(flags: Sequence[str] = (), timeout: float = 60.0, log: Path | None = None) -> WorkerProcess:
    """``edgesplit worker --listen 127.0.0.1:0 FLAGS`` as a child; returns once it is SERVING."""
    tmp = Path(tempfile.mkdtemp(prefix="edgesplit-"))  # removed once the port is read, whatever happens
    port_file = tmp / "port"
    try:
        out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (the child's stdout for its lifetime)
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli.main", "worker", "--listen", "127.0.0.1:0", "--port-file", str(port_file),
             *flags],
            stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL, env=os.environ.copy(),
        )
        deadline = time.monotonic() + timeout
        # the worker writes "PORT\n" in one go: wait for the newline so a partial read never counts
        while not (port_file.exists() and port_file.read_text().endswith("\n")):
            if proc.poll() is not None:
                raise Unavailable(f"worker exited with code {proc.returncode} before serving" + (f"; see {log}" if log else ""))
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise Unavailable(f"worker did not start within {timeout:g}s")
            time.sleep(0.05)
        wp = WorkerProcess(proc, int(port_file.read_text()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wait_serving(wp.address, max(1.0, deadline - time.monotonic()))
    return wp
