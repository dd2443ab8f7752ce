"""The planner's hot path for a fleet (issue 15), over real gRPC on loopback: profiles parsed once per
content hash, rankings shared, telemetry in the plan's band recorded without a decision, decisions
coalesced per agent and shed (RESOURCE_EXHAUSTED + retry-after-ms) when the queue is full, and a
worker's unchanged re-registration marking nobody."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import grpc
import pytest
from planner_helpers import (
    DEVICE_PROFILE,
    EDGE_PROFILE,
    FAST,
    MODEL,
    RPC,
    RTT,
    SLOW,
    Planner,
    aio,  # noqa: F401 (fixture)
    check_status,
    next_plan,
    profile,
    rpc_error,
)

from planner.intake import RETRY_AFTER_HEADER
from planner.rankcache import Bands
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

pytestmark = pytest.mark.timeout(60)


def sample(p: Planner, name: str, labels: dict | None = None) -> float:
    return p.ps.service.metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def register_agent(p: Planner, agent: str, text: str = DEVICE_PROFILE, workers=()) -> pb.Plan:
    reply = await p.stub.RegisterAgent(pb.RegisterAgentRequest(agent_id=agent, model_id=MODEL, model_digest="w1",
                                                               profile_json=text, workers=list(workers)), timeout=RPC)
    return reply.plan


async def report(p: Planner, agent: str, bw: float, rtt: float = RTT, sent: float | None = None) -> int:
    async def messages():
        yield pb.Telemetry(agent_id=agent, worker="w1", bandwidth_bytes_per_second=bw, rtt_seconds=rtt,
                           sent_unix=time.time() if sent is None else sent)

    return (await p.stub.ReportTelemetry(messages(), timeout=RPC)).received


async def drained(p: Planner) -> None:
    intake = p.ps.service.replanner.intake
    for _ in range(500):
        if not len(intake):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(intake)} agents still wait for a decision")


class Blocked:
    """The re-planner's one search thread held: a decision that needs a search waits until released."""

    def __init__(self, p: Planner):
        self.event = threading.Event()
        p.ps.service.replanner.executor.submit(self.event.wait, 30)

    def release(self) -> None:
        self.event.set()


def test_profile_is_parsed_once_per_content_and_bad_ones_are_refused_every_time(aio, tmp_path):  # noqa: F811
    async def scenario():
        p = await Planner.start(tmp_path / "p.sqlite")
        try:
            await p.register("a1")  # worker w1 (one edge profile) and a1 (one device profile)
            svc = p.ps.service
            assert (svc.profiles.misses, len(svc.profiles)) == (2, 2)
            ranked_before = svc.replanner.rank_cache.misses
            for aid in ("a2", "a3"):
                await register_agent(p, aid)
            assert svc.profiles.misses == 2 and svc.profiles.hits >= 2  # the same document: not parsed again
            a1, a2, a3 = (svc.agents[a] for a in ("a1", "a2", "a3"))
            assert a1.benchmark is a2.benchmark is a3.benchmark  # one parsed profile per board type
            assert a2.record.profile is a3.record.profile  # and one copy of its text
            assert svc.replanner.rank_cache.misses == ranked_before  # same profile, constraints, link: one ranking
            assert sample(p, "edgesplit_planner_profile_cache_lookups_total", {"result": "miss"}) == 2
            bad = DEVICE_PROFILE.replace('"seconds": 0.02', '"seconds": -0.02', 1)
            for _ in range(2):  # an invalid document is never kept: refused again, with the same message
                err = await rpc_error(register_agent(p, "bad", bad))
                check_status(err, grpc.StatusCode.INVALID_ARGUMENT, r"profile_json: blocks/0/seconds: .* minimum of 0")
            too_deep = '{"format": "edgesplit-profile", "version": 1, "x": ' + "[" * 20 + "]" * 20 + "}"
            check_status(await rpc_error(register_agent(p, "bad", too_deep)), grpc.StatusCode.INVALID_ARGUMENT,
                         "nested deeper than 8")  # the strict limits of a new document still hold
            other = profile("board2", "device", seconds=(0.03, 0.02, 0.02, 0.02, 0.01))
            await register_agent(p, "a4", other)
            assert svc.profiles.misses == 3 and svc.agents["a4"].benchmark is not a1.benchmark
        finally:
            await p.stop()

    aio.run(scenario())


