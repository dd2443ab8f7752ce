"""The in-band shortcut (planner.inband) trusts a plan's bands only over the bandwidths they were
ranked at: a local plan ranked on a collapsed link (every grid point local: one band from 0 with no
upper bound) must be decided again when the link comes back (test_adaptivity found the agent kept
local for good)."""

from __future__ import annotations

import asyncio
import math

import pytest
from planner_helpers import FAST, RTT, aio, next_plan, planner  # noqa: F401 (fixtures)

from planner.fallbacks import GRID
from planner.hysteresis import Hysteresis
from planner.inband import basis_of, in_band
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

RPC = 10.0
COLLAPSED = 10_000.0  # B/s: every grid point up to x16 (160 kB/s) is best local for the helpers' profiles


def _local_one_band(version: int = 3) -> pb.Plan:
    plan = pb.Plan(version=version, split_id="output", split_index=5, predicted_seconds=0.090)
    plan.fallbacks.append(pb.BandPlan(min_bandwidth_bytes_per_second=0.0, max_bandwidth_bytes_per_second=0.0,
                                      plan=pb.Plan(split_id="output", split_index=5)))
    return plan


def test_a_one_band_table_holds_only_the_ranked_span():
    h = Hysteresis(0.10, 0.002, 3.0)
    plan = _local_one_band()
    b = basis_of(plan, 3, "w1", RTT, COLLAPSED, around=COLLAPSED)
    assert b is not None
    assert (b.low, b.high) == (pytest.approx(COLLAPSED * GRID[0]), pytest.approx(COLLAPSED * GRID[-1]))
    assert in_band(plan, b, "w1", COLLAPSED * 4, RTT, h)  # ranked: still local
    assert not in_band(plan, b, "w1", FAST, RTT, h)  # never ranked there: a worker may win, decide
    assert not in_band(plan, b, "w1", COLLAPSED * GRID[0] / 2, RTT, h)  # below the span too
    assert not b.ranked(FAST) and b.ranked(COLLAPSED)
    assert basis_of(plan, 3, "w1", RTT, COLLAPSED, around=0.0) is None  # span unknown: no shortcut
    assert basis_of(plan, 3, "w1", RTT, FAST, around=COLLAPSED) is None  # measured outside the span
    b2 = basis_of(plan, 3, "w1", RTT, FAST, around=FAST)
    assert b2 is not None and b2.high == pytest.approx(FAST * GRID[-1]) and math.isfinite(b2.high)


def test_a_local_plan_from_a_collapsed_link_offloads_when_the_link_comes_back(aio, planner):  # noqa: F811
    async def scenario():
        await planner.register()
        watch = planner.stub.WatchPlan(pb.WatchPlanRequest(agent_id="a1"), timeout=RPC)
        first = await next_plan(watch)
        await planner.telemetry(FAST)
        offload = first if first.worker_id else await next_plan(watch)
        assert offload.worker_id == "w1"
        await planner.telemetry(COLLAPSED)
        local = await next_plan(watch)
        assert (local.split_id, local.worker_id) == ("output", "")
        assert {b.plan.split_id for b in local.fallbacks} == {"output"}  # one band: 0 .. no bound
        for _ in range(3):  # estimates inside the ranked span: recorded, no decision needed
            await planner.telemetry(COLLAPSED * 1.5)
        replanner = planner.ps.service.replanner
        assert replanner._basis["a1"].ranked(COLLAPSED * 1.5)
        # past the span but still best local (640 kB/s): decided, kept, and its bands ranked around it
        await planner.telemetry(COLLAPSED * 64)
        for _ in range(100):
            b = replanner._basis.get("a1")
            if b is not None and b.ranked(COLLAPSED * 64):
                break
            await asyncio.sleep(0.02)
        assert b is not None and b.version == local.version and b.ranked(COLLAPSED * 64), b
        await planner.telemetry(FAST)  # the link is back
        back = await next_plan(watch, timeout=10.0)
        assert back.worker_id == "w1" and back.version > local.version
        watch.cancel()

    aio.run(scenario())
