"""The planner's link estimates (issue 11): an unmeasured link is unknown, never a default and never
offloaded to; an assumption is never stored as a measurement; a measurement ages out after
``link_ttl_seconds``, also one read back from the store after a restart."""

from __future__ import annotations

import itertools
import time

import pytest
from planner_helpers import EDGE_PROFILE, FAST, RTT, SLOW, Planner, expected_seconds, next_plan

from planner.fallbacks import GRID
from planner.store import LinkRecord, Store
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

pytestmark = pytest.mark.timeout(60)

UNKNOWN = {"default_bandwidth_bytes_per_second": 0.0}  # the shipped default: no assumed bandwidth


async def _query(planner: Planner) -> list[str]:
    reply = await planner.stub.QueryPlan(pb.PlanQuery(agent_id="a1", top_n=6), timeout=10.0)
    return [c.split_id for c in reply.candidates]


def test_an_unmeasured_link_is_not_offloaded_to_until_measured(aio, tmp_path):
    async def scenario():
        p = await Planner.start(tmp_path / "p.sqlite", **UNKNOWN)
        try:
            plan = await p.register()
            assert (plan.split_id, plan.worker_id) == ("output", "")  # w1 is registered, its link unknown
            assert await _query(p) == ["output"]
            watch = p.stub.WatchPlan(pb.WatchPlanRequest(agent_id="a1"), timeout=10.0)
            assert (await next_plan(watch)).version == plan.version
            await p.telemetry(0.0, rtt=RTT)  # an RTT alone says nothing about bandwidth
            assert await _query(p) == ["output"]
            await p.telemetry(FAST)  # measured: now the hand-computed best cut
            new = await next_plan(watch)
            assert (new.split_id, new.worker_id) == ("conv2", "w1")
            watch.cancel()
        finally:
            await p.stop()
        # nothing assumed was stored: the record holds the measured figures only
        store = Store(str(tmp_path / "p.sqlite"))
        try:
            lk = store.links()["a1"]["w1"]
            assert (lk.rtt_seconds, lk.bandwidth_bytes_per_second) == (RTT, FAST)
        finally:
            store.close()

    aio.run(scenario())


def test_rtt_only_telemetry_stores_no_bandwidth(aio, tmp_path):
    async def scenario():
        p = await Planner.start(tmp_path / "p.sqlite", **UNKNOWN)
        try:
            await p.register()
            await p.telemetry(0.0, rtt=RTT)
            await p.agents()  # a round trip after the telemetry: it was taken
        finally:
            await p.stop()
        store = Store(str(tmp_path / "p.sqlite"))
        try:
            lk = store.links()["a1"]["w1"]
            assert lk.bandwidth_bytes_per_second == 0.0 and lk.rtt_seconds == RTT  # not 100 Mbit/s
        finally:
            store.close()

    aio.run(scenario())


@pytest.mark.parametrize("age, offloads", [(30.0, True), (1000.0, False)])
def test_a_stored_estimate_is_trusted_after_a_restart_only_within_the_ttl(aio, tmp_path, age, offloads):
    db = tmp_path / "p.sqlite"

    async def first():
        p = await Planner.start(db, **UNKNOWN)
        try:
            await p.register()
            await p.telemetry(FAST)
        finally:
            await p.stop()

    async def second():
        p = await Planner.start(db, link_ttl_seconds=600.0, **UNKNOWN)
        try:
            return await _query(p)
        finally:
            await p.stop()

    aio.run(first())
    store = Store(str(db))
    try:
        store.put_link("a1", "w1", LinkRecord(RTT, FAST, time.time() - age))
    finally:
        store.close()
    split_ids = aio.run(second())
    assert (split_ids[0] == "conv2") is offloads
    assert (split_ids == ["output"]) is not offloads


def test_an_old_figure_in_telemetry_is_not_fresh(aio, tmp_path):
    """The agent reports how old its estimate is; one older than the TTL is no measurement."""
    async def scenario():
        p = await Planner.start(tmp_path / "p.sqlite", link_ttl_seconds=60.0, **UNKNOWN)
        try:
            await p.register()

            async def messages():
                yield pb.Telemetry(agent_id="a1", worker="w1", bandwidth_bytes_per_second=FAST, rtt_seconds=RTT,
                                   bandwidth_age_seconds=120.0, bandwidth_samples=9, sent_unix=time.time())

            await p.stub.ReportTelemetry(messages(), timeout=10.0)
            assert await _query(p) == ["output"]
        finally:
            await p.stop()

    aio.run(scenario())


def test_each_plan_carries_fallback_plans_by_bandwidth_band(aio, tmp_path):
    """The table's bands hold, at every grid bandwidth, the hand-computed best cut at that bandwidth."""

    async def scenario():
        p = await Planner.start(tmp_path / "p.sqlite", **UNKNOWN)
        try:
            await p.register()
            watch = p.stub.WatchPlan(pb.WatchPlanRequest(agent_id="a1"), timeout=10.0)
            await next_plan(watch)
            await p.telemetry(FAST)
            plan = await next_plan(watch)
            watch.cancel()
            return plan
        finally:
            await p.stop()

    plan = aio.run(scenario())
    assert plan.split_id == "conv2" and plan.band_worker_address == "127.0.0.1:50051"
    bands = list(plan.fallbacks)
    assert bands[0].min_bandwidth_bytes_per_second == 0 and bands[-1].max_bandwidth_bytes_per_second == 0
    for a, b in itertools.pairwise(bands):
        assert a.max_bandwidth_bytes_per_second == b.min_bandwidth_bytes_per_second  # contiguous
    for factor in GRID:
        bw = FAST * factor
        band = next(b for b in bands if b.min_bandwidth_bytes_per_second <= bw
                    and (not b.max_bandwidth_bytes_per_second or bw < b.max_bandwidth_bytes_per_second))
        best = min(range(6), key=lambda a, bw=bw: expected_seconds(a, bw))  # cut after `a` blocks; 5 = local
        assert band.plan.split_index == best, (factor, band.plan.split_id, best)
        assert (band.plan.worker_id == "") is (best == 5)
    assert bands[0].plan.split_id == "output"  # a collapsed link: local


def test_a_periodic_re_registration_does_not_overwrite_the_reason(aio, tmp_path):
    """Telemetry shows a slower link; while the switch is on hold the worker re-registers unchanged
    (as it does every 30 s): the new plan is still a telemetry change, and counted as one."""

    async def scenario():
        p = await Planner.start(tmp_path / "p.sqlite", hold_seconds=0.5, **UNKNOWN)
        try:
            await p.register()
            watch = p.stub.WatchPlan(pb.WatchPlanRequest(agent_id="a1"), timeout=10.0)
            await next_plan(watch)
            await p.telemetry(FAST)
            fast = await next_plan(watch)
            await p.telemetry(SLOW)
            for _ in range(3):  # unchanged re-registrations during the hold
                await p.stub.RegisterWorker(pb.RegisterWorkerRequest(
                    worker_id="w1", address="127.0.0.1:50051", tier="edge", profiles_json=[EDGE_PROFILE]), timeout=10.0)
            slow = await next_plan(watch)
            watch.cancel()
            changes = p.ps.service.metrics.registry.get_sample_value
            return fast, slow, changes("edgesplit_planner_plan_changes_total", {"reason": "worker"})
        finally:
            await p.stop()

    fast, slow, by_worker = aio.run(scenario())
    assert fast.split_id == "conv2" and slow.split_id == "output"
    assert slow.reason.startswith("telemetry"), slow.reason
    assert not by_worker