def test_bands_rank_at_grid_figures_and_keep_powers_of_ten():
    b = Bands(0.05, 0.0005)
    assert b.bandwidth_of(1e7) == 1e7 and b.bandwidth_of(1e6) == 1e6  # anchored at powers of ten
    assert b.bandwidth_of(1.01e7) == b.bandwidth_of(0.995e7) == 1e7  # one band
    assert b.bandwidth_of(1.2e7) != 1e7 and abs(b.bandwidth_of(1.2e7) / 1.2e7 - 1) < 0.025
    assert b.rtt_of(0.0052) == pytest.approx(0.005) and b.rtt_of(0.0) == 0.0
    exact = Bands(0.0, 0.0)
    assert exact.bandwidth_of(1.234e6) == 1.234e6 and exact.rtt_of(0.00123) == 0.00123


def test_in_band_telemetry_makes_no_decision_and_out_of_band_does(aio, tmp_path):  # noqa: F811
    async def scenario():
        # no rate limit: a report within 10 ms of the last decided one would be left to the periodic
        # pass, which records no decision latency (the count below would then flake)
        p = await Planner.start(tmp_path / "p.sqlite", telemetry_max_rate_hz=1e6)
        try:
            first = await p.register("a1")  # no link measured yet: no bands in the plan
            assert not first.fallbacks
            watch = p.stub.WatchPlan(pb.WatchPlanRequest(agent_id="a1", known_version=first.version), timeout=RPC)
            await report(p, "a1", FAST)  # the first measured link: the same configuration; its band ranked here
            await drained(p)
            basis = p.ps.service.replanner._basis["a1"]
            assert basis.version == first.version and basis.low < FAST < basis.high
            decisions = sample(p, "edgesplit_planner_decision_latency_seconds_count")
            changes = sum(sample(p, "edgesplit_planner_plan_changes_total", {"reason": r}) for r in ("telemetry",))
            for bw in (FAST * 1.03, FAST * 0.99, FAST * 1.2):  # jitter inside the running plan's band
                await report(p, "a1", bw)
            await drained(p)
            st = p.ps.service.agents["a1"]
            assert st.links["w1"].bandwidth_bytes_per_second == FAST * 1.2  # recorded all the same
            assert sample(p, "edgesplit_planner_telemetry_in_band_total") == 3
            assert sample(p, "edgesplit_planner_decision_latency_seconds_count") == decisions  # no decision
            assert not st.dirty and st.plan.version == first.version
            assert sum(sample(p, "edgesplit_planner_plan_changes_total", {"reason": r}) for r in ("telemetry",)) == changes
            await report(p, "a1", SLOW)  # out of the band: decided, and (after the hold) a new plan
            new = await next_plan(watch)
            assert new.split_id == "output" and new.version > first.version and new.fallbacks
            assert sample(p, "edgesplit_planner_decision_latency_seconds_count") > decisions
            watch.cancel()
        finally:
            await p.stop()

    aio.run(scenario())


def test_reports_for_a_queued_agent_are_coalesced_latest_wins(aio, tmp_path):  # noqa: F811
    async def scenario():
        p = await Planner.start(tmp_path / "p.sqlite", hold_seconds=30.0, telemetry_max_rate_hz=1e6)
        try:
            await p.register("a1")
            before = sample(p, "edgesplit_planner_decision_latency_seconds_count")
            blocked = Blocked(p)
            try:
                await report(p, "a1", SLOW)  # out of band: queued, its search waits for the thread
                for bw in (2e6, 3e6, 4e6):  # while it is decided: coalesced into one more decision
                    await report(p, "a1", bw)
                intake = p.ps.service.replanner.intake
                assert len(intake) == 1 and intake.entries["a1"].again
                assert sample(p, "edgesplit_planner_telemetry_coalesced_total") == 3
                assert sample(p, "edgesplit_planner_telemetry_pending") == 1
            finally:
                blocked.release()
            await drained(p)
            assert sample(p, "edgesplit_planner_decision_latency_seconds_count") - before == 2  # not 4
            assert p.ps.service.agents["a1"].links["w1"].bandwidth_bytes_per_second == 4e6  # the latest
        finally:
            await p.stop()

    aio.run(scenario())


