"""The idle liveness probe carried on the open InferStream (issue 14): a real worker on loopback answers a
StreamProbe with an echo on the result stream; the agent's EdgeStream sends it instead of a unary Health/Check
when the worker advertised it (initial metadata), records the round trip (count, age), and still declares a
silent worker dead within the idle rule's bound; a worker that does not advertise it gets Health/Check as before;
the worker's rate and size caps end a flooding stream RESOURCE_EXHAUSTED / INVALID_ARGUMENT.
Times are printed, not asserted beyond generous multiples of the rules' own (1.5 s floor)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from liveness_fixtures import StreamMetrics, until

from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.tools.netem import DelayProxy
from runtime.wire.stream import EdgeStream, open_frame_stream
from runtime.wire.streamprobe import STREAM_PROBE_KEY, ProbeBucket, advertised
from runtime.wire.transport import TransportOptions

pytestmark = pytest.mark.timeout(120)

NOTICE_BOUND = 5.0  # seconds: a loaded machine's margin over the 1.5 s rule (keep-alive alone: 70 s)


async def _worker(**kw):
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    return await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, **kw))


def _shed(ws) -> dict[str, float]:
    """edgesplit_worker_streams_shed_total by reason, as the worker's registry exposes it."""
    return {s.labels["reason"]: s.value for m in ws.service.metrics.streams_shed.collect() for s in m.samples
            if s.name.endswith("_total")}


def _stream(address: str) -> tuple[EdgeStream, StreamMetrics]:
    metrics = StreamMetrics()
    return EdgeStream(address, TransportOptions(), metrics, connect_timeout=2.0, reconnect=0.5,
                      link_hint=lambda: (0.0, 0.0)), metrics


def test_an_idle_stream_is_probed_on_the_stream_and_answered(capsys):
    """Idle for 2.2 s: the worker advertised stream probes, so every idle probe went on the stream (no
    Health/Check), each was echoed (the stream stays open), and each echo is a round-trip sample."""

    async def go():
        ws = await _worker()
        stream, metrics = _stream(f"127.0.0.1:{ws.port}")
        seen = []
        stream.on_rtt = seen.append
        try:
            await stream._ensure_open()
            await until(lambda: stream.stream_probes, 2.0)
            await asyncio.sleep(2.2)
            return stream.is_open, dict(stream.probes_sent), stream.rtt, seen, time.monotonic(), metrics.deaths
        finally:
            await stream.close()
            await ws.drain_and_stop(0.5)

    alive, sent, rtt, seen, now, deaths = asyncio.run(go())
    assert alive and not deaths, deaths
    assert sent["health"] == 0, sent
    assert 2 <= sent["stream"] <= 6, sent  # one 0.5 s after each answer
    assert rtt.samples >= sent["stream"] - 1 and len(seen) == rtt.samples
    assert 0 < rtt.smallest <= rtt.last < 1.0
    assert rtt.age(now) < 1.0
    with capsys.disabled():
        print(f"\nstream probes: {sent}, rtt {rtt.samples} samples, smallest {rtt.smallest * 1e3:.2f} ms")


def test_a_silent_worker_is_noticed_within_the_bound(capsys):
    """The relay swallows every byte (a silent partition): the unanswered stream probe leaves the idle rule
    (no answer for 1.5 s) to end the stream, as the Health/Check did."""

    async def go():
        ws = await _worker()
        proxy = await DelayProxy(f"127.0.0.1:{ws.port}").start()
        stream, metrics = _stream(proxy.address)
        try:
            await stream._ensure_open()
            await until(lambda: stream.stream_probes, 2.0)
            await asyncio.sleep(1.2)
            answered = stream.rtt.samples
            proxy.blackhole = True
            noticed = await until(lambda: not stream.is_open, 15.0)
            since_answer = time.monotonic() - stream.rtt.at
            return answered, noticed, since_answer, metrics.deaths, dict(stream.probes_sent)
        finally:
            await stream.close()
            await proxy.close()
            await ws.drain_and_stop(0.5)

    answered, noticed, since_answer, deaths, sent = asyncio.run(go())
    assert answered >= 1
    assert deaths == ["probe_unanswered"], deaths
    assert noticed < NOTICE_BOUND and sent["health"] == 0, sent
    with capsys.disabled():
        print(f"\nstream probes, silent partition: noticed {noticed:.2f} s after it began, "
              f"{since_answer:.2f} s after the last echo (rule: 1.5 s)")


