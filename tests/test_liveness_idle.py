"""Liveness of idle and control streams (issue 10 part 6): a silent partition (the project's relay in
blackhole mode: every byte swallowed, no RST) is noticed on an idle agent -> worker stream, on one never
measured, on the agent's planner session and on the worker's planner connection, by default settings;
and the reconnect back-off while the agent runs locally stays within 2 s, jittered. Detection times are
printed (figures, not assertions on speed); the bounds asserted are generous multiples of the rule's own
(1.5 s liveness floor; 1 s + 0.8 s keep-alive on control channels) and far below keep-alive's 70 s on frame channels."""

from __future__ import annotations

import asyncio
import time

import pytest
from liveness_fixtures import StreamMetrics, deaths, digits_agent, digits_input, until

from runtime.contracts.profile import Block, Profile
from runtime.tools.netem import DelayProxy, LinkShape
from runtime.wire.stream import EdgeStream
from runtime.wire.transport import TransportOptions

pytestmark = pytest.mark.timeout(120)

NOTICE_BOUND = 5.0  # seconds: a loaded CI machine's margin over the rules; keep-alive alone takes 70 s on frame channels


def test_an_idle_never_measured_stream_notices_a_silent_partition(capsys):
    """A stream open and idle, its link never measured (no bandwidth estimate): probes on the same
    connection find the partition; keep-alive on frame channels would take 70 s."""
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    async def go():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1))
        proxy = await DelayProxy(f"127.0.0.1:{ws.port}").start()
        metrics = StreamMetrics()
        stream = EdgeStream(proxy.address, TransportOptions(), metrics, connect_timeout=2.0, reconnect=0.5,
                            link_hint=lambda: (0.0, 0.0))
        try:
            await stream._ensure_open()
            await asyncio.sleep(2.0)  # idle, probed: alive
            alive = stream.is_open
            proxy.blackhole = True
            noticed = await until(lambda: not stream.is_open, 15.0)
            return alive, noticed, metrics.deaths
        finally:
            await stream.close()
            await proxy.close()
            await ws.drain_and_stop(0.5)

    alive, noticed, died = asyncio.run(go())
    assert alive, "an idle stream on a live link was declared dead"
    assert died == ["probe_unanswered"], died
    assert noticed < NOTICE_BOUND
    with capsys.disabled():
        print(f"\nidle never-measured stream: silent partition noticed after {noticed:.2f} s (probes; keep-alive: 70 s)")


def test_a_stalled_sender_loop_is_not_taken_for_a_silent_peer(capsys):
    """The agent's own event loop blocked for 2 s (a CPU-starved or busy process): the probe's answer could
    not be read meanwhile, so the time is excused (the watchdog woke late), not counted against the worker;
    the stream, idle or carrying a frame, is kept. Then the relay swallows everything: still noticed."""
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    async def go():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1))
        proxy = await DelayProxy(f"127.0.0.1:{ws.port}").start()
        metrics = StreamMetrics()
        stream = EdgeStream(proxy.address, TransportOptions(), metrics, connect_timeout=2.0, reconnect=0.5)
        try:
            await stream._ensure_open()
            for _ in range(2):
                await asyncio.sleep(0.6)  # a probe is on its way
                time.sleep(2.0)  # the loop cannot run: longer than the 1.5 s floor
            await asyncio.sleep(1.0)
            kept = stream.is_open and stream.epoch == 1 and not metrics.deaths
            excused = stream._live.excused
            proxy.blackhole = True
            noticed = await until(lambda: not stream.is_open, 15.0)
            return kept, excused, noticed, metrics.deaths
        finally:
            await stream.close()
            await proxy.close()
            await ws.drain_and_stop(0.5)

    kept, excused, noticed, died = asyncio.run(go())
    assert kept, f"a stream was declared dead for its own loop's stall ({died})"
    assert excused >= 3.0  # each 2 s stall falls in one watchdog sleep (at most 0.25 s of it was due)
    assert died == ["probe_unanswered"] and noticed < NOTICE_BOUND
    with capsys.disabled():
        print(f"\nsender loop stalled 2 x 2 s: {excused:.2f} s excused, stream kept; a partition then noticed "
              f"after {noticed:.2f} s")


