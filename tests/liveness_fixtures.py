"""Shared set-up of the liveness and stream tests (tests/test_liveness.py, tests/test_liveness_idle.py,
tests/test_stream_close.py, tests/test_stream_probe.py): a real worker on loopback behind the project's relay
(runtime.tools.netem.DelayProxy, which can swallow every byte: ``proxy.blackhole = True``), a real Agent running
digits_cnn split at pool1 through it, and what an EdgeStream reports to (:class:`StreamMetrics`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge

from runtime.tools.netem import DelayProxy, LinkShape


class StreamMetrics:
    """What an EdgeStream reports (its ``metrics``), on a registry of its own: the up gauge, the opens counter, and
    each death's reason in ``deaths``, in order."""

    def __init__(self):
        r = CollectorRegistry()
        self.stream_up = Gauge("up", "", registry=r)
        self.reconnects = Counter("opens", "", registry=r)
        self.deaths: list[str] = []

    def stream_died(self, reason: str) -> None:
        self.deaths.append(reason)


def deaths(agent, endpoint: str = "worker", reason: str | None = None) -> float:
    """edgesplit_agent_stream_deaths_total for ``endpoint`` (and ``reason``; None: every reason)."""
    total = 0.0
    for metric in agent.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "edgesplit_agent_stream_deaths_total" and sample.labels["endpoint"] == endpoint \
                    and reason in (None, sample.labels["reason"]):
                total += sample.value
    return total


async def until(predicate, timeout: float) -> float:
    """Seconds until ``predicate()`` holds (raises after ``timeout``)."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


def digits_input():
    """digits_cnn with one torch thread, and one fixed input: (loaded model, x)."""
    import torch

    from runtime.models.loader import load_model

    torch.set_num_threads(1)
    return load_model("digits_cnn"), torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))


@contextlib.asynccontextmanager
async def digits_agent(loaded, shape: LinkShape | None = None, deadline_seconds: float = 30.0,
                       connect_timeout: float = 2.0) -> AsyncIterator[tuple]:
    """A worker, the relay in front of it (shaped by ``shape``) and a started Agent whose plan splits
    ``loaded`` at pool1 (raw codec) and sends to the relay: yields (agent, proxy); all closed after."""
    from runtime.agent.client import Agent
    from runtime.agent.config import AgentOptions, InitialPlan
    from runtime.wire.codec import get_codec
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1))
    proxy = await DelayProxy(f"127.0.0.1:{ws.port}", shape or LinkShape()).start()
    agent = Agent(loaded, InitialPlan(loaded.split("pool1"), get_codec("raw"), worker=proxy.address),
                  AgentOptions(deadline_seconds=deadline_seconds, connect_timeout=connect_timeout))
    try:
        await agent.start()
        yield agent, proxy
    finally:
        await agent.close()
        await proxy.close()
        await ws.drain_and_stop(0.5)
