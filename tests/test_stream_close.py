"""How an EdgeStream's end is reported (runtime.wire.stream): the agent's own close is "agent closing", at INFO and
no stream death, even when the worker's end of the call (its answer to the agent's half-close) reaches the reader
before close() cancels the call (a race: "stream closed by the worker" in 2 of 4 bench runs); a worker that ends
the stream itself (its drain) is still reported as the worker's, a WARNING and a death. A real worker on loopback."""

from __future__ import annotations

import asyncio
import logging

import pytest
from liveness_fixtures import StreamMetrics, until

from runtime.wire.stream import EdgeStream
from runtime.wire.transport import TransportOptions

pytestmark = pytest.mark.timeout(60)

LOGGER = "runtime.wire.stream"


async def _worker():
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    return await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1))


async def _opened(port: int) -> tuple[EdgeStream, StreamMetrics]:
    """A stream open to the worker, its reader waiting for a result (the worker's initial metadata read)."""
    metrics = StreamMetrics()
    stream = EdgeStream(f"127.0.0.1:{port}", TransportOptions(), metrics, connect_timeout=2.0, reconnect=0.5)
    await stream._ensure_open()
    await until(lambda: stream.stream_probes, 2.0)
    return stream, metrics


def _endings(caplog) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER and " ended: " in r.getMessage()]


def test_the_agents_own_close_is_not_reported_as_the_workers(caplog):
    """The worker ends the call when the agent half-closes it; here its end reaches the reader before close()
    cancels the call, every time (close's half-close returns only once the reader has finished)."""

    async def go():
        ws = await _worker()
        try:
            stream, metrics = await _opened(ws.port)
            call, reader = stream._call, stream._reader
            half_close = call.done_writing
            finished_first: list[bool] = []

            async def answered_first():
                await half_close()
                await asyncio.wait({reader}, timeout=5.0)  # bounded; close() waits for this 1 s at most
                finished_first.append(reader.done() and not reader.cancelled())

            call.done_writing = answered_first
            with caplog.at_level(logging.INFO, logger=LOGGER):
                await stream.close()
            return finished_first, metrics.deaths, _endings(caplog), stream.is_open
        finally:
            await ws.drain_and_stop(0.5)

    finished_first, deaths, endings, is_open = asyncio.run(go())
    assert finished_first == [True]  # the race went the worker's way: the reader saw the end before the cancel
    assert [(level, text.split(" ended: ")[1]) for level, text in endings] == [(logging.INFO, "agent closing")], endings
    assert deaths == [] and not is_open, deaths


def test_a_stream_the_worker_ends_is_still_reported_as_the_workers(caplog):
    """The worker drains (ends every open stream with status OK, then stops) while the agent's stream is open
    and idle: a WARNING naming the worker, and one stream death."""

    async def go():
        ws = await _worker()
        stopped = False
        stream = None
        try:
            stream, metrics = await _opened(ws.port)
            with caplog.at_level(logging.INFO, logger=LOGGER):
                await ws.drain_and_stop(0.5)
                stopped = True
                await until(lambda: not stream.is_open, 5.0)
            return metrics.deaths, _endings(caplog)
        finally:
            if stream is not None:
                await stream.close()
            if not stopped:
                await ws.drain_and_stop(0.5)

    deaths, endings = asyncio.run(go())
    assert [(level, text.split(" ended: ")[1]) for level, text in endings] == \
        [(logging.WARNING, "stream closed by the worker")], endings
    assert deaths == ["closed_by_peer"], deaths