def test_an_idle_measured_agent_stream_notices_and_frames_run_locally(capsys):
    loaded, x = digits_input()

    async def go():
        async with digits_agent(loaded, connect_timeout=0.5) as (agent, proxy):
            before = [await agent.infer(x) for _ in range(3)]
            stream = agent._streams[proxy.address]
            await asyncio.sleep(1.0)  # idle
            proxy.blackhole = True
            noticed = await until(lambda: not stream.is_open, 15.0)
            after = [await agent.infer(x) for _ in range(3)]  # one result each, on the board
            return before, after, noticed, deaths(agent, reason="probe_unanswered"), deaths(agent)

    before, after, noticed, by_probe, total = asyncio.run(go())
    assert [r.where for r in before] == ["edge"] * 3
    assert by_probe == 1 and total == 1
    assert [r.where for r in after] == ["local"] * 3 and after[0].top1()[0] == before[0].top1()[0]
    assert noticed < NOTICE_BOUND
    with capsys.disabled():
        print(f"\nidle measured agent stream: silent partition noticed after {noticed:.2f} s")


def test_reconnect_back_off_is_capped_at_two_seconds_with_jitter():
    """A worker that stays unreachable (a blackholed relay: connections accepted, bytes swallowed): the
    stream retries with delays doubling to at most 2 s, each drawn from [d / 2, d]."""

    async def go():
        proxy = await DelayProxy("127.0.0.1:9").start()  # never reached: the relay swallows everything
        proxy.blackhole = True
        metrics = StreamMetrics()
        stream = EdgeStream(proxy.address, TransportOptions(), metrics, connect_timeout=0.05, reconnect=0.5)
        delays = []
        try:
            for _ in range(12):
                with pytest.raises(Exception, match="unreachable"):
                    await stream._ensure_open()
                delays.append(stream._retry_at - time.monotonic())
                stream._retry_at = 0.0  # try again at once (the test does not wait the delays out)
            return delays
        finally:
            await stream.close()
            await proxy.close()

    delays = asyncio.run(go())
    assert max(delays) <= 2.0, delays
    assert min(delays) >= 0.2, delays  # the first: 0.5 s, jittered down to no less than half
    assert max(delays[4:]) > 1.0  # it did grow to the cap...
    assert len({round(d, 3) for d in delays[4:]}) > 1  # ...and the capped delays are jittered


def _profile(loaded, role: str, machine: str) -> Profile:
    points = loaded.sliced.split_points[1:]
    blocks = tuple(Block(i, sp.name, 0.01 if role == "device" else 0.001, sp.fp32_bytes) for i, sp in enumerate(points))
    return Profile(machine=machine, role=role, model=loaded.name, model_digest=loaded.digest, blocks=blocks,
                   input_bytes=loaded.sliced.split_points[0].fp32_bytes)