def test_a_worker_that_does_not_advertise_gets_health_checks():
    """A worker without the capability (here --max-stream-probes-per-second 0: no metadata key, as an older
    worker): the agent never writes a probe on its stream and keeps Health/Check; the stream stays open."""

    async def go():
        ws = await _worker(max_stream_probes_per_second=0)
        stream, metrics = _stream(f"127.0.0.1:{ws.port}")
        try:
            await stream._ensure_open()
            await asyncio.sleep(1.8)
            return stream.is_open, stream.stream_probes, dict(stream.probes_sent), stream.rtt.samples, metrics.deaths
        finally:
            await stream.close()
            await ws.drain_and_stop(0.5)

    alive, probes, sent, samples, deaths = asyncio.run(go())
    assert alive and not deaths and not probes
    assert sent["stream"] == 0 and sent["health"] >= 2, sent
    assert samples == 0


async def _flood(ws, requests: list[pb.StreamRequest]) -> tuple[list[str], int, grpc.StatusCode | None, str]:
    """Write ``requests`` on a raw InferStream to ``ws``; (initial metadata keys, echoes read, status, details)."""
    channel = TransportOptions().aio_channel(f"127.0.0.1:{ws.port}")
    try:
        call = open_frame_stream(channel)
        keys = [k for k, _ in (await call.initial_metadata() or ())]
        for r in requests:
            try:
                await call.write(r)
            except (grpc.RpcError, asyncio.InvalidStateError):
                break
        echoes = 0
        try:
            async for res in call:
                echoes += res.HasField("probe")
                if echoes == len(requests):
                    call.cancel()
                    break
        except grpc.aio.AioRpcError as e:
            return keys, echoes, e.code(), e.details() or ""
        return keys, echoes, None, ""
    finally:
        await channel.close()


def test_the_worker_ends_a_probe_flood_resource_exhausted():
    """60 probes at once against a cap of 5 a second: the first 5 are echoed, then the stream ends
    RESOURCE_EXHAUSTED naming the setting; nothing more is answered (not buffered)."""

    async def go():
        ws = await _worker(max_stream_probes_per_second=5)
        try:
            flood = await _flood(ws, [pb.StreamRequest(probe=pb.StreamProbe(id=i + 1)) for i in range(60)])
            within = await _flood(ws, [pb.StreamRequest(probe=pb.StreamProbe(id=i + 1)) for i in range(4)])
            return flood, within, _shed(ws)
        finally:
            await ws.drain_and_stop(0.5)

    (keys, echoes, code, details), (_, within_echoes, within_code, _), shed = asyncio.run(go())
    assert shed == {"oldest_ended": 0, "total_refused": 0, "probe_rate": 1, "probe_size": 0}, shed  # counted, not only logged
    assert STREAM_PROBE_KEY in keys
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert "--max-stream-probes-per-second" in details
    assert 1 <= echoes <= 6, echoes  # the bucket's 5 (a refill of one at most while they were read)
    assert within_echoes == 4 and within_code in (None, grpc.StatusCode.CANCELLED)


def test_the_worker_refuses_an_oversized_probe():
    """A StreamProbe padded with an unknown field past 64 bytes: INVALID_ARGUMENT, not echoed."""
    probe = pb.StreamProbe(id=1).SerializeToString() + b"\x12\x64" + b"x" * 100  # field 2, 100 bytes
    request = pb.StreamRequest.FromString(b"\x22" + bytes([len(probe)]) + probe)

    async def go():
        ws = await _worker()
        try:
            return await _flood(ws, [request]), _shed(ws)
        finally:
            await ws.drain_and_stop(0.5)

    (_, echoes, code, details), shed = asyncio.run(go())
    assert shed["probe_size"] == 1 and shed["probe_rate"] == 0, shed
    assert code == grpc.StatusCode.INVALID_ARGUMENT and echoes == 0, (code, details)
    assert "64 bytes" in details


def test_probe_bucket_and_advertised():
    t = [0.0]
    bucket = ProbeBucket(2.0, clock=lambda: t[0])
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    t[0] = 0.5
    assert bucket.take() and not bucket.take()
    assert not ProbeBucket(0.0).take()
    assert advertised([(STREAM_PROBE_KEY, "1")]) and not advertised([("other", "1")]) and not advertised(None)


def test_probes_sent_while_a_frame_holds_the_stream_are_counted():
    """A frame holding the stream with nothing sent yet (its head computing on the board): the idle probes still
    go (they keep the 1.5 s bound), and agent_cpu counts them as "held"."""

    async def go():
        ws = await _worker()
        stream, _ = _stream(f"127.0.0.1:{ws.port}")
        try:
            await stream._ensure_open()
            await until(lambda: stream.stream_probes, 2.0)
            await asyncio.sleep(0.7)
            before = dict(stream.probes_sent)
            stream.hold()
            await asyncio.sleep(1.2)
            stream.release()
            return before, dict(stream.probes_sent), stream.is_open
        finally:
            await stream.close()
            await ws.drain_and_stop(0.5)

    before, after, alive = asyncio.run(go())
    assert alive
    assert after["held"] - before["held"] >= 1 and before["held"] == 0, (before, after)
    assert after["held"] - before["held"] <= after["stream"] - before["stream"]
