"""The agent's telemetry cadence (issue 15): a steady agent reports once per heartbeat, a link that
moves out of its band is reported at once (runtime.agent.telemetry_report.ReportCadence), end to end
with a real planner over gRPC: the step's report reaches it and a new plan comes back."""

from __future__ import annotations

import asyncio
import random
import time
from types import SimpleNamespace

import pytest

from planner.config import PlannerConfig
from planner.server import serve
from runtime.agent.planner_link import PlannerLink, PlannerLinkOptions
from runtime.agent.prober import ProbeOptions
from runtime.agent.telemetry import LinkEstimator
from runtime.agent.telemetry_report import ReportCadence
from runtime.contracts.profile import loads
from runtime.proto.edgesplit.v1 import planner_pb2 as pb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as pb_grpc
from tests.planner_helpers import DEVICE_PROFILE, EDGE_PROFILE, FAST, MODEL, SLOW

pytestmark = pytest.mark.timeout(120)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def run_steady(c: ReportCadence, clock: Clock, seconds: float, bandwidth: float, jitter: float, rng) -> list[str]:
    """Look every 50 ms for ``seconds``, as the planner link does; the reasons of the reports sent."""
    sent = []
    end = clock.t + seconds
    while clock.t < end:
        bw = bandwidth * (1 + jitter * (2 * rng.random() - 1))
        reason = c.due("w:1", bw, frames=3)
        if reason:
            c.sent("w:1", bw, reason, frames=3)
            sent.append(reason)
        clock.t += 0.05
    return sent


def test_a_steady_agent_reports_once_per_heartbeat_and_a_step_at_once():
    clock, rng = Clock(), random.Random(1)
    c = ReportCadence(heartbeat=10.0, min_interval=1.0, clock=clock)
    sent = run_steady(c, clock, 60.5, 10e6, 0.10, rng)  # +-10 % jitter stays inside the +-25 % band
    assert sent[0] == "change"  # the first report goes at once
    assert sent[1:] == ["heartbeat"] * 6  # then one per 10 s, not one per second (61 at the old 1 Hz)
    clock.t += 1.0  # 1.5 s after the last heartbeat
    assert c.due("w:1", 10e6) == ""
    assert c.due("w:1", 10e6 / 4) == "change"  # a step (4x down) is due at once, not at the next heartbeat
    c.sent("w:1", 10e6 / 4, "change")
    assert c.due("w:1", 10e6) == ""  # never two within min_interval, even for another step
    clock.t += 1.0
    assert c.due("w:1", 10e6) == "change" and c.wait_seconds("w:1", 10e6) == 0.0


def test_what_counts_as_moved():
    clock = Clock()
    c = ReportCadence(heartbeat=10.0, min_interval=0.5, clock=clock)
    c.sent("w:1", 1e6, "change", frames=0)
    assert not c.moved("w:1", 1.2e6) and c.moved("w:1", 1.3e6) and c.moved("w:1", 0.7e6)
    assert c.moved("w:2", 1e6)  # another worker's link
    assert c.moved("w:1", 0.0)  # became unknown
    assert c.moved("w:1", 1e6, frames=5)  # frames run again after a report that had none
    c.set_bands("w:1", (0.0, 1.1e6, 5e6))  # the running plan's fallback bands on this link
    assert c.moved("w:1", 1.15e6)  # inside +-25 %, but in the plan's next band
    assert not c.moved("w:1", 1.05e6)
    assert c.wait_seconds("w:1", 1.05e6) == 10.0  # nothing moved: sleep until the heartbeat
    with pytest.raises(ValueError):
        ReportCadence(heartbeat=0.0)


class StubAgent:
    """What PlannerLink needs of an agent, without a model: it applies every plan at once."""

    def __init__(self):
        self.agent_id = "board-1"
        self.loaded = SimpleNamespace(name=MODEL, digest="w1")
        self.link = LinkEstimator()
        self.plan_version = self.telemetry_plan_version = 0
        self.codec = SimpleNamespace(name="raw")
        self.active = SimpleNamespace(worker="", split=SimpleNamespace(name="output"), codec=self.codec)
        self.tl, self.tl_dir = None, ""
        self.metrics = SimpleNamespace(band_switches=SimpleNamespace(labels=lambda *_: SimpleNamespace(inc=lambda: None)))

    async def apply_plan(self, split, codec, tl, version, address, *, model_id="", end_split="", next_hops=(),
                         fallback=False):
        self.active = SimpleNamespace(worker=address or "", split=SimpleNamespace(name=str(split)),
                                      codec=SimpleNamespace(name=codec if isinstance(codec, str) else codec.name))
        if not fallback:
            self.plan_version = version
        self.telemetry_plan_version = 0 if fallback else version  # a fallback entry has no version of its own

    async def probe_rtt(self, timeout):
        self.link.add_rtt_sample(0.002, self.active.worker or WORKER_ADDRESS)


WORKER_ADDRESS = "127.0.0.1:1"  # registered, never dialled (the stub agent runs no frames)