def test_the_planner_session_and_the_worker_registration_notice_a_silent_partition(tmp_path, capsys):
    """Agent <-> planner (WatchPlan, telemetry) and worker -> planner: nothing bulky travels on these
    channels, so HTTP/2 keep-alive with a short timeout (1 s + 0.8 s) notices the partition; no RPC."""
    import torch

    from planner.config import PlannerConfig
    from planner.server import serve as serve_planner
    from runtime.agent.client import Agent
    from runtime.agent.config import AgentOptions, InitialPlan
    from runtime.agent.planner_link import PlannerLink, PlannerLinkOptions
    from runtime.daemon.planner_client import PlannerClientOptions
    from runtime.models.loader import load_model
    from runtime.wire.codec import get_codec
    from runtime.worker.registration import PlannerRegistration

    torch.set_num_threads(1)
    loaded = load_model("digits_cnn")

    async def go():
        ps = await serve_planner(PlannerConfig(listen="127.0.0.1:0", db=str(tmp_path / "p.sqlite"), metrics_port=-1))
        # the slow IIoT link of the other tests (1.6 Mbit/s, 66.7 ms RTT): honest, just slow
        to_planner = await DelayProxy(f"127.0.0.1:{ps.port}", LinkShape.from_ms_mbps(33.35, 1.6)).start()
        agent = Agent(loaded, InitialPlan(loaded.split("output"), get_codec("raw")), AgentOptions(agent_id="a1"))
        link = PlannerLink(agent, PlannerLinkOptions(to_planner.address, _profile(loaded, "device", "board"), "a1",
                                                     connect_timeout=1.0, backoff_initial=0.5, backoff_max=2.0))
        reg = PlannerRegistration(PlannerClientOptions(to_planner.address), "w1", "127.0.0.1:1", "edge",
                                  [_profile(loaded, "edge", "w1").to_json()], [], refresh_seconds=60.0)
        worker_deaths: list[str] = []
        reg.died = worker_deaths.append  # the worker server counts these in edgesplit_worker_stream_deaths_total
        try:
            await agent.start()
            await link.start()
            reg.start()
            await until(lambda: link.connected and reg.registered.is_set(), 30.0)
            await asyncio.sleep(4.0)  # idle sessions on a live slow link: kept (pings answered, no GOAWAY)
            kept = link.connected and link.session_deaths == 0 and reg.connection_losses == 0
            to_planner.blackhole = True
            cut = time.monotonic()
            agent_noticed = await until(lambda: not link.connected, 15.0)
            worker_noticed = await until(lambda: reg.connection_losses > 0, 15.0) if not reg.connection_losses \
                else reg.lost_at - cut
            assert worker_deaths == ["connection_lost"], worker_deaths
            return kept, agent_noticed, worker_noticed, deaths(agent, "planner", "keepalive"), link.last_error
        finally:
            await reg.close()
            await link.close()
            await agent.close()
            await to_planner.close()
            await ps.drain_and_stop(0.5)

    kept, agent_noticed, worker_noticed, by_keepalive, error = asyncio.run(go())
    assert kept, "a live planner session was dropped"
    assert by_keepalive == 1, error
    assert agent_noticed < NOTICE_BOUND and worker_noticed < NOTICE_BOUND
    with capsys.disabled():
        print(f"\nsilent partition to the planner noticed after {agent_noticed:.2f} s by the agent's session "
              f"({error}), {worker_noticed:.2f} s by the worker's registration (keep-alive 1 s + 0.8 s)")


def test_a_ping_lost_while_frames_get_through_widens_the_planner_ping_timeout(tmp_path):
    """A planner ping that times out while the agent's frames still get through was queued behind them
    (a busy slow uplink the planner shares with the worker), not a partition: the next session waits twice
    as long for a ping, so a busy uplink does not end a session at each frame; a later keep-alive death with
    no edge result since (a partition) halves it back. (The relay shapes each
    connection apart, so the queueing itself is not emulated: the planner's path is cut, and edge results
    are counted during the cut as a board's frames would be.)"""
    import torch

    from planner.config import PlannerConfig
    from planner.server import serve as serve_planner
    from runtime.agent.client import Agent
    from runtime.agent.config import AgentOptions, InitialPlan
    from runtime.agent.planner_link import PlannerLink, PlannerLinkOptions
    from runtime.models.loader import load_model
    from runtime.wire.codec import get_codec

    torch.set_num_threads(1)
    loaded = load_model("digits_cnn")

    async def go():
        ps = await serve_planner(PlannerConfig(listen="127.0.0.1:0", db=str(tmp_path / "p.sqlite"), metrics_port=-1))
        to_planner = await DelayProxy(f"127.0.0.1:{ps.port}").start()
        agent = Agent(loaded, InitialPlan(loaded.split("output"), get_codec("raw")), AgentOptions(agent_id="a2"))
        link = PlannerLink(agent, PlannerLinkOptions(to_planner.address, _profile(loaded, "device", "board"), "a2",
                                                     connect_timeout=1.0, backoff_initial=0.5, backoff_max=2.0))
        try:
            await agent.start()
            await link.start()
            await until(lambda: link.connected, 30.0)
            first = link.ping_timeout_ms
            to_planner.blackhole = True
            await until(lambda: not link.connected, 15.0)
            agent.metrics.frames.labels("edge").inc()  # results still came back over the worker's link
            to_planner.blackhole = False
            await until(lambda: link.connected and link.registrations == 2, 30.0)
            widened = link.ping_timeout_ms
            to_planner.blackhole = True  # a partition: no edge result while it lasts
            await until(lambda: not link.connected, 15.0)
            to_planner.blackhole = False
            await until(lambda: link.connected and link.registrations == 3, 30.0)
            return first, widened, link.ping_timeout_ms
        finally:
            await link.close()
            await agent.close()
            await to_planner.close()
            await ps.drain_and_stop(0.5)

    first, widened, after = asyncio.run(go())
    assert (first, widened, after) == (800, 1600, 800)  # widened behind frames, halved back after a partition
