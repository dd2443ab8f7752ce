"""The edge worker over real gRPC: results, error statuses, streams, admission, drain, metrics.

pytest-asyncio is not used: one event loop runs in a background thread for the whole module
and each test hands it a coroutine (``aio.run(scenario())``). The main worker is shared by most
tests, so the model loads once; the admission and drain tests start small workers of their own.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from runtime.contracts.errors import CODE_NUMBERS
from runtime.models.loader import load_model
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.wire.codec import decode_tensor, get_codec
from runtime.wire.transport import frame_messages
from runtime.worker.config import WorkerConfig
from runtime.worker.server import SERVICE_NAME, serve

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

MODEL = "resnet18"
SPLIT = "add_6"  # [1, 512, 7, 7], 100,352 bytes raw
HEAVY = "input"  # the whole network on the edge, for admission and drain
RPC_TIMEOUT = 30.0
MAIN_CAP = 1 << 20  # max_tensor_bytes of the shared worker


# -- plumbing ------------------------------------------------------------------------------------


class LoopThread:
    """An asyncio loop in a daemon thread; ``run`` blocks the test until a coroutine finishes."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Worker:
    """A started worker plus a channel and stubs to it (all bound to the module loop)."""

    def __init__(self, ws, channel):
        self.ws = ws
        self.channel = channel
        self.stub = pb_grpc.InferenceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.stopped = False

    @classmethod
    async def start(cls, **config) -> Worker:
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, **config))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}")
        await asyncio.wait_for(channel.channel_ready(), RPC_TIMEOUT)
        return cls(ws, channel)

    async def stop(self):
        if not self.stopped:
            self.stopped = True
            await self.ws.drain_and_stop(1)
        await self.channel.close()



@pytest.fixture(scope="module")
def aio(one_torch_thread):
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def loaded(one_torch_thread):
    return load_model(MODEL)


@pytest.fixture(scope="module")
def image():
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def feat(loaded, image):
    with torch.inference_mode():
        return loaded.head(SPLIT)(image).clone()


@pytest.fixture(scope="module")
def expected(loaded, image):
    with torch.inference_mode():
        return loaded.full(image).clone()


@pytest.fixture(scope="module")
def worker(aio):
    # max_batch 64: over_max_tensor_bytes sends a batch-64 shape to reach the byte cap
    w = aio.run(Worker.start(metrics_port=0, max_concurrency=2, max_tensor_bytes=MAIN_CAP, max_batch=64))
    yield w
    aio.run(w.stop())


def header(seq: int = 0, split: str = SPLIT, **kw) -> pb.FrameHeader:
    return pb.FrameHeader(agent_id="test-agent", stream_epoch=1, seq=seq, model_id=MODEL, split_id=split, **kw)


def request(x: torch.Tensor, codec: str = "raw", seq: int = 0, split: str = SPLIT, **kw) -> pb.InferRequest:
    return pb.InferRequest(header=header(seq, split, **kw), tensor=get_codec(codec).encode(x))


async def rpc_error(awaitable) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await awaitable
    return ei.value


def check_status(err: grpc.aio.AioRpcError, code: grpc.StatusCode | set, phrase: str) -> None:
    codes = code if isinstance(code, set) else {code}
    assert err.code() in codes, (err.code(), err.details())
    assert re.search(phrase, err.details() or ""), err.details()


async def good_infer(w: Worker, feat: torch.Tensor, expected: torch.Tensor, seq: int = 1000) -> None:
    """A well-formed frame on ``w`` answers exactly like the full model run locally."""
    res = await w.stub.Infer(request(feat, seq=seq), timeout=RPC_TIMEOUT)
    assert res.code == 0 and res.header.seq == seq
    assert torch.equal(decode_tensor(res.output), expected)


def stream_results(w: Worker, msgs: list[pb.StreamRequest]):
    async def go():
        call = w.stub.InferStream(iter(msgs), timeout=RPC_TIMEOUT)
        return [r async for r in call]

    return go()


