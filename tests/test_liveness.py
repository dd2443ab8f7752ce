"""Liveness (issue 10 part 6): a silent partition (the project's relay swallowing every byte, no RST)
is noticed by the link-aware watchdog (runtime.wire.liveness) well before gRPC keep-alive would, every
frame still gets exactly one result, and the reconnect back-off stays within 2 s; on a 1.6 Mbit/s link a
400 KB frame (2 s on the wire) is not mistaken for a partition. Times are printed (figures, not
assertions on speed); the bounds asserted are the rule's own (keep-alive alone needs 11 s)."""

from __future__ import annotations

import asyncio
import time

import pytest

from runtime.wire.asyncutil import Backoff
from runtime.wire.stream import BACKOFF_JITTER, MAX_BACKOFF_SECONDS
from runtime.wire.transport import TransportOptions

pytestmark = pytest.mark.timeout(120)


def deaths(agent, endpoint: str = "worker", reason: str | None = None) -> float:
    """edgesplit_agent_stream_deaths_total for ``endpoint`` (and ``reason``; None: every reason)."""
    total = 0.0
    for metric in agent.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "edgesplit_agent_stream_deaths_total" and sample.labels["endpoint"] == endpoint \
                    and reason in (None, sample.labels["reason"]):
                total += sample.value
    return total


def test_defaults_detect_within_two_seconds_and_back_off_at_most_two():
    from runtime.wire.liveness import LivenessOptions

    t = TransportOptions()
    # frame channels: keep-alive is only the backstop (a slow link's queued frame must not count as a
    # partition: one 400 KB frame at 1.6 Mbit/s holds a ping 2 s); the liveness watchdog detects
    assert t.keepalive_time_ms + t.keepalive_timeout_ms <= 11_000
    assert t.keepalive_timeout_ms >= 5_000
    live = LivenessOptions()
    assert live.floor_seconds + live.tick_seconds <= 2.0 and live.idle_probes  # busy and idle streams alike
    assert live.probe_after_seconds < live.floor_seconds  # a live link's probe has time to come back
    # control channels (planner): nothing bulky on them, so a short ping timeout: at most 2 s from the
    # last byte read to the verdict
    assert t.keepalive_time_ms + t.control_keepalive_timeout_ms <= 2_000
    control = dict(t.channel_options(control=True))
    assert control["grpc.keepalive_timeout_ms"] == control["grpc.http2.ping_timeout_ms"] == t.control_keepalive_timeout_ms
    server = dict(t.server_options())
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= t.keepalive_time_ms  # the pings are welcome
    b = Backoff(1.0, max(1.0, MAX_BACKOFF_SECONDS), jitter=BACKOFF_JITTER)
    delays = [b.next() for _ in range(20)]
    assert max(delays) <= 2.0 and min(delays) >= 0.5


def test_a_silent_partition_is_detected_and_every_frame_gets_one_result(capsys):
    import torch

    from runtime.agent.client import Agent
    from runtime.agent.config import AgentOptions, InitialPlan
    from runtime.models.loader import load_model
    from runtime.tools.netem import DelayProxy
    from runtime.wire.codec import get_codec
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    torch.set_num_threads(1)
    loaded = load_model("digits_cnn")
    x = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))

    async def go():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1))
        proxy = await DelayProxy(f"127.0.0.1:{ws.port}").start()
        plan = InitialPlan(loaded.split("pool1"), get_codec("raw"), worker=proxy.address)
        agent = Agent(loaded, plan, AgentOptions(deadline_seconds=30.0, connect_timeout=2.0))  # far above 2 s
        try:
            await agent.start()
            before = [await agent.infer(x) for _ in range(3)]
            assert [r.where for r in before] == ["edge"] * 3
            stream = agent._streams[proxy.address]
            proxy.blackhole = True
            cut = time.monotonic()
            during = asyncio.gather(*(agent.infer(x) for _ in range(3)))
            while stream.is_open and time.monotonic() - cut < 8.0:  # keep-alive alone: 11 s
                await asyncio.sleep(0.05)
            detected = time.monotonic() - cut
            results = await asyncio.wait_for(during, 30.0)
            return before, results, detected, stream.is_open, deaths(agent, reason="no_progress")
        finally:
            await agent.close()
            await proxy.close()
            await ws.drain_and_stop(0.5)

    before, results, detected, still_open, died = asyncio.run(go())
    assert not still_open, "the dead stream was not declared dead within 8 s (the link-aware rule allows 1.5 s here)"
    assert died == 1  # by the liveness rule, not by keep-alive
    assert len(results) == 3 and all(r.where == "local" for r in results)  # one result each, run on the board
    assert all(r.top1()[0] == before[0].top1()[0] for r in results)
    with capsys.disabled():
        print(f"\nsilent partition detected after {detected:.2f} s (link-aware: max(1.5 s, 1.5 x outstanding / bandwidth + RTT))")


