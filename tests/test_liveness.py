"""Liveness (issue 10 part 6): a silent partition (the project's relay swallowing every byte, no RST)
is noticed by the link-aware watchdog (runtime.wire.liveness) well before gRPC keep-alive would, every
frame still gets exactly one result, and the reconnect back-off stays within 2 s; on a 1.6 Mbit/s link a
400 KB frame (2 s on the wire) is not mistaken for a partition. Times are printed (figures, not
assertions on speed); the bounds asserted are the rule's own (keep-alive alone needs 11 s)."""

from __future__ import annotations

import asyncio
import time

import pytest
from liveness_fixtures import deaths, digits_agent, digits_input, until

from runtime.tools.netem import LinkShape
from runtime.wire.asyncutil import Backoff
from runtime.wire.stream import BACKOFF_JITTER, MAX_BACKOFF_SECONDS
from runtime.wire.transport import TransportOptions

pytestmark = pytest.mark.timeout(120)


def test_defaults_detect_within_two_seconds_and_back_off_at_most_two():
    from runtime.wire.liveness import LAG_TOLERANCE_SECONDS, LivenessOptions

    t = TransportOptions()
    # frame channels and the worker's server: keep-alive is only the backstop (a slow link's queued frames
    # must not count as a partition: eight 602 KB frames at 1.6 Mbit/s hold a ping 24 s); the liveness
    # watchdog detects. Servers without frames (the planner's) and the agent's widened planner ping: 10 s.
    assert t.keepalive_timeout_ms >= 30_000
    # ... and pings only after 10 s without a byte read (issue 14: each second cost an idle agent ~1.2 ms/s)
    assert dict(t.channel_options())["grpc.keepalive_time_ms"] == t.frame_keepalive_time_ms == 10_000
    assert dict(t.server_options())["grpc.keepalive_time_ms"] == t.frame_keepalive_time_ms
    assert dict(t.server_options(frames=False))["grpc.keepalive_time_ms"] == t.keepalive_time_ms
    assert t.keepalive_time_ms + t.control_backstop_timeout_ms <= 11_000
    frames, control_server = dict(t.server_options()), dict(t.server_options(frames=False))
    assert frames["grpc.keepalive_timeout_ms"] == frames["grpc.http2.ping_timeout_ms"] == t.keepalive_timeout_ms
    assert control_server["grpc.keepalive_timeout_ms"] == control_server["grpc.http2.ping_timeout_ms"] \
        == t.control_backstop_timeout_ms
    live = LivenessOptions()
    # busy and idle streams alike; the watchdog wakes at the instant a verdict is due (the tick is a backstop:
    # EdgeStream._sooner moves its wake-up when an answer or a frame brings a probe forward)
    assert live.floor_seconds + LAG_TOLERANCE_SECONDS <= 2.0 and live.idle_probes
    assert live.probe_after_seconds < live.floor_seconds  # a live link's probe has time to come back
    # control channels (planner): nothing bulky on them, so a short ping timeout: at most 2 s from the
    # last byte read to the verdict
    assert t.keepalive_time_ms + t.control_keepalive_timeout_ms <= 2_000
    control = dict(t.channel_options(control=True))
    assert control["grpc.keepalive_time_ms"] == t.keepalive_time_ms
    assert control["grpc.keepalive_timeout_ms"] == control["grpc.http2.ping_timeout_ms"] == t.control_keepalive_timeout_ms
    server = dict(t.server_options())
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= t.keepalive_time_ms  # the pings are welcome
    b = Backoff(1.0, max(1.0, MAX_BACKOFF_SECONDS), jitter=BACKOFF_JITTER)
    delays = [b.next() for _ in range(20)]
    assert max(delays) <= 2.0 and min(delays) >= 0.5