def metric_samples(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# -- Infer: correct results ----------------------------------------------------------------------


def test_infer_raw_is_bit_identical_to_local_full_model(aio, worker, feat, expected):
    async def scenario():
        res = await worker.stub.Infer(request(feat, seq=7), timeout=RPC_TIMEOUT)
        assert res.code == 0 and res.message == ""
        assert res.header == header(7)  # echoed
        out = decode_tensor(res.output)
        assert out.shape == (1, 1000) and out.dtype == torch.float32
        assert torch.equal(out, expected)
        assert res.times.tail_seconds > 0 and res.times.decode_seconds >= 0 and res.times.queue_seconds >= 0

    aio.run(scenario())


def test_infer_int8_lz4_within_tolerance(aio, worker, loaded, feat, expected):
    msg = get_codec("int8+lz4").encode(feat)
    assert msg.compression == 1 and len(msg.buffer) < feat.numel() * 4 // 3  # ~1 byte/value, not 4
    with torch.inference_mode():
        local = loaded.tail(SPLIT)(decode_tensor(msg))

    async def scenario():
        req = pb.InferRequest(header=header(8), tensor=msg)
        return decode_tensor((await worker.stub.Infer(req, timeout=RPC_TIMEOUT)).output)

    out = aio.run(scenario())
    assert torch.equal(out, local)  # the worker decodes exactly what we decode
    err = (out - expected).abs().max().item()
    assert err < 0.05 * expected.abs().max().item(), err
    assert out.argmax() == expected.argmax()


# -- Prepare -------------------------------------------------------------------------------------


def test_prepare_reports_shape_and_digest(aio, worker, loaded):
    async def scenario():
        res = await worker.stub.Prepare(pb.PrepareRequest(header=header(model_digest=loaded.digest)), timeout=RPC_TIMEOUT)
        assert list(res.input_shape) == [1, 512, 7, 7]
        assert res.input_dtype == "float32"
        assert res.model_digest == loaded.digest
        assert res.load_seconds >= 0
        # split given by another valid name of the same size also works; empty digest = no check
        res = await worker.stub.Prepare(pb.PrepareRequest(header=header(split="layer4_1_relu_1")), timeout=RPC_TIMEOUT)
        assert list(res.input_shape) == [1, 512, 7, 7]

    aio.run(scenario())


PREPARE_ERRORS = {
    "unknown_model": (dict(model_id="no-such-model"), grpc.StatusCode.NOT_FOUND, r"model 'no-such-model' is not served here"),
    "unknown_split": (dict(split_id="no_such_split"), grpc.StatusCode.NOT_FOUND, r"no_such_split"),
    "wrong_digest": (dict(model_digest="0123456789abcdef"), grpc.StatusCode.FAILED_PRECONDITION, r"weights differ"),
    "tl_id": (dict(tl_id="tl-42"), grpc.StatusCode.FAILED_PRECONDITION, r"Transfer Layer 'tl-42'"),
    "empty_split": (dict(split_id=""), grpc.StatusCode.INVALID_ARGUMENT, r"split_id is empty"),
}


@pytest.mark.parametrize("case", list(PREPARE_ERRORS))
def test_prepare_errors(aio, worker, feat, expected, case):
    fields, code, phrase = PREPARE_ERRORS[case]

    async def scenario():
        h = header()
        for k, v in fields.items():
            setattr(h, k, v)
        check_status(await rpc_error(worker.stub.Prepare(pb.PrepareRequest(header=h), timeout=RPC_TIMEOUT)), code, phrase)
        # the same header on Infer is refused the same way
        req = request(feat)
        req.header.CopyFrom(h)
        check_status(await rpc_error(worker.stub.Infer(req, timeout=RPC_TIMEOUT)), code, phrase)
        await good_infer(worker, feat, expected)

    aio.run(scenario())


# -- Infer: malformed input ----------------------------------------------------------------------


def _empty_model(req, feat):
    req.header.model_id = ""


def _shape_mismatch(req, feat):
    req.tensor.CopyFrom(get_codec("raw").encode(torch.zeros(1, 256, 14, 14)))


def _wrong_dtype(req, feat):
    req.tensor.CopyFrom(get_codec("raw").encode(feat.double()))


def _unknown_codec(req, feat):
    req.tensor.codec = 9


def _rank_9(req, feat):
    req.tensor.CopyFrom(get_codec("raw").encode(feat.reshape(1, 512, 7, 7, 1, 1, 1, 1, 1)))


def _short_buffer(req, feat):
    req.tensor.buffer = req.tensor.buffer[:-4]
    req.tensor.payload_size = 0


def _buffer_vs_payload_size(req, feat):
    req.tensor.buffer = req.tensor.buffer + b"\0\0\0\0"


def _int8_scales(req, feat):
    req.tensor.CopyFrom(get_codec("int8").encode(feat))
    del req.tensor.scale[-1]


def _garbage_lz4(req, feat):
    req.tensor.CopyFrom(get_codec("raw+lz4").encode(feat))
    req.tensor.buffer = b"\xff" * 64
    req.tensor.payload_size = 64


def _lz4_claims_1gib(req, feat):
    req.tensor.CopyFrom(get_codec("raw+lz4").encode(feat))
    req.tensor.encoded_size = 1 << 30


def _batch_too_big_for_cap(req, feat):
    # a shape that fits the split but decodes to 64 * 100,352 bytes > MAIN_CAP; the buffer stays small
    del req.tensor.shape[:]
    req.tensor.shape.extend([64, 512, 7, 7])


def _chunked_on_unary(req, feat):
    req.tensor.chunks = 2


BAD = grpc.StatusCode.INVALID_ARGUMENT
MALFORMED = {
    "empty_model_id": (_empty_model, BAD, r"model_id is empty"),
    "shape_not_fitting_split": (_shape_mismatch, BAD, r"shape \[1, 256, 14, 14\] does not fit split 'add_6'"),
    "wrong_dtype": (_wrong_dtype, BAD, r"dtype 'float64' does not fit"),
    "unknown_codec": (_unknown_codec, BAD, r"codec=9 is not supported"),
    "rank_over_8": (_rank_9, BAD, r"does not fit split|rank 9"),
    "short_buffer": (_short_buffer, BAD, r"len\(buffer\)=100348 is invalid"),
    "payload_size_mismatch": (_buffer_vs_payload_size, BAD, r"payload_size=100352 but len\(buffer\)=100356"),
    "int8_wrong_scales": (_int8_scales, BAD, r"len\(scale\)=511"),
    "garbage_lz4": (_garbage_lz4, BAD, r"lz4"),
    "lz4_claims_1GiB": (_lz4_claims_1gib, {BAD, grpc.StatusCode.RESOURCE_EXHAUSTED}, r"encoded_size=1073741824"),
    "over_max_tensor_bytes": (_batch_too_big_for_cap, grpc.StatusCode.RESOURCE_EXHAUSTED, rf"limit is max_bytes={MAIN_CAP}"),
    "chunked_on_unary": (_chunked_on_unary, BAD, r"InferStream"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_infer_malformed(aio, worker, feat, expected, case):
    mutate, code, phrase = MALFORMED[case]
    req = request(feat, seq=3)
    mutate(req, feat)

    async def scenario():
        check_status(await rpc_error(worker.stub.Infer(req, timeout=RPC_TIMEOUT)), code, phrase)
        await good_infer(worker, feat, expected)

    aio.run(scenario())


def test_oversized_claim_refused_without_reading_payload(aio, worker, feat, expected):
    """The cap is checked from the header: a tiny message claiming a 6 MB tensor is refused at once."""
    req = request(feat)
    _batch_too_big_for_cap(req, feat)
    req.tensor.buffer = b""
    req.tensor.payload_size = 0
    req.tensor.encoded_size = 0
    assert req.ByteSize() < 200

    async def scenario():
        err = await rpc_error(worker.stub.Infer(req, timeout=RPC_TIMEOUT))
        check_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, r"is 6422528 bytes")
        await good_infer(worker, feat, expected)

    aio.run(scenario())


# -- InferStream ---------------------------------------------------------------------------------


def test_stream_frames_matched_by_seq_bad_frame_in_the_middle(aio, worker, feat, expected):
    feats = [feat * (1 + i / 10) for i in range(5)]
    bad_seq = 12
    msgs = []
    for i, f in enumerate(feats):
        seq = 10 + i
        req = request(f, seq=seq)
        if seq == bad_seq:
            _shape_mismatch(req, f)
        msgs.extend(frame_messages(req, 1 << 20))
    results = aio.run(stream_results(worker, msgs))
    by_seq = {r.header.seq: r for r in results}
    assert len(results) == 5 and set(by_seq) == {10, 11, 12, 13, 14}
    bad = by_seq[bad_seq]
    assert bad.code == CODE_NUMBERS[grpc.StatusCode.INVALID_ARGUMENT] == 3
    assert "does not fit split" in bad.message
    assert bad.header.agent_id == "test-agent" and bad.header.stream_epoch == 1
    for i in range(len(feats)):
        seq = 10 + i
        if seq == bad_seq:
            continue
        r = by_seq[seq]
        assert r.code == 0 and r.message == "", r.message
        assert r.header == header(seq)
        out = decode_tensor(r.output)
        if i == 0:
            assert torch.equal(out, expected)
        assert out.shape == (1, 1000)
    # different inputs give different outputs: results really belong to their frames
    outs = [decode_tensor(by_seq[s].output) for s in (10, 11, 13, 14)]
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(outs))


def test_stream_results_belong_to_their_frames(aio, worker, loaded, feat):
    feats = [feat * (1 + i / 10) for i in range(4)]
    with torch.inference_mode():
        want = [loaded.tail(SPLIT)(f) for f in feats]
    msgs = [m for i, f in enumerate(feats) for m in frame_messages(request(f, seq=100 + i), 1 << 20)]
    results = aio.run(stream_results(worker, msgs))
    assert sorted(r.header.seq for r in results) == [100, 101, 102, 103]
    for r in results:
        assert r.code == 0
        assert torch.equal(decode_tensor(r.output), want[r.header.seq - 100])


def test_stream_chunked_frame_reassembled(aio, worker, feat, expected):
    req = request(feat, seq=21)
    msgs = frame_messages(req, 10_000)
    assert len(msgs) == 11  # 100,352 bytes in 10,000-byte pieces
    msgs += frame_messages(request(feat, codec="int8+lz4", seq=22), 1_000)
    results = aio.run(stream_results(worker, msgs))
    assert sorted(r.header.seq for r in results) == [21, 22]
    by_seq = {r.header.seq: r for r in results}
    assert by_seq[21].code == 0 and by_seq[22].code == 0
    assert torch.equal(decode_tensor(by_seq[21].output), expected)
    assert by_seq[22].header == header(22)


def test_stream_chunk_out_of_order_then_stream_survives(aio, worker, feat, expected):
    good1 = frame_messages(request(feat, seq=30), 10_000)
    bad = frame_messages(request(feat, seq=31), 10_000)
    bad[2], bad[3] = bad[3], bad[2]  # chunk 3 arrives where chunk 2 should
    good2 = frame_messages(request(feat, seq=32), 10_000)
    results = aio.run(stream_results(worker, good1 + bad + good2))
    ok = [r for r in results if r.code == 0]
    assert sorted(r.header.seq for r in ok) == [30, 32]
    for r in ok:
        assert torch.equal(decode_tensor(r.output), expected)
    # exactly one result for the broken frame (its late chunks are not answered again), under its
    # full header: the agent matches results by (stream_epoch, seq)
    errors = [r for r in results if r.code != 0]
    assert len(errors) == 1 and len(results) == 3
    assert errors[0].code == CODE_NUMBERS[grpc.StatusCode.INVALID_ARGUMENT]
    assert "expected chunk 2 of frame 31, got chunk 3" in errors[0].message
    assert errors[0].header == header(31)


def test_stream_new_frame_before_last_chunk(aio, worker, feat, expected):
    """A frame cut short fails by its own header; the frame that interrupted it still runs."""
    cut = frame_messages(request(feat, seq=40), 10_000)[:4]
    nxt = frame_messages(request(feat, seq=41), 10_000)
    results = aio.run(stream_results(worker, cut + nxt))
    by_seq = {r.header.seq: r for r in results}
    assert len(results) == 2 and set(by_seq) == {40, 41}
    assert by_seq[40].code == CODE_NUMBERS[grpc.StatusCode.INVALID_ARGUMENT]
    assert "frame 40 ended after 4 chunks" in by_seq[40].message
    assert by_seq[40].header == header(40)
    assert by_seq[41].code == 0
    assert torch.equal(decode_tensor(by_seq[41].output), expected)


def test_stream_oversized_payload_and_empty_message(aio, worker, feat, expected):
    big = frame_messages(request(feat, seq=50), 10_000)
    big[0].frame.tensor.payload_size = MAIN_CAP + 1
    msgs = [pb.StreamRequest(), *big, *frame_messages(request(feat, seq=51), 1 << 20)]
    results = aio.run(stream_results(worker, msgs))
    by_seq = {}
    for r in results:
        by_seq.setdefault(r.header.seq, []).append(r)
    assert by_seq[51][0].code == 0 and torch.equal(decode_tensor(by_seq[51][0].output), expected)
    assert any(r.code == CODE_NUMBERS[grpc.StatusCode.INVALID_ARGUMENT] and "empty StreamRequest" in r.message for r in results)
    too_large = by_seq[50]
    assert len(too_large) == 1 and too_large[0].code == CODE_NUMBERS[grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert "exceeds this worker's cap" in too_large[0].message
    assert too_large[0].header == header(50)
    assert len(results) == 3  # the empty message, frame 50 (once, not per chunk), frame 51


# -- admission -----------------------------------------------------------------------------------


def test_queue_full_refuses_at_once(aio, loaded):
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        want = loaded.full(x)

    async def scenario():
        w = await Worker.start(max_concurrency=1, max_queue=0, preload=(f"{MODEL}@{HEAVY}",))
        try:
            req = request(x, split=HEAVY)

            async def one(i):
                t0 = time.perf_counter()
                try:
                    res = await w.stub.Infer(req, timeout=RPC_TIMEOUT)
                    return "ok", res, time.perf_counter() - t0
                except grpc.aio.AioRpcError as e:
                    return "err", e, time.perf_counter() - t0

            outcomes = await asyncio.gather(*(one(i) for i in range(8)))
            ok = [o for o in outcomes if o[0] == "ok"]
            refused = [o for o in outcomes if o[0] == "err"]
            assert ok and refused, outcomes
            for _, e, _ in refused:
                check_status(e, grpc.StatusCode.RESOURCE_EXHAUSTED, r"queue is full .*limit 1")
            for _, res, _ in ok:
                assert torch.equal(decode_tensor(res.output), want)
            # still serving afterwards (and the slot was given back)
            res = await w.stub.Infer(req, timeout=RPC_TIMEOUT)
            assert torch.equal(decode_tensor(res.output), want)
            assert w.ws.service.metrics.registry.get_sample_value(
                "edgesplit_worker_errors_total", {"code": "RESOURCE_EXHAUSTED"}) == len(refused)
        finally:
            await w.stop()

    aio.run(scenario())


def test_cancelled_call_keeps_its_slot_until_the_job_ends(aio, loaded):
    """A client that gives up does not free the slot while its tail still runs."""
    x = torch.randn(8, 3, 224, 224)  # ~0.3 s of compute on one thread

    async def scenario():
        w = await Worker.start(max_concurrency=1, max_queue=0, preload=(f"{MODEL}@{HEAVY}",))
        try:
            req = request(x, split=HEAVY)
            err = await rpc_error(w.stub.Infer(req, timeout=0.05))
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # the abandoned job is still computing: the one slot is taken, a new frame is refused
            assert w.ws.service._admitted == 1
            err = await rpc_error(w.stub.Infer(req, timeout=RPC_TIMEOUT))
            check_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full")
            # once it ends the slot comes back (bounded wait, no sleep-as-readiness)
            assert await w.ws.service.wait_idle(30)
            res = await w.stub.Infer(request(x[:1], split=HEAVY), timeout=RPC_TIMEOUT)
            with torch.inference_mode():
                assert torch.equal(decode_tensor(res.output), loaded.full(x[:1]))
        finally:
            await w.stop()

    aio.run(scenario())


# -- health, reflection, drain -------------------------------------------------------------------


def test_health_serving(aio, worker):
    async def scenario():
        for name in ("", SERVICE_NAME):
            res = await worker.health.Check(health_pb2.HealthCheckRequest(service=name), timeout=RPC_TIMEOUT)
            assert res.status == health_pb2.HealthCheckResponse.SERVING

    assert SERVICE_NAME == "edgesplit.v1.Inference"
    aio.run(scenario())


def test_reflection_lists_inference_service(aio, worker):
    async def scenario():
        stub = reflection_pb2_grpc.ServerReflectionStub(worker.channel)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=RPC_TIMEOUT)
        responses = [r async for r in call]
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert "edgesplit.v1.Inference" in names
        assert "grpc.health.v1.Health" in names
        # and the descriptor for the service can be fetched by symbol
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="edgesplit.v1.Inference")]), timeout=RPC_TIMEOUT
        )
        responses = [r async for r in call]
        assert responses and responses[0].file_descriptor_response.file_descriptor_proto

    aio.run(scenario())