async def until(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_a_real_planner_hears_a_step_at_once_and_heartbeats_otherwise(tmp_path):
    heartbeat = 1.5

    async def scenario():
        ps = await serve(PlannerConfig(listen="127.0.0.1:0", db=str(tmp_path / "p.sqlite"), metrics_port=-1,
                                       hold_seconds=0.0))
        agent = StubAgent()
        rng = random.Random(2)

        def feed(level: float) -> None:
            agent.link.add_bandwidth_sample(level * (1 + 0.05 * (2 * rng.random() - 1)), WORKER_ADDRESS)

        link = PlannerLink(agent, PlannerLinkOptions(
            f"127.0.0.1:{ps.port}", loads(DEVICE_PROFILE), "board-1", telemetry_interval_seconds=0.05,
            telemetry_heartbeat_seconds=heartbeat, rpc_timeout=5.0, connect_timeout=2.0, backoff_initial=0.1,
            probe=ProbeOptions(budget_fraction=0.0)))
        try:
            async with __import__("grpc").aio.insecure_channel(f"127.0.0.1:{ps.port}") as channel:
                await pb_grpc.PlannerStub(channel).RegisterWorker(pb.RegisterWorkerRequest(
                    worker_id="w1", address=WORKER_ADDRESS, tier="edge", profiles_json=[EDGE_PROFILE]), timeout=10)
            for _ in range(5):
                feed(FAST)
            await link.start()
            await until(lambda: agent.active.worker == WORKER_ADDRESS, 20, "an offloading plan at FAST")
            # steady: samples every 50 ms within +-5 %; reports only at the heartbeat
            sent, changes = link.telemetry_sent, link.cadence.changes
            t0 = time.monotonic()
            while time.monotonic() - t0 < 3 * heartbeat + 0.2:
                feed(FAST)
                await asyncio.sleep(0.05)
            steady = link.telemetry_sent - sent
            assert link.cadence.changes == changes  # nothing moved
            assert 2 <= steady <= 4, steady  # ~3 heartbeats in 4.7 s (the 0.05 s interval alone: ~90)
            # a step down: reported at once (a change, before the next heartbeat), and a new plan comes back
            version, sent, changes = agent.plan_version, link.telemetry_sent, link.cadence.changes
            for _ in range(3):
                feed(SLOW)
                await asyncio.sleep(0.02)
            await until(lambda: link.telemetry_sent > sent, heartbeat, "the step's report")
            assert link.cadence.changes > changes
            await until(lambda: agent.plan_version > version, 10, "a new plan after the step")
        finally:
            await link.close()
            await ps.drain_and_stop(1.0)

    asyncio.run(scenario())


class SheddingPlanner(pb_grpc.PlannerServicer):
    """A planner that sheds the first telemetry stream (RESOURCE_EXHAUSTED, retry-after-ms) and takes
    the rest; registrations and plan streams are counted."""

    RETRY_AFTER_MS = 300

    def __init__(self):
        self.registrations = 0
        self.shed_at: float | None = None
        self.reports: list[float] = []  # monotonic arrival of every report taken

    async def RegisterAgent(self, request, context):
        self.registrations += 1
        return pb.RegisterAgentReply()

    async def WatchPlan(self, request, context):
        await asyncio.Event().wait()
        yield pb.Plan()  # never reached

    async def ReportTelemetry(self, request_iterator, context):
        import grpc

        async for _ in request_iterator:
            if self.shed_at is None:
                self.shed_at = time.monotonic()
                context.set_trailing_metadata((("retry-after-ms", str(self.RETRY_AFTER_MS)),))
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "decision queue full")
            self.reports.append(time.monotonic())
        return pb.TelemetryAck(received=len(self.reports))


def test_a_shed_report_waits_retry_after_and_keeps_the_session():
    import grpc

    async def scenario():
        server = grpc.aio.server()
        fake = SheddingPlanner()
        pb_grpc.add_PlannerServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        agent = StubAgent()
        for _ in range(3):
            agent.link.add_bandwidth_sample(FAST, WORKER_ADDRESS)
        link = PlannerLink(agent, PlannerLinkOptions(
            f"127.0.0.1:{port}", loads(DEVICE_PROFILE), "board-1", telemetry_interval_seconds=0.05,
            telemetry_heartbeat_seconds=0.2, rpc_timeout=5.0, connect_timeout=2.0, backoff_initial=0.1,
            probe=ProbeOptions(budget_fraction=0.0)))
        try:
            await link.start()
            await until(lambda: len(fake.reports) >= 2, 10, "reports after the shed")
        finally:
            await link.close()
            await server.stop(None)
        return fake, link

    fake, link = asyncio.run(scenario())
    assert link.telemetry_shed == 1 and fake.registrations == 1  # the session stayed: no re-registration
    assert fake.reports[0] - fake.shed_at >= SheddingPlanner.RETRY_AFTER_MS / 1e3 - 0.01  # waited as asked