def test_full_queue_sheds_with_resource_exhausted_and_retry_after_and_old_reports_are_dropped(aio, tmp_path):  # noqa: F811
    async def scenario():
        p = await Planner.start(tmp_path / "p.sqlite", telemetry_max_pending=1, hold_seconds=30.0)
        try:
            await p.register("a1")
            await register_agent(p, "a2")
            blocked = Blocked(p)
            try:
                await report(p, "a1", SLOW)  # fills the queue (its decision waits for the search thread)
                err = await rpc_error(report(p, "a2", SLOW))
                check_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, r"telemetry_max_pending.*report again in \d+ ms")
                retry = dict(err.trailing_metadata() or ())
                assert 100 <= int(retry[RETRY_AFTER_HEADER]) <= 30_000, retry
                assert sample(p, "edgesplit_planner_telemetry_shed_total", {"reason": "full"}) == 1
                assert p.ps.service.agents["a2"].links == {}  # refused: not recorded either
                assert await report(p, "a1", 2e6) == 1  # the queued agent is never refused: coalesced
            finally:
                blocked.release()
            await drained(p)
            assert await report(p, "a2", SLOW) == 1  # room again
            assert await report(p, "a2", FAST, sent=time.time() - 120) == 1  # two minutes old: dropped, counted
            assert sample(p, "edgesplit_planner_telemetry_shed_total", {"reason": "stale"}) == 1
            assert p.ps.service.agents["a2"].links["w1"].bandwidth_bytes_per_second == SLOW
        finally:
            await p.stop()

    aio.run(scenario())


def test_unchanged_worker_re_registration_marks_nobody_a_changed_one_only_its_agents(aio, tmp_path):  # noqa: F811
    async def scenario():
        p = await Planner.start(tmp_path / "p.sqlite", replan_interval_seconds=30.0)
        try:
            await p.register("a1")
            await register_agent(p, "a2", workers=("w2",))  # may not use w1
            svc = p.ps.service
            held = svc.workers["w1"].profiles
            misses = svc.profiles.misses
            request = pb.RegisterWorkerRequest(worker_id="w1", address="127.0.0.1:50051", tier="edge",
                                               profiles_json=[EDGE_PROFILE])
            await p.stub.RegisterWorker(request, timeout=RPC)
            assert svc.workers["w1"].profiles is held and svc.profiles.misses == misses  # nothing parsed
            assert not any(st.dirty for st in svc.agents.values()) and not len(svc.replanner.intake)
            decided: list[str] = []
            decide = svc.replanner.decide

            async def recording(st):
                decided.append(st.record.id)
                await decide(st)

            svc.replanner.decide = recording  # what the periodic pass decides
            request.address = "127.0.0.1:50052"  # moved: its agents are re-planned, the others are not
            await p.stub.RegisterWorker(request, timeout=RPC)
            for _ in range(200):
                if svc.agents["a1"].plan.worker_address == request.address:
                    break
                await asyncio.sleep(0.01)
            assert svc.agents["a1"].plan.worker_address == request.address
            assert decided == ["a1"]  # a2 may not use w1: not marked
            assert svc.workers["w1"].profiles is held and svc.profiles.misses == misses  # the same documents
        finally:
            await p.stop()

    aio.run(scenario())


def test_owner_quota_counts_only_that_owners_live_bindings():
    from planner.owners import Owners
    from runtime.contracts.errors import Overloaded
    from runtime.daemon.auth import ANONYMOUS

    now = [0.0]
    owners = Owners(10.0, 2, clock=lambda: now[0])
    for i in range(500):  # many other callers: their bindings are not counted for "a" (nor scanned)
        owners.claim("agent", f"x{i}", ANONYMOUS, f"lease-{i}")
    owners.claim("agent", "a1", ANONYMOUS, "a")
    owners.claim("agent", "a2", ANONYMOUS, "a")
    with pytest.raises(Overloaded, match="holds 2 registrations"):
        owners.claim("agent", "a3", ANONYMOUS, "a")
    owners.release("agent", "a1")
    owners.claim("agent", "a3", ANONYMOUS, "a")  # released: room again
    now[0] = 11.0  # every binding lapsed
    owners.claim("agent", "a2", ANONYMOUS, "b")  # a lapsed id goes to another caller, off a's count
    owners.claim("agent", "a4", ANONYMOUS, "a")
    owners.claim("agent", "a5", ANONYMOUS, "a")  # a's old bindings lapsed: they count for nothing
    key = lambda lease: "lease:" + hashlib.sha256(lease.encode()).hexdigest()  # noqa: E731 (an owner's key)
    assert owners.held(key("a"), now[0]) == 2 and owners.held(key("b"), now[0]) == 1
    assert "x1" in owners.expired("agent") and owners.held(key("lease-1"), now[0]) == 0