def test_drain_finishes_inflight_and_refuses_new(aio, loaded):
    x = torch.randn(8, 3, 224, 224)  # ~0.5 s of compute on one thread
    with torch.inference_mode():
        want = loaded.full(x)

    async def scenario():
        w = await Worker.start(max_concurrency=1, preload=(f"{MODEL}@{HEAVY}",))
        try:
            slow = asyncio.ensure_future(w.stub.Infer(request(x, seq=1, split=HEAVY), timeout=RPC_TIMEOUT))
            registry = w.ws.service.metrics.registry
            deadline = time.monotonic() + RPC_TIMEOUT
            while not registry.get_sample_value("edgesplit_worker_inflight_frames"):
                assert time.monotonic() < deadline and not slow.done()
                await asyncio.sleep(0.002)
            w.stopped = True
            drain = asyncio.ensure_future(w.ws.drain_and_stop(10))
            hc = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            while (await w.health.Check(hc, timeout=RPC_TIMEOUT)).status != health_pb2.HealthCheckResponse.NOT_SERVING:
                await asyncio.sleep(0.002)
            res = await w.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT)
            assert res.status == health_pb2.HealthCheckResponse.NOT_SERVING
            err = await rpc_error(w.stub.Infer(request(x[:1], seq=2, split=HEAVY), timeout=RPC_TIMEOUT))
            assert not slow.done(), "the in-flight frame should still be running (make it slower)"
            check_status(err, grpc.StatusCode.UNAVAILABLE, r"shutting down")
            res = await slow
            assert res.code == 0 and res.header.seq == 1
            assert torch.equal(decode_tensor(res.output), want)
            await asyncio.wait_for(drain, RPC_TIMEOUT)
        finally:
            await w.stop()

    aio.run(scenario())


