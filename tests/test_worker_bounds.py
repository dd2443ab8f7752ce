"""Worker resource bounds (issue 10 part 5): bytes in incomplete chunked frames (per stream and in
total, with a timeout), the batch dimension, the models held; asserted on the worker's own accounting."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from runtime.contracts.errors import DeadlineExceeded, Overloaded
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.proto.edgesplit.v1 import tensor_pb2
from runtime.wire.budget import ByteBudget
from runtime.wire.transport import FrameAssembler

pytestmark = pytest.mark.timeout(120)
RPC = 30.0


def first_piece(seq: int, declared: int, piece: int = 1000, chunks: int = 100) -> pb.StreamRequest:
    return pb.StreamRequest(frame=pb.InferRequest(
        header=pb.FrameHeader(agent_id="x", stream_epoch=1, seq=seq, model_id="digits_cnn", split_id="pool1"),
        tensor=tensor_pb2.Tensor(buffer=bytes(piece), payload_size=declared, chunks=chunks)))


def chunk(seq: int, index: int, n: int = 1000) -> pb.StreamRequest:
    return pb.StreamRequest(chunk=pb.FrameChunk(seq=seq, index=index, data=bytes(n)))


def test_the_total_over_streams_is_capped_and_released():
    budget = ByteBudget(total_bytes=3000, timeout=60.0)
    a, b = FrameAssembler(10**6, budget), FrameAssembler(10**6, budget)
    a.feed(first_piece(1, 100_000))
    a.feed(chunk(1, 1))
    b.feed(first_piece(2, 100_000))
    assert budget.held == 3000
    with pytest.raises(Overloaded, match="--max-reassembly-bytes"):
        b.feed(chunk(2, 1))
    assert budget.held == 2000  # b's partial frame was dropped with the refusal
    a.close()
    assert budget.held == 0


def test_a_stale_partial_frame_is_evicted_when_room_is_needed_and_learns_it():
    now = [0.0]
    budget = ByteBudget(total_bytes=2000, timeout=10.0, clock=lambda: now[0])
    stale, fresh = FrameAssembler(10**6, budget), FrameAssembler(10**6, budget)
    stale.feed(first_piece(1, 100_000))
    stale.feed(chunk(1, 1))
    now[0] = 11.0
    fresh.feed(first_piece(2, 100_000))  # needs room: the stale frame is evicted
    assert budget.evicted == 1 and budget.held == 1000
    with pytest.raises(DeadlineExceeded, match="incomplete too long"):
        stale.feed(chunk(1, 2))


def test_an_old_partial_frame_is_dropped_on_its_next_message():
    now = [0.0]
    budget = ByteBudget(total_bytes=10**6, timeout=10.0, clock=lambda: now[0])
    a = FrameAssembler(10**6, budget)
    a.feed(first_piece(1, 100_000))
    now[0] = 20.0
    with pytest.raises(DeadlineExceeded, match="incomplete for more than 10s"):
        a.feed(chunk(1, 1))
    assert budget.held == 0


@pytest.fixture(scope="module")
def bounded_worker():
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    loop = asyncio.new_event_loop()
    ws = loop.run_until_complete(serve(WorkerConfig(
        listen="127.0.0.1:0", torch_threads=1, max_reassembly_bytes=3000, max_loaded_models=1, max_batch=2)))
    yield loop, ws
    loop.run_until_complete(ws.drain_and_stop(0.5))
    loop.close()


def test_a_worker_holds_at_most_its_reassembly_total_over_many_streams(bounded_worker):
    loop, ws = bounded_worker

    async def go():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            calls = [stub.InferStream(timeout=RPC) for _ in range(4)]
            for i, call in enumerate(calls):  # 4 streams, each opens a 100 KB frame and sends 1 KB of it
                await call.write(first_piece(i, 100_000))
                for _ in range(200):  # in order: the next stream writes once the worker holds this one's KB
                    if ws.service.reassembly.held >= min(3, i + 1) * 1000:
                        break
                    await asyncio.sleep(0.02)
            results = []
            for call in calls[3:]:  # the 4th no longer fits: its frame is answered at once
                results.append(await asyncio.wait_for(call.read(), RPC))
            held = ws.service.reassembly.held
            for call in calls:
                call.cancel()
            return results, held

    results, held = loop.run_until_complete(go())
    assert held <= 3000
    assert results[0].code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "reassembly" in results[0].message
    deadline = loop.time() + 10
    while ws.service.reassembly.held and loop.time() < deadline:  # the streams' ends release their bytes
        loop.run_until_complete(asyncio.sleep(0.05))
    assert ws.service.reassembly.held == 0


def test_batch_and_model_caps(bounded_worker):
    loop, ws = bounded_worker

    async def go():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            await stub.Prepare(pb.PrepareRequest(header=pb.FrameHeader(model_id="digits_cnn", split_id="pool1")),
                               timeout=RPC)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Prepare(pb.PrepareRequest(header=pb.FrameHeader(model_id="resnet18", split_id="add_2")),
                                   timeout=RPC)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-loaded-models" in info.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Infer(pb.InferRequest(
                    header=pb.FrameHeader(agent_id="x", seq=1, model_id="digits_cnn", split_id="pool1"),
                    tensor=tensor_pb2.Tensor(shape=[3, 16, 14, 14], dtype="float32")), timeout=RPC)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-batch" in info.value.details()

    loop.run_until_complete(go())
    assert sorted(ws.service.tails._models) == ["digits_cnn"]


def test_a_client_that_never_reads_stalls_its_own_stream():
    """Results the client does not read stop the worker reading that stream: the client's writes stall
    and the worker holds at most max_stream_results of them (the frames are refused ones: cheap error
    results, no compute)."""
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    async def go():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, max_stream_results=2))
        try:
            # BDP probing off: the client's receive window stays 64 KB, so unread results fill it soon
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}", options=[("grpc.http2.bdp_probe", 0)]) as ch:
                call = pb_grpc.InferenceStub(ch).InferStream(timeout=RPC)
                bad = pb.StreamRequest(frame=pb.InferRequest(header=pb.FrameHeader(agent_id="x", seq=1),
                                                             tensor=tensor_pb2.Tensor(buffer=bytes(4096))))
                written = 0
                try:
                    for _ in range(50_000):  # flow control stops the writes once the worker stops reading
                        await asyncio.wait_for(call.write(bad), 2.0)
                        written += 1
                except asyncio.TimeoutError:
                    pass
                held = ws.service.unsent_results
                call.cancel()
            deadline = asyncio.get_running_loop().time() + 10
            while ws.service.unsent_results and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            return written, held, ws.service.unsent_results
        finally:
            await ws.drain_and_stop(0.5)

    written, held, after = asyncio.run(go())
    assert written < 50_000  # the worker stopped reading: the client's writes stalled
    assert held <= 2 and after == 0


def test_admission_is_charged_by_batch_and_given_back(bounded_worker):
    import torch

    from runtime.wire.codec import get_codec

    loop, ws = bounded_worker
    svc = ws.service
    limit = svc.config.max_concurrency + svc.config.max_queue
    svc._admit(limit - 1)
    with pytest.raises(Overloaded, match="one per batch element"):
        svc._admit(2)  # a batch of 2 no longer fits where one frame would
    svc._admit(1)
    svc._release(limit)

    async def go():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}") as ch:
            x = torch.zeros(2, 16, 14, 14)
            req = pb.InferRequest(header=pb.FrameHeader(agent_id="x", seq=1, model_id="digits_cnn", split_id="pool1"),
                                  tensor=get_codec("raw").encode(x))
            res = await pb_grpc.InferenceStub(ch).Infer(req, timeout=RPC)
            return list(res.output.shape)

    assert loop.run_until_complete(go())[0] == 2
    assert svc._admitted == 0 and svc._weights == {}  # the batch's two slots came back


def test_a_stream_whose_client_stopped_reading_is_ended_with_a_clear_status():
    """A result that cannot be sent for --stalled-stream-seconds (the client's window is full: it does not
    read) ends the stream: the worker's accounting falls back to 0 at once, the metric counts it, and a
    client that reads again gets its results and then RESOURCE_EXHAUSTED naming the setting."""
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    async def go():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, max_stream_results=2,
                                      stalled_stream_seconds=2.0))
        metrics = ws.service.metrics
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}", options=[("grpc.http2.bdp_probe", 0)]) as ch:
                call = pb_grpc.InferenceStub(ch).InferStream(timeout=RPC)
                bad = pb.StreamRequest(frame=pb.InferRequest(header=pb.FrameHeader(agent_id="x", seq=1),
                                                             tensor=tensor_pb2.Tensor(buffer=bytes(4096))))
                for _ in range(50_000):  # until flow control holds a write (cancelling it would cancel the call)
                    write = asyncio.ensure_future(call.write(bad))
                    done, _ = await asyncio.wait({write}, timeout=0.5)
                    if not done:
                        break
                held = ws.service.unsent_results
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10
                while metrics.stalled_streams._value.get() < 1 and loop.time() < deadline:
                    await asyncio.sleep(0.05)
                stalled_after = loop.time() - (deadline - 10)
                after = ws.service.unsent_results, metrics.streams._value.get()
                read = 0
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    while True:  # the client reads again: its results, then the status
                        m = await asyncio.wait_for(call.read(), RPC)
                        assert m is not grpc.aio.EOF
                        read += 1
                return held, after, stalled_after, read, info.value
        finally:
            await ws.drain_and_stop(0.5)

    held, (unsent, open_streams), stalled_after, read, err = asyncio.run(go())
    assert held <= 2  # while stalled (0 if the guard had already ended it on a loaded machine)
    assert unsent == 0 and open_streams == 0  # the worker let go of the stream's state at once
    assert stalled_after < 10
    assert read > 0
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--stalled-stream-seconds" in err.details()


def test_a_reading_client_is_never_ended_by_the_stall_guard():
    """Results taken as they come: the guard never fires, even over many frames and a short setting."""
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    async def go():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, stalled_stream_seconds=0.2))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}") as ch:
                call = pb_grpc.InferenceStub(ch).InferStream(timeout=RPC)
                codes = []
                for seq in range(200):
                    await call.write(pb.StreamRequest(frame=pb.InferRequest(
                        header=pb.FrameHeader(agent_id="x", seq=seq), tensor=tensor_pb2.Tensor(buffer=bytes(64)))))
                    codes.append((await asyncio.wait_for(call.read(), RPC)).code)
                    if seq % 50 == 0:
                        await asyncio.sleep(0.3)  # idle longer than the setting: no result pending, nothing to end
                await call.done_writing()
                assert await call.read() is grpc.aio.EOF
                return codes, ws.service.metrics.stalled_streams._value.get(), await call.code()
        finally:
            await ws.drain_and_stop(0.5)

    codes, stalled, code = asyncio.run(go())
    assert len(codes) == 200 and stalled == 0 and code == grpc.StatusCode.OK