def test_liveness_rule_waits_for_the_link_and_never_kills_an_idle_or_unmeasured_stream():
    from runtime.wire.liveness import Liveness, LivenessOptions

    now = [0.0]
    hint = [(200_000.0, 0.0667)]  # 1.6 Mbit/s, 66.7 ms
    live = Liveness(lambda: hint[0], LivenessOptions(), clock=lambda: now[0])
    now[0] = 1.4
    assert live.verdict() == "" and live.wants_probe()  # idle: probed after 0.5 s of silence
    live.probe_answered(sent_at=1.3)
    now[0] = 2.9
    assert live.verdict() == ""
    now[0] = 2.95
    assert "idle, and no answer to a probe" in live.verdict() and live.reason == "probe_unanswered"
    unprobed = Liveness(lambda: hint[0], LivenessOptions(idle_probes=False), clock=lambda: now[0])
    now[0] = 100.0
    assert unprobed.verdict() == "" and not unprobed.wants_probe()  # idle and not probed: keep-alive only
    live.probe_answered(sent_at=99.9)
    live.sent(1, 400_000)  # 2 s on this link
    now[0] = 102.9
    assert live.allowance() == pytest.approx(1.5 * 2.0 + 0.0667) and live.verdict() == ""
    now[0] = 103.2
    assert "no progress for 3.2s with 400000 bytes" in live.verdict() and live.reason == "no_progress"
    live.answered(1)
    assert live.verdict() == "" and live.stalled() == 0.0
    hint[0] = (125_000_000.0, 0.0005)  # 1 Gbit/s: the 2 s floor rules
    live.sent(2, 3_000)
    now[0] = 104.6
    assert live.next_check() == pytest.approx(0.105)  # the watchdog wakes when the verdict is due
    now[0] = 104.7
    assert live.allowance() == 1.5 and live.verdict() == ""  # 1.5 s after the last progress (103.2)
    now[0] = 104.71
    assert live.verdict()
    hint[0] = (0.0, 0.0)  # never measured: unknown, so the frames' deadline and keep-alive end the stream
    assert live.allowance() is None and live.verdict() == ""


def test_an_abandoned_frame_is_waited_for_until_a_probe_proves_the_link_carried_it():
    from runtime.wire.liveness import Liveness

    now = [0.0]
    live = Liveness(lambda: (1e6, 0.01), clock=lambda: now[0])
    live.sent(1, 10_000)
    now[0] = 1.0
    live.abandon(1)  # the worker may never answer it
    assert live.wants_probe()
    now[0] = 1.6
    assert live.verdict()  # a partition with every frame abandoned is still noticed
    live.probe_answered(sent_at=1.5)  # probe sent after the abandonment, answered: the link is alive
    assert live.outstanding_bytes == 0 and live.verdict() == ""
    live.sent(2, 10_000)
    live.forget(2)  # cut short before its last chunk: no answer is owed
    assert live.outstanding_bytes == 0


def test_a_400_kb_frame_on_1_6_mbit_is_not_taken_for_a_partition(capsys):
    import torch

    from runtime.agent.client import Agent
    from runtime.agent.config import AgentOptions, InitialPlan
    from runtime.models.loader import load_model
    from runtime.tools.netem import DelayProxy, LinkShape
    from runtime.wire.codec import get_codec
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    torch.set_num_threads(1)
    loaded = load_model("resnet18")
    split = loaded.split("add_2")  # 128 x 28 x 28 fp32: 401 KB raw, about 2 s at 1.6 Mbit/s
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    async def go():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1))
        proxy = await DelayProxy(f"127.0.0.1:{ws.port}", LinkShape.from_ms_mbps(33.35, 1.6)).start()
        agent = Agent(loaded, InitialPlan(split, get_codec("raw"), worker=proxy.address),
                      AgentOptions(deadline_seconds=30.0, connect_timeout=5.0))
        try:
            await agent.start()
            results = [await agent.infer(x) for _ in range(3)]  # the first measures the link
            results += await asyncio.gather(agent.infer(x), agent.infer(x))  # 800 KB outstanding at once
            stream = agent._streams[proxy.address]
            assert deaths(agent) == 0
            return results, stream.epoch, stream.is_open, agent.link.estimate(proxy.address).bandwidth.value
        finally:
            await agent.close()
            await proxy.close()
            await ws.drain_and_stop(0.5)

    results, epoch, is_open, bandwidth = asyncio.run(go())
    assert [r.where for r in results] == ["edge"] * 5, [r.fallback_reason for r in results]
    assert epoch == 1 and is_open  # never declared dead, never reopened
    assert results[0].wire_bytes > 400_000
    with capsys.disabled():
        print(f"\n1.6 Mbit/s, {results[0].wire_bytes} B frames: transfer "
              + ", ".join(f"{r.times['transfer_edge']:.2f}" for r in results)
              + f" s, estimate {bandwidth * 8 / 1e6:.2f} Mbit/s, stream kept open")
