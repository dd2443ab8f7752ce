"""The worker's frame path without copies or hand-offs (issue 14): a raw frame decoded as a view of the received
bytes (exact, and never written: a tail that writes its input is decoded to a copy), fp16/int8 read from the
received bytes, and the decode + tail on the event loop's thread while one frame and one stream are active
(results equal, other streams and Health still answered, the executor used otherwise)."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runtime.models.loader import load_model
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.wire import codec as codec_mod
from runtime.wire.codec import decode_tensor, get_codec
from runtime.wire.framewire import MIN_ZERO_COPY_BYTES, TensorView, parse_request, serialize_request
from runtime.worker import service as service_mod
from runtime.worker.config import WorkerConfig
from runtime.worker.server import serve

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]

NET = '''
import torch
from torch import nn

EDGESPLIT_INPUT_SIZE = (256, 256)  # the stem's output, 8 x 128 x 128 fp32, is a zero-copy frame (>= 256 KiB)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.act = nn.ReLU(inplace=True)  # a tail cut after the stem writes its input
        self.conv = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.act(self.stem(x))
        x = torch.relu(self.conv(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def build():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return Net()
'''


def _address(data: bytes) -> int:
    return int(np.frombuffer(data, np.uint8).ctypes.data)


def _big_frame(x: torch.Tensor, codec: str = "raw") -> bytes:
    out = get_codec(codec).encode_frame(x)
    out.request.frame.header.model_id = "m"
    return serialize_request(out)


# -- the decode -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                   torch.int8, torch.uint8, torch.bool])
def test_a_shared_raw_decode_is_exact(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 3, 5, 7, generator=g) * 50).to(dtype) if dtype != torch.bool else torch.rand(2, 3, 5, 7) > 0.5
    msg = get_codec("raw").encode(x)
    for shared in (False, True):
        y = decode_tensor(msg, shared=shared)
        assert y.dtype == x.dtype and torch.equal(y, x)


def test_a_shared_raw_decode_views_the_received_bytes_and_a_plain_one_copies():
    x = torch.randn(1, 16, 112, 112, generator=torch.Generator().manual_seed(2))
    data = _big_frame(x)
    assert len(data) >= MIN_ZERO_COPY_BYTES
    req = parse_request(data)
    assert isinstance(req.frame.tensor, TensorView)  # the payload is a view of ``data``
    before = bytes(data)
    start, end = _address(data), _address(data) + len(data)

    shared = decode_tensor(req.frame.tensor, shared=True)
    assert torch.equal(shared, x) and start <= shared.data_ptr() < end  # no copy
    copied = decode_tensor(req.frame.tensor)
    assert torch.equal(copied, x) and not start <= copied.data_ptr() < end
    copied.add_(1.0)  # the plain decode is the caller's to write
    assert data == before and torch.equal(shared, x)


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_fp16_and_int8_read_the_received_bytes_and_give_a_new_tensor(codec):
    x = torch.randn(1, 32, 112, 112, generator=torch.Generator().manual_seed(3))
    data = _big_frame(x, codec)
    req = parse_request(data)
    assert isinstance(req.frame.tensor, TensorView)
    before = bytes(data)
    want = decode_tensor(get_codec(codec).encode(x))  # through a protobuf message's own copy
    y = decode_tensor(req.frame.tensor)
    assert torch.equal(y, want)
    y.mul_(2.0)  # a new tensor: writing it leaves the received bytes alone
    assert data == before


# -- the worker: a tail that writes its input is never given the received bytes -----------------------


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "inplace_net.py"
    path.write_text(NET)
    spec = f"{path}:build"
    loaded = load_model(spec)
    writes = keeps = None
    for i in range(1, len(loaded.sliced.split_points) - 1):
        sp = loaded.split(i)
        x = torch.randn(sp.out_shape)
        version = x._version
        with torch.inference_mode():
            loaded.tail(sp.name)(x)
        if x._version != version and writes is None:
            writes = sp
        elif x._version == version and keeps is None and sp.fp32_bytes >= MIN_ZERO_COPY_BYTES:
            keeps = sp
    assert writes is not None and keeps is not None, "the test net has a split whose tail writes its input, and one not"
    return spec, loaded, writes, keeps


def _frames(loaded, sp, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        image = torch.randn(1, 3, 256, 256, generator=g)
        with torch.inference_mode():
            feat = loaded.head(sp.name)(image).clone()
            want = loaded.full(image).clone()
        header = pb.FrameHeader(agent_id="a", stream_epoch=1, seq=i + 1, model_id=loaded.name, split_id=sp.name)
        out.append((pb.StreamRequest(frame=pb.InferRequest(header=header, tensor=get_codec("raw").encode(feat))), want))
    return out


async def _stream(stub, frames, gate: asyncio.Event | None = None, hold: asyncio.Event | None = None):
    """Send ``frames`` on one InferStream, one in flight at a time (as an agent with window 1); after the first
    result the rest wait for ``gate``; after the last the stream stays open until ``hold`` is set."""
    got: asyncio.Queue[None] = asyncio.Queue()

    async def requests():
        for i, (msg, _) in enumerate(frames):
            if i == 1 and gate is not None:
                await gate.wait()
            yield msg
            await got.get()
        if hold is not None:
            await hold.wait()

    results = {}
    async for res in stub.InferStream(requests(), timeout=60):
        results[res.header.seq] = res
        got.put_nowait(None)
    return results


def _check(results, frames):
    assert len(results) == len(frames)
    for (msg, want) in frames:
        res = results[msg.frame.header.seq]
        assert res.code == 0, res.message
        assert torch.equal(decode_tensor(res.output), want)


def _record(monkeypatch):
    """Every decode the worker makes: (shared, the buffer it read, a copy of its bytes then), and the thread
    each compute ran on."""
    decodes: list[tuple[bool, object, bytes]] = []
    threads: list[str] = []
    real_decode, real_compute = codec_mod.decode_tensor, service_mod.InferenceService._compute

    def decode(msg, **kw):
        decodes.append((kw.get("shared", False), msg.buffer, bytes(msg.buffer)))
        return real_decode(msg, **kw)

    def compute(self, *args, **kw):
        threads.append(threading.current_thread().name)
        return real_compute(self, *args, **kw)

    monkeypatch.setattr(service_mod, "decode_tensor", decode)
    monkeypatch.setattr(service_mod.InferenceService, "_compute", compute)
    return decodes, threads


@pytest.mark.parametrize("which", ["writes", "keeps"])
def test_the_received_bytes_are_never_written(net, monkeypatch, which):
    spec, loaded, writes, keeps = net
    sp = writes if which == "writes" else keeps
    decodes, _ = _record(monkeypatch)
    frames = _frames(loaded, sp, 4)

    async def main():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", models=(spec,), torch_threads=1))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}") as ch:
                results = await _stream(pb_grpc.InferenceStub(ch), frames)
            return results, ws.service.tails._tails[(loaded.name, sp.name)]
        finally:
            await ws.drain_and_stop(1)

    results, tail = asyncio.run(main())
    _check(results, frames)
    assert len(decodes) == 4
    assert tail.writes_input is (which == "writes")
    # the first frame shows whether the tail writes its input (decoded to a copy); a tail that does never shares
    assert [d[0] for d in decodes] == ([False] * 4 if which == "writes" else [False, True, True, True])
    for _, buffer, before in decodes:
        assert bytes(buffer) == before  # what the worker received is as it arrived


def test_a_tail_that_writes_a_shared_input_after_all_is_copied_from_then_on(net, caplog):
    _, loaded, _, keeps = net
    tail = service_mod.Tail(loaded, keeps, torch.nn.Identity())
    service_mod.InferenceService._check_written(tail, False, False)
    assert tail.writes_input is False
    service_mod.InferenceService._check_written(tail, True, True)
    assert tail.writes_input is True and "wrote into its input" in caplog.text
    service_mod.InferenceService._check_written(tail, False, False)
    assert tail.writes_input is True


# -- the worker: compute on the event loop's thread -----------------------------------------------------


def _inline_worker(spec, loaded, sp, inline: float, monkeypatch, second_stream: bool):
    _, threads = _record(monkeypatch)
    frames = _frames(loaded, sp, 5)
    other = _frames(loaded, sp, 3, seed=1)

    async def until(n: int):
        for _ in range(3000):  # bounded: 30 s
            if len(threads) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{len(threads)} computes, waited for {n}")

    async def main():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", models=(spec,), torch_threads=1,
                                      inline_compute_seconds=inline, max_concurrency=2))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}") as ch:
                stub = pb_grpc.InferenceStub(ch)
                gate, hold = asyncio.Event(), asyncio.Event()
                first = asyncio.create_task(_stream(stub, frames, gate))
                await until(1)  # the tail's compute time is known after the first frame
                second = asyncio.create_task(_stream(stub, other, hold=hold)) if second_stream else None
                await until(1 + (len(other) if second_stream else 0))  # the second stream stays open
                gate.set()
                results = await first
                health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
                hold.set()
                answered = await second if second is not None else {}
            return results, answered, health
        finally:
            await ws.drain_and_stop(1)

    results, answered, health = asyncio.run(main())
    _check(results, frames)
    if second_stream:
        _check(answered, other)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    return threads


def test_a_lone_stream_computes_on_the_event_loop_thread(net, monkeypatch):
    spec, loaded, _, keeps = net
    threads = _inline_worker(spec, loaded, keeps, 10.0, monkeypatch, second_stream=False)
    loop_thread = threading.current_thread().name  # asyncio.run's loop runs here
    assert threads[0].startswith("tail")  # no compute time known yet: the executor
    assert threads[1:] == [loop_thread] * 4


def test_two_open_streams_compute_on_the_executor_and_both_are_answered(net, monkeypatch):
    spec, loaded, _, keeps = net
    threads = _inline_worker(spec, loaded, keeps, 10.0, monkeypatch, second_stream=True)
    assert all(t.startswith("tail") for t in threads[1:]), threads


def test_inline_compute_off(net, monkeypatch):
    # off by default: the agents' late-frame check (runtime/agent/prober.py) expects the worker's loop to answer a
    # probe while a frame computes
    assert WorkerConfig().inline_compute_seconds == 0
    spec, loaded, _, keeps = net
    threads = _inline_worker(spec, loaded, keeps, WorkerConfig().inline_compute_seconds, monkeypatch, second_stream=False)
    assert all(t.startswith("tail") for t in threads), threads


def test_inline_needs_a_known_short_compute_one_frame_and_one_stream(net):
    _, loaded, _, keeps = net
    svc = service_mod.InferenceService(WorkerConfig(inline_compute_seconds=0.05), service_mod.WorkerMetrics())
    try:
        tail = service_mod.Tail(loaded, keeps, torch.nn.Identity())
        svc._admitted = 1
        assert not svc._inline(tail, 1)  # no compute time yet: unknown is not short
        tail.compute_seconds = 0.02  # per batch element
        assert svc._inline(tail, 1)
        svc._admitted = 3
        assert not svc._inline(tail, 1)  # other frames admitted
        assert not svc._inline(tail, 3)  # a batch of 3: about 0.06 s
        svc._admitted = 2
        assert svc._inline(tail, 2)
        svc._stream_queues.update({asyncio.Queue(), asyncio.Queue()})
        assert not svc._inline(tail, 2)  # two streams open
        svc._stream_queues.clear()
        svc.config = WorkerConfig(inline_compute_seconds=0)
        assert not svc._inline(tail, 2)  # off
    finally:
        svc.executor.shutdown()