@pytest.mark.parametrize("mbps", [0.0, 0.1])
def test_a_silent_partition_is_detected_and_every_frame_gets_one_result(mbps, capsys):
    """A measured link, unshaped, or slow (0.1 Mbit/s: a 12.5 KB frame takes 1 s, and three in flight
    give the estimate's allowance 4.5 s): the path's silence ends the stream at the 1.5 s floor."""
    loaded, x = digits_input()
    shape = LinkShape.from_ms_mbps(10.0, mbps)

    async def go():
        async with digits_agent(loaded, shape) as (agent, proxy):  # deadline 30 s: far above 2 s
            before = [await agent.infer(x) for _ in range(3)]
            assert [r.where for r in before] == ["edge"] * 3
            stream = agent._streams[proxy.address]
            proxy.blackhole = True
            cut = time.monotonic()
            during = asyncio.gather(*(agent.infer(x) for _ in range(3)))
            await until(lambda: len(stream._live.outstanding) == 3, 5.0)
            allowance = stream._live.allowance()  # the estimate's rule alone
            while stream.is_open and time.monotonic() - cut < 8.0:  # keep-alive alone: 11 s
                await asyncio.sleep(0.05)
            detected = time.monotonic() - cut
            results = await asyncio.wait_for(during, 30.0)
            return before, results, detected, stream.is_open, deaths(agent, reason="no_progress"), allowance

    before, results, detected, still_open, died, allowance = asyncio.run(go())
    assert not still_open, "the dead stream was not declared dead within 8 s (the link-aware rule allows 1.5 s here)"
    assert died == 1  # by the liveness rule, not by keep-alive
    assert len(results) == 3 and all(r.where == "local" for r in results)  # one result each, run on the board
    assert all(r.top1()[0] == before[0].top1()[0] for r in results)
    with capsys.disabled():
        print(f"\nsilent partition detected after {detected:.2f} s (frames in flight, link measured"
              f"{f', {mbps:g} Mbit/s' if mbps else ''}; the estimate alone would allow {allowance:.2f} s)")


@pytest.mark.parametrize("deadline", [30.0, 1.0])
def test_a_silent_partition_with_frames_in_flight_on_a_never_measured_link(deadline, capsys):
    """The link was never measured (no bandwidth estimate: the allowance is unknown) and frames are in
    flight when the relay starts swallowing every byte: the probe on the path's own connection goes
    unanswered, so the stream is declared dead ``floor`` (1.5 s) after its first frame went out, with
    the frames' deadline far off (30 s) or passing during the suspected partition (1 s: their censored
    samples then give the link a tiny estimate, which must not stretch the wait; 9.0 s was measured so)."""
    loaded, x = digits_input()
    reference = int(loaded.full(x).argmax())

    async def go():
        # 25 ms each way: a result takes at least 50 ms, so the frames are surely in flight at the cut
        async with digits_agent(loaded, LinkShape(0.025), deadline_seconds=deadline) as (agent, proxy):
            stream = agent._streams[proxy.address]
            frames = asyncio.gather(*(agent.infer(x) for _ in range(3)))
            await until(lambda: stream._live.outstanding, 10.0)
            proxy.blackhole = True
            cut = time.monotonic()
            est = agent.link.links.get(proxy.address)
            never_measured = est is None or not est.bandwidth.samples
            detected = await until(lambda: not stream.is_open, 15.0)
            results = await asyncio.wait_for(frames, 30.0)
            return never_measured, results, detected, deaths(agent, reason="no_progress"), deaths(agent), \
                time.monotonic() - cut

    never_measured, results, detected, by_rule, total, _ = asyncio.run(go())
    assert never_measured
    assert by_rule == 1 and total == 1  # by the liveness rule, not by keep-alive (11 s)
    assert detected < 3.0, f"detected after {detected:.2f} s (the rule: 1.5 s after the first frame went out)"
    assert len(results) == 3 and [r.where for r in results] == ["local"] * 3  # one result each, on the board
    assert all(r.top1()[0] == reference for r in results)
    with capsys.disabled():
        print(f"\nsilent partition, frames in flight on a never-measured link, deadline {deadline:g} s: "
              f"detected after {detected:.2f} s")


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
    hint[0] = (1_000.0, 0.0)  # a censored sample taken during the stall: the allowance keeps the last progress's
    assert live.allowance() == 1.5 and live.verdict()
    never = Liveness(lambda: (0.0, 0.0), LivenessOptions(path_probes=False), clock=lambda: now[0], path=True)
    never.sent(1, 3_000)
    now[0] = 200.0  # never measured, no path probes: unknown, so the frames' deadline and keep-alive end it
    assert never.allowance() is None and never.verdict() == "" and not never.wants_path_probe()


