"""Worker operations: a SIGTERM with open streams drains without an error, and concurrent first
frames build a tail once."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from runtime.models.loader import LoadedModel
from runtime.worker.config import WorkerConfig
from runtime.worker.metrics import WorkerMetrics
from runtime.worker.service import TailCache


@pytest.mark.timeout(60)
def test_concurrent_first_frames_build_the_tail_once(monkeypatch):
    builds: list[str] = []
    lock = threading.Lock()
    real_tail = LoadedModel.tail

    def counting_tail(self, key):
        with lock:
            builds.append(str(key))
        time.sleep(0.2)  # a slow build: the other first frames arrive while it runs
        return real_tail(self, key)

    monkeypatch.setattr(LoadedModel, "tail", counting_tail)

    async def main():
        with ThreadPoolExecutor(max_workers=4) as pool:
            cache = TailCache(WorkerConfig(), pool, WorkerMetrics())
            # the same split by name and by index, four frames at once, and a second split
            tails = await asyncio.gather(*(cache.get("digits_cnn", s) for s in ("pool1", "pool1", "7", "pool1")),
                                         cache.get("digits_cnn", "pool2"))
        return tails

    tails = asyncio.run(main())
    assert len({id(t) for t in tails[:4]}) == 1 and tails[4] is not tails[0]
    assert sorted(builds) == ["pool1", "pool2"], builds


@pytest.mark.timeout(60)
def test_drain_ends_open_streams_with_ok_and_logs_no_error(caplog):
    """The drain ends each open InferStream itself (status OK), so the server's stop has no call to
    cancel: before, grpc logged an ERROR traceback (CancelledError) and agents saw UNAVAILABLE."""
    import grpc

    from runtime.proto.edgesplit.v1 import inference_pb2_grpc
    from runtime.worker.server import serve

    async def main():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1))
        hold = asyncio.Event()

        async def requests():  # an idle agent: the stream is open, no frame in flight
            await hold.wait()
            yield  # pragma: no cover (never reached)

        async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}") as channel:
            call = inference_pb2_grpc.InferenceStub(channel).InferStream(requests())
            await asyncio.wait_for(call.wait_for_connection(), 10)
            await asyncio.sleep(0.2)  # the server has the call
            await asyncio.wait_for(ws.drain_and_stop(5.0), 20)
            results = [r async for r in call]
            code = await call.code()
            hold.set()
        return results, code

    with caplog.at_level(logging.INFO):
        results, code = asyncio.run(main())
    assert results == [] and code == grpc.StatusCode.OK, code
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.timeout(90)
def test_spawned_worker_leaves_no_temp_directory(monkeypatch, tmp_path):
    import tempfile

    from runtime.worker.process import spawn_worker

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    wp = spawn_worker(["--torch-threads", "1"], timeout=60)
    try:
        assert wp.port > 0
    finally:
        assert wp.stop() == 0
    assert not list(tmp_path.glob("edgesplit-*"))
