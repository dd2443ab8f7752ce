"""The planner's stale-telemetry gauge (behind EdgesplitPlannerTelemetryStale) counts connected
agents only: an agent that left must not hold the alert on forever."""

from __future__ import annotations

import asyncio

import pytest
from planner_helpers import FAST, RPC, Planner

from runtime.proto.edgesplit.v1 import planner_pb2 as pb


@pytest.mark.timeout(60)
def test_telemetry_age_counts_only_agents_watching_their_plan(aio, tmp_path):
    async def scenario():
        p = await Planner.start(tmp_path / "p.sqlite", replan_interval_seconds=30.0)  # ticks only when called
        service = p.ps.service
        gauge = service.metrics.telemetry_age_seconds
        try:
            await p.register()
            assert await p.telemetry(FAST) == 1
            await asyncio.sleep(0.3)
            await service.replanner.tick()
            assert gauge._value.get() == 0.0  # the agent sent telemetry but does not watch: not counted
            call = p.stub.WatchPlan(pb.WatchPlanRequest(agent_id="a1"), timeout=RPC)
            await asyncio.wait_for(call.read(), RPC)  # the current plan: the watch is open
            await service.replanner.tick()
            connected = gauge._value.get()
            call.cancel()
            for _ in range(100):  # bounded: until the broadcaster has dropped the watcher
                if not service.broadcaster.watchers("a1"):
                    break
                await asyncio.sleep(0.02)
            await service.replanner.tick()
            gone = gauge._value.get()
        finally:
            await p.stop()
        return connected, gone

    connected, gone = aio.run(scenario())
    assert connected >= 0.3 and gone == 0.0