def test_a_silent_path_ends_a_busy_stream_at_the_floor_whatever_the_estimate():
    from runtime.wire.liveness import Liveness

    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    live = Liveness(lambda: (0.0, 0.0), clock=clock, path=True)  # never measured
    live.sent(1, 400_000)
    now[0] = 0.4
    assert not live.wants_path_probe()
    now[0] = 0.6
    assert live.wants_path_probe() and live.wants_probe()
    live.path_answered()  # the peer answers on its own connection: alive, the slow frame is waited for
    now[0] = 1.6
    assert live.verdict() == "" and live.allowance() is None
    now[0] = 2.0
    live.path_answered()
    now[0] = 3.45
    assert live.verdict() == ""
    now[0] = 3.6
    assert "no answer on a connection of its own for 1.6s" in live.verdict() and live.reason == "no_progress"
    # a measured slow link (1.6 Mbit/s) with 800 KB outstanding: the estimate allows 6.1 s, the path 1.5 s
    for path, dead_at in ((True, 11.51), (False, 16.1)):
        slow = Liveness(lambda: (200_000.0, 0.0667), clock=clock, path=path)
        now[0] = 10.0
        slow.sent(1, 800_000)
        now[0] = dead_at - 0.05
        assert slow.verdict() == ""
        now[0] = dead_at
        assert slow.verdict(), path
    stalled = Liveness(lambda: (0.0, 0.0), clock=clock, path=True)
    now[0] = 20.0
    stalled.sent(1, 1_000)
    now[0] = 21.6
    stalled.excuse(0.5)  # the sender's loop could not run for 0.5 s: not the peer's silence
    assert stalled.verdict() == "" and stalled.silent() == pytest.approx(1.1)
    now[0] = 22.05
    assert stalled.verdict()
    stalled.excuse(100.0)  # never past now
    assert stalled.stalled() == 0.0


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
            return results, stream.epoch, stream.is_open, agent.link.estimate(proxy.address).bandwidth.value, \
                stream._live.path_answers
        finally:
            await agent.close()
            await proxy.close()
            await ws.drain_and_stop(0.5)

    results, epoch, is_open, bandwidth, path_answers = asyncio.run(go())
    assert [r.where for r in results] == ["edge"] * 5, [r.fallback_reason for r in results]
    assert epoch == 1 and is_open  # never declared dead, never reopened
    assert results[0].wire_bytes > 400_000
    assert path_answers > 0  # the frames' bytes took longer than 0.5 s: the path was asked, and answered
    with capsys.disabled():
        print(f"\n1.6 Mbit/s, {results[0].wire_bytes} B frames: transfer "
              + ", ".join(f"{r.times['transfer_edge']:.2f}" for r in results)
              + f" s, estimate {bandwidth * 8 / 1e6:.2f} Mbit/s, stream kept open ({path_answers} path probes answered)")


@pytest.mark.timeout(180)
def test_frames_queued_longer_than_the_former_10_s_backstop_keep_their_stream(capsys):
    """Six 401 KB frames at once on 1.6 Mbit/s: the last waits about 12 s behind the others, and so does every
    keep-alive ping (and the answer to the worker's) sent meanwhile. Under the former 1 s + 10 s backstop the
    stream ended with "ping timeout" and its frames ran locally; now the path probes vouch for the link."""
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
    split = loaded.split("add_2")  # 401 KB raw, about 2 s at 1.6 Mbit/s
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    async def go():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1))
        proxy = await DelayProxy(f"127.0.0.1:{ws.port}", LinkShape.from_ms_mbps(33.35, 1.6)).start()
        agent = Agent(loaded, InitialPlan(split, get_codec("raw"), worker=proxy.address),
                      AgentOptions(deadline_seconds=60.0, connect_timeout=5.0))
        try:
            await agent.start()
            results = await asyncio.gather(*(agent.infer(x) for _ in range(6)))
            stream = agent._streams[proxy.address]
            return results, stream.epoch, stream.is_open, deaths(agent)
        finally:
            await agent.close()
            await proxy.close()
            await ws.drain_and_stop(0.5)

    results, epoch, is_open, died = asyncio.run(go())
    assert [r.where for r in results] == ["edge"] * 6, [r.fallback_reason for r in results]
    assert epoch == 1 and is_open and died == 0  # never declared dead, never reopened
    last = max(r.times["transfer_edge"] for r in results)
    assert last > 11.0  # the queue really outlasted the former backstop (1 s + 10 s)
    with capsys.disabled():
        print(f"\n6 x {results[0].wire_bytes} B at once on 1.6 Mbit/s: last result after {last:.1f} s, stream kept")