def test_in_band_rules():
    from planner.hysteresis import Hysteresis
    from planner.inband import Basis, in_band

    h = Hysteresis(0.10, 0.002, 3.0)
    plan = pb.Plan(version=3, worker_id="w1", predicted_seconds=0.100, predicted_bytes=100_000)
    b = Basis(3, "w1", 0.005, 1e7, 5e6, 2e7)
    assert in_band(plan, b, "w1", 1.5e7, 0.005, h)  # faster, inside the band
    assert in_band(plan, b, "w1", 9e6, 0.0052, h)  # slower by 1.1 ms < half the 10 ms threshold
    assert not in_band(plan, b, "w1", 6e6, 0.005, h)  # slower by 6.7 ms: another worker could pass it
    assert not in_band(plan, b, "w1", 2.5e7, 0.005, h)  # out of the band
    assert not in_band(plan, b, "w1", 1.5e7, 0.010, h)  # RTT moved
    assert not in_band(plan, b, "w2", 1.5e7, 0.005, h)  # another worker's link
    assert not in_band(pb.Plan(version=4), b, "w1", 1.5e7, 0.005, h)  # a newer plan: its own band


def test_gc_freeze_from_the_threshold_and_at_each_tenth_of_growth():
    import gc

    from planner.gcfreeze import SETTLE_SECONDS, GcFreezer

    assert not GcFreezer(0).check(10**6)  # 0: never
    now = [0.0]
    f = GcFreezer(1000, clock=lambda: now[0])
    thresholds = gc.get_threshold()
    try:
        assert not f.check(999)
        assert f.check(1000) and gc.get_freeze_count() > 0
        assert gc.get_threshold()[:2] == thresholds[:2] and gc.get_threshold()[2] > 10**6  # a ramp: full scans held off
        assert not f.check(1099) and f.check(1100) and f.freezes == 2
        assert not f.check(1209) and f.check(1210) and f.freezes == 3
        now[0] = SETTLE_SECONDS - 1
        assert not f.check(1210) and gc.get_threshold()[2] > 10**6  # still growing, perhaps
        now[0] = SETTLE_SECONDS + 1
        assert not f.check(1210) and gc.get_threshold() == thresholds  # the ramp is over: the collector's own again
    finally:
        gc.unfreeze()  # the test process's objects back under the collector
        gc.set_threshold(*thresholds)


def test_registration_gate_runs_a_few_queues_some_and_refuses_the_rest_with_a_retry_after():
    from planner.intake import MIN_RETRY_MS, Gate, Shed

    async def main():
        gate = Gate(running=1, waiting=1)
        release = asyncio.Event()
        order: list[str] = []

        async def register(name: str) -> None:
            async with gate.turn():
                order.append(name)
                await release.wait()

        first = asyncio.create_task(register("a"))
        second = asyncio.create_task(register("b"))
        await asyncio.sleep(0.01)
        assert order == ["a"]  # one at a time: b waits its turn
        with pytest.raises(Shed) as ei:
            async with gate.turn():
                pass
        assert ei.value.retry_after_ms >= MIN_RETRY_MS and "register again" in str(ei.value)
        release.set()
        await asyncio.gather(first, second)
        assert order == ["a", "b"]
        async with gate.turn():  # room again
            pass

    asyncio.run(main())


def test_fallback_entries_are_lean_but_keep_what_the_agent_switches_to():
    from planner.fallbacks import lean

    entry = pb.Plan(agent_id="a1", model_id="m", reason="fallback for 1-2 MB/s", created_unix=5.0, predicted_fps=9.0,
                    predicted_bytes=7, predicted_seconds=0.02, split_id="b3", split_index=3, codec="int8+lz4", tl_id="t",
                    worker_id="w1", worker_address="10.0.0.5:1", end_split="b9", end_split_index=9)
    entry.breakdown_seconds["device"] = 0.01
    entry.next_hops.add(worker_id="w2", address="10.0.0.6:1")
    kept = pb.Plan()
    kept.CopyFrom(entry)
    lean(entry)
    assert not (entry.agent_id or entry.model_id or entry.reason or entry.created_unix or entry.predicted_fps)
    for name in ("predicted_seconds", "predicted_bytes", "split_id", "split_index", "codec", "tl_id", "worker_id", "worker_address",
                 "end_split", "end_split_index", "breakdown_seconds", "next_hops"):
        assert getattr(entry, name) == getattr(kept, name), name
    assert len(entry.SerializeToString()) < len(kept.SerializeToString())