# -- metrics -------------------------------------------------------------------------------------


def test_metrics_endpoint(aio, worker, feat, expected):
    port = worker.ws.metrics_port
    assert port and port > 0
    before = metric_samples(port)

    async def scenario():
        await good_infer(worker, feat, expected)
        await good_infer(worker, feat, expected)
        bad = request(feat)
        _shape_mismatch(bad, feat)
        await rpc_error(worker.stub.Infer(bad, timeout=RPC_TIMEOUT))

    aio.run(scenario())
    after = metric_samples(port)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        assert key in after, (key, sorted(k for k in after if k[0].startswith(name)))
        return after[key] - before.get(key, 0.0)

    assert delta("edgesplit_worker_frames_total", model=MODEL, split=SPLIT, tl="none") == 2
    assert delta("edgesplit_worker_errors_total", code="INVALID_ARGUMENT") == 1
    # only frames that got past the header and shape checks count their payload
    assert delta("edgesplit_worker_received_bytes_total") == 2 * feat.numel() * 4
    assert delta("edgesplit_worker_tail_seconds_count") == 2
    assert delta("edgesplit_worker_tail_seconds_sum") > 0
    buckets = {dict(k[1])["le"]: v for k, v in after.items() if k[0] == "edgesplit_worker_tail_seconds_bucket"}
    assert buckets["+Inf"] == after[("edgesplit_worker_tail_seconds_count", ())] >= 2
    assert buckets["0.0001"] <= buckets["0.1"] <= buckets["+Inf"]
    assert after[("edgesplit_worker_loaded_tails", ())] >= 1
    assert after[("edgesplit_worker_inflight_frames", ())] == 0
    assert after[("edgesplit_worker_queue_depth", ())] == 0
    assert after[("edgesplit_worker_open_streams", ())] == 0
