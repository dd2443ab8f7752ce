"""The liveness watchdog wakes only when a probe or the verdict is due (issue 14: it woke every 0.25 s, about
1 ms of the agent's CPU a second, busy or idle), yet an idle stream is still probed probe_after after each
answer (a live link keeps floor - probe_after to answer), and results that keep coming send no probe."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from runtime.agent.metrics import AgentMetrics
from runtime.wire import stream_watch as stream_mod  # time_health_check, as the watchdog calls it
from runtime.wire.liveness import Liveness, LivenessOptions
from runtime.wire.stream import EdgeStream
from runtime.wire.transport import TransportOptions

pytestmark = pytest.mark.timeout(60)


def _watched(monkeypatch, probes: list[float]) -> tuple[EdgeStream, Liveness, list[float]]:
    """A stream whose watchdog runs against a fake connection: each probe is answered after 10 ms."""
    async def answered(channel, timeout):
        probes.append(time.monotonic())
        await asyncio.sleep(0.01)
        return 0.01

    monkeypatch.setattr(stream_mod, "time_health_check", answered)
    stream = EdgeStream("127.0.0.1:1", TransportOptions(), AgentMetrics(), 1.0, 1.0)
    stream._call = call = object()  # type: ignore[assignment]
    stream._channel = object()  # type: ignore[assignment]
    live = stream._live = Liveness(None, LivenessOptions(), path=False)
    wakes: list[float] = []
    nap = stream._nap

    async def counted(live: Liveness, seconds: float) -> None:
        await nap(live, seconds)
        wakes.append(time.monotonic())

    stream._nap = counted  # type: ignore[method-assign]
    stream._watchdog = asyncio.create_task(stream._watch(call, live))  # type: ignore[arg-type]
    return stream, live, wakes


def test_an_idle_stream_is_probed_every_probe_after_with_one_wake_up_a_probe(monkeypatch):
    async def scenario():
        probes: list[float] = []
        stream, live, wakes = _watched(monkeypatch, probes)
        await asyncio.sleep(2.6)
        stream._watchdog.cancel()
        return probes, wakes, live.reason

    probes, wakes, reason = asyncio.run(scenario())
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert len(probes) >= 3 and reason == ""  # answered: never declared dead
    # probe_after (0.5 s) after each answer (10 ms): never the ~1 s a watchdog sleeping to the verdict would take
    assert all(0.45 < g < 0.8 for g in gaps), gaps
    assert len(wakes) <= len(probes) + 2, (len(wakes), len(probes))  # was ~3 a probe at a 0.25 s tick


def test_results_that_keep_coming_send_no_probe_and_wake_it_about_twice_a_second(monkeypatch):
    async def scenario():
        probes: list[float] = []
        stream, live, wakes = _watched(monkeypatch, probes)
        t0 = time.monotonic()
        seq = 0
        while time.monotonic() - t0 < 2.0:  # bounded: 2 s of frames, one every 50 ms
            live.sent(seq, 1000)
            await asyncio.sleep(0.05)
            live.answered(seq)
            seq += 1
        stream._watchdog.cancel()
        return probes, wakes

    probes, wakes = asyncio.run(scenario())
    assert probes == []
    assert len(wakes) <= 6, len(wakes)  # each probe_after (0.5 s) at most; a 0.25 s tick made 8


def test_a_frame_after_idle_without_idle_probes_is_watched_from_its_send(monkeypatch):
    """Idle probes off: the idle watchdog sleeps a whole tick; the first frame brings its probe forward."""
    async def scenario():
        probes: list[float] = []
        monkeypatch.setattr(stream_mod, "time_health_check", lambda channel, timeout: _never(probes))
        stream = EdgeStream("127.0.0.1:1", TransportOptions(liveness=LivenessOptions(idle_probes=False)),
                            AgentMetrics(), 1.0, 1.0)
        stream._call = call = _Call()  # type: ignore[assignment]
        stream._channel = object()  # type: ignore[assignment]
        live = stream._live = Liveness(None, stream.transport.liveness, path=False)
        stream._watchdog = asyncio.create_task(stream._watch(call, live))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)  # asleep for a tick (1 s): nothing is due on an idle stream
        t_send = time.monotonic()
        await stream.send(_frame(1))  # no answer will come
        await asyncio.sleep(0.8)
        stream._watchdog.cancel()
        return [p - t_send for p in probes]

    after = asyncio.run(scenario())
    assert after and 0.45 < after[0] < 0.75, after  # probe_after from the send, not the tick's end (1 s)


async def _never(probes: list[float]) -> float:
    probes.append(time.monotonic())
    await asyncio.sleep(10)
    return 10.0


class _Call:
    async def write(self, msg) -> None:
        return None


def _frame(seq: int):
    from runtime.proto.edgesplit.v1 import inference_pb2 as pb

    req = pb.InferRequest(header=pb.FrameHeader(seq=seq, agent_id="a"))
    req.tensor.buffer = b"x" * 100
    return req


def test_a_busy_streams_path_is_probed_every_probe_after_while_it_answers(monkeypatch):
    """Frames outstanding, no result (a slow link): each answer on the path brings the next path probe forward
    (probe_after after it), so the path keeps floor - probe_after to answer, as with the 0.25 s tick."""
    async def scenario():
        probes: list[float] = []
        path_probes: list[float] = []
        path = object()

        async def answered(channel, timeout):
            (path_probes if channel is path else probes).append(time.monotonic())
            await asyncio.sleep(0.01 if channel is path else 10)  # the stream's own probe waits behind the frames
            return 0.01

        monkeypatch.setattr(stream_mod, "time_health_check", answered)
        stream = EdgeStream("127.0.0.1:1", TransportOptions(), AgentMetrics(), 1.0, 1.0)
        stream._call = call = object()  # type: ignore[assignment]
        stream._channel = object()  # type: ignore[assignment]
        stream._path = path  # type: ignore[assignment]
        live = stream._live = Liveness(None, LivenessOptions(), path=True)
        live.sent(1, 400_000)
        stream._watchdog = asyncio.create_task(stream._watch(call, live))  # type: ignore[arg-type]
        await asyncio.sleep(2.8)
        stream._watchdog.cancel()
        return path_probes, live.reason

    path_probes, reason = asyncio.run(scenario())
    gaps = [b - a for a, b in itertools.pairwise(path_probes)]
    assert len(path_probes) >= 3 and reason == ""  # the path answers: a slow link is not declared dead
    assert all(0.45 < g < 0.8 for g in gaps), gaps
