"""The worker's compute threads (runtime.wire.handoff.ComputeThreads, issue 14) over real gRPC: an exception in
the tail reaches the client as the right status (an error result on the stream, which goes on; INTERNAL on
Infer), a stop with a frame computing and one queued answers both (the result; UNAVAILABLE), and a client that
cancels its stream mid-compute gets its queue slot back once the compute has ended."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch

from runtime.contracts.errors import CODE_NUMBERS
from runtime.models.loader import load_model
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.wire.codec import decode_tensor, get_codec
from runtime.worker import service as service_mod
from runtime.worker.config import WorkerConfig
from runtime.worker.server import serve

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]

NET = '''
import torch
from torch import nn

EDGESPLIT_INPUT_SIZE = (32, 32)


def build():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 32 * 32, 5))
'''


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "small_net.py"
    path.write_text(NET)
    spec = f"{path}:build"
    loaded = load_model(spec)
    return spec, loaded, loaded.split(1)


def _frame(loaded, sp, seq: int):
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seq))
    with torch.inference_mode():
        feat = loaded.head(sp.name)(image).clone()
        want = loaded.full(image).clone()
    header = pb.FrameHeader(agent_id="a", stream_epoch=1, seq=seq, model_id=loaded.name, split_id=sp.name)
    return pb.InferRequest(header=header, tensor=get_codec("raw").encode(feat)), want


def _gated_compute(monkeypatch, fail_seq: int | None = None, gate: threading.Event | None = None):
    """``_compute`` that raises for ``fail_seq`` and waits for ``gate`` first; the seqs that started, in order."""
    started: list[int] = []
    real = service_mod.InferenceService._compute

    def compute(self, tail, req, *args, **kw):
        started.append(req.header.seq)
        if gate is not None:
            assert gate.wait(30)
        if req.header.seq == fail_seq:
            raise RuntimeError("the tail broke")
        return real(self, tail, req, *args, **kw)

    monkeypatch.setattr(service_mod.InferenceService, "_compute", compute)
    return started


async def _until(cond, what: str) -> None:
    for _ in range(3000):  # bounded: 30 s
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"waited 30 s for {what}")


def test_an_exception_in_the_tail_reaches_the_client_with_its_status(net, monkeypatch):
    spec, loaded, sp = net
    _gated_compute(monkeypatch, fail_seq=2)
    frames = [_frame(loaded, sp, seq) for seq in (1, 2, 3)]

    async def main():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", models=(spec,), torch_threads=1))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}") as ch:
                stub = pb_grpc.InferenceStub(ch)
                got: asyncio.Queue[None] = asyncio.Queue()

                async def requests():
                    for req, _ in frames:
                        yield pb.StreamRequest(frame=req)
                        await got.get()  # one in flight, as an agent with window 1

                results = []
                async for res in stub.InferStream(requests(), timeout=60):
                    results.append(res)
                    got.put_nowait(None)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Infer(frames[1][0], timeout=30)
            return results, err.value, ws.service._admitted
        finally:
            await ws.drain_and_stop(1)

    results, err, admitted = asyncio.run(main())
    assert [r.header.seq for r in results] == [1, 2, 3]  # the stream goes on after the bad frame
    assert results[1].code == CODE_NUMBERS[grpc.StatusCode.INTERNAL] and "the tail broke" in results[1].message
    for res, (_, want) in zip([results[0], results[2]], [frames[0], frames[2]], strict=True):
        assert res.code == 0 and torch.equal(decode_tensor(res.output), want)
    assert err.code() == grpc.StatusCode.INTERNAL and "the tail broke" in err.details()
    assert admitted == 0  # every slot given back


def test_stopping_with_a_frame_computing_and_one_queued_answers_both(net, monkeypatch):
    spec, loaded, sp = net
    gate = threading.Event()
    started = _gated_compute(monkeypatch, gate=gate)
    frames = [_frame(loaded, sp, seq) for seq in (1, 2)]

    async def main():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", models=(spec,), torch_threads=1, max_concurrency=1))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}") as ch:
                done = asyncio.Event()

                async def requests():
                    for req, _ in frames:  # both at once: the second waits for the one compute thread
                        yield pb.StreamRequest(frame=req)
                    await done.wait()

                call = pb_grpc.InferenceStub(ch).InferStream(requests(), timeout=60)
                await _until(lambda: started == [1] and ws.service._admitted == 2, "frame 1 computing, frame 2 queued")
                ws.service.executor.shutdown(wait=False, cancel_futures=True)  # what drain_and_stop ends with
                first = await asyncio.wait_for(call.read(), 30)  # the queued frame is answered at once
                gate.set()
                second = await asyncio.wait_for(call.read(), 30)
                done.set()
                return [first, second], started, ws.service._admitted
        finally:
            gate.set()
            await ws.drain_and_stop(1)

    (refused, result), started, admitted = asyncio.run(main())
    assert refused.header.seq == 2 and refused.code == CODE_NUMBERS[grpc.StatusCode.UNAVAILABLE]
    assert "shutting down" in refused.message
    assert result.header.seq == 1 and result.code == 0 and torch.equal(decode_tensor(result.output), frames[0][1])
    assert started == [1] and admitted == 0


def test_a_stream_cancelled_mid_compute_keeps_its_slot_until_the_compute_ends(net, monkeypatch):
    spec, loaded, sp = net
    gate = threading.Event()
    started = _gated_compute(monkeypatch, gate=gate)
    req, _ = _frame(loaded, sp, 1)

    async def main():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", models=(spec,), torch_threads=1))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}") as ch:
                hold = asyncio.Event()

                async def requests():
                    yield pb.StreamRequest(frame=req)
                    await hold.wait()

                call = pb_grpc.InferenceStub(ch).InferStream(requests(), timeout=60)
                await _until(lambda: started == [1], "the frame computing")
                call.cancel()
                await _until(lambda: ws.service.metrics.streams._value.get() == 0, "the stream's end on the worker")
                held = ws.service._admitted
                gate.set()
                idle = await ws.service.wait_idle(30)
                hold.set()
                return held, idle, ws.service._admitted
        finally:
            gate.set()
            await ws.drain_and_stop(1)

    held, idle, admitted = asyncio.run(main())
    assert held == 1  # the stream is gone, the compute is not: its slot stays taken
    assert idle and admitted == 0


def test_a_streams_frames_skip_the_task_once_their_tail_is_loaded(net, monkeypatch):
    """``InferenceService.start`` (no task per frame) takes a stream's frames once their tail is loaded; the first
    frame (the tail to load) and a frame refused by the checks get the same answers as through ``process``."""
    spec, loaded, sp = net
    processed: list[int] = []
    real = service_mod.InferenceService.process

    async def process(self, req):
        processed.append(req.header.seq)
        return await real(self, req)

    monkeypatch.setattr(service_mod.InferenceService, "process", process)
    frames = [_frame(loaded, sp, seq) for seq in (1, 2, 3, 4)]
    bad = frames[2][0]
    del bad.tensor.shape[:]
    bad.tensor.shape.extend([1, 7])  # refused by the shape check: an error result, the stream goes on

    async def main():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", models=(spec,), torch_threads=1))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}") as ch:
                got: asyncio.Queue[None] = asyncio.Queue()

                async def requests():
                    for req, _ in frames:
                        yield pb.StreamRequest(frame=req)
                        await got.get()

                results = []
                async for res in pb_grpc.InferenceStub(ch).InferStream(requests(), timeout=60):
                    results.append(res)
                    got.put_nowait(None)
            registry = ws.service.metrics.registry
            counted = registry.get_sample_value("edgesplit_worker_frames_total",
                                                {"model": loaded.name, "split": sp.name, "tl": "none"})
            return results, counted, ws.service._admitted
        finally:
            await ws.drain_and_stop(1)

    results, counted, admitted = asyncio.run(main())
    assert processed == [1]  # the first frame loads the tail; the rest go straight to the compute threads
    assert [r.header.seq for r in results] == [1, 2, 3, 4]
    assert results[2].code == CODE_NUMBERS[grpc.StatusCode.INVALID_ARGUMENT] and "does not fit" in results[2].message
    for i in (0, 1, 3):
        assert results[i].code == 0 and torch.equal(decode_tensor(results[i].output), frames[i][1])
        assert 0 < results[i].received_first_seconds <= results[i].received_last_seconds <= results[i].sent_seconds
    assert counted == 3 and admitted == 0
