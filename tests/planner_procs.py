"""Real planner daemons as subprocesses (``edgesplit planner serve``) for the store and replica
tests, a connection-level TCP balancer in front of them (what a Kubernetes Service does: each new
connection to one address goes to one live backend), and a simulated agent that the real
:class:`runtime.agent.planner_link.PlannerLink` drives (it applies every plan, runs no model)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from runtime.agent.telemetry import LinkEstimator

FAST = 10_000_000.0  # B/s every simulated link measures


def start_planner(store: str, tmp_path, *flags: str) -> tuple[subprocess.Popen, str]:
    """A planner on 127.0.0.1:0 with ``--store store``; returns (process, HOST:PORT) once it serves.
    Its log goes to ``tmp_path/planner-PID.log`` (read it with :func:`log_of`)."""
    port_file = tmp_path / f"port-{time.monotonic_ns()}"
    log = open(tmp_path / f"planner-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115 - the child holds it
    p = subprocess.Popen([sys.executable, "-m", "runtime.cli.main", "planner", "serve", "--listen", "127.0.0.1:0",
                          "--store", store, "--port-file", str(port_file), *flags],
                         stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    log.close()
    p.log_path = log.name  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text().strip()):
        if p.poll() is not None or time.monotonic() > deadline:
            kill(p)
            raise AssertionError(f"planner did not start: {log_of(p)}")
        time.sleep(0.05)
    return p, f"127.0.0.1:{port_file.read_text().strip()}"


def log_of(p: subprocess.Popen, tail: int = 4000) -> str:
    with open(p.log_path, errors="replace") as f:  # type: ignore[attr-defined]
        return f.read()[-tail:]


def kill(p: subprocess.Popen) -> None:
    """SIGKILL the planner (its process group) and reap it."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    p.wait(10)


class Balancer:
    """One address in front of several backends: each accepted connection is piped to the next
    backend (round robin) that accepts a connection; a dead backend's connections are closed."""

    def __init__(self, backends: list[str]):
        self.backends = backends
        self._next = itertools.count()
        self._server: asyncio.base_events.Server | None = None
        self._pipes: set[asyncio.Task] = set()
        self.address = ""

    async def start(self) -> Balancer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        start = next(self._next)
        for i in range(len(self.backends)):
            host, port = self.backends[(start + i) % len(self.backends)].rsplit(":", 1)
            try:
                up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2.0)
            except (OSError, asyncio.TimeoutError):
                continue
            pipes = [asyncio.create_task(_pipe(reader, up_writer)), asyncio.create_task(_pipe(up_reader, writer))]
            self._pipes.update(pipes)
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            for t in pipes:
                t.cancel()
                self._pipes.discard(t)
            up_writer.close()
            break
        writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._pipes):
            t.cancel()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


@dataclass
class _Loaded:
    name: str
    digest: str


@dataclass
class _Active:
    worker: str = ""


@dataclass
class SimAgent:
    """What PlannerLink needs of an agent: applies every plan at once (no model, no worker), and
    measures ``FAST`` on the link of each plan it applies."""

    loaded: _Loaded
    link: LinkEstimator = field(default_factory=LinkEstimator)
    active: _Active = field(default_factory=_Active)
    plan_version: int = 0
    codec: str = "raw"
    tl: None = None
    tl_dir: str = ""
    metrics: None = None
    applied: list[int] = field(default_factory=list)

    async def apply_plan(self, split, codec, tl=None, version: int = 0, worker_address=None, **kw) -> None:
        self.plan_version = int(version)
        self.applied.append(self.plan_version)
        if worker_address is not None:
            self.active.worker = worker_address
        if worker_address:
            self.link.add_bandwidth_sample(FAST, worker_address)
            self.link.add_rtt_sample(0.005, worker_address)

    @property
    def telemetry_plan_version(self) -> int:
        return self.plan_version

    async def probe_rtt(self, timeout: float) -> None:
        return None
