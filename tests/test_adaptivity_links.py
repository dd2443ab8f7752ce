"""Unknown is unknown (issue 11 (d)): a link whose bandwidth was measured but whose RTT never was is not
costed with the configured default RTT; the planner offloads to it once its RTT is measured."""

from __future__ import annotations

import pytest
from planner_helpers import FAST, RPC, RTT, Planner, expected_seconds

from runtime.proto.edgesplit.v1 import planner_pb2 as pb

pytestmark = pytest.mark.timeout(60)


def test_a_measured_bandwidth_without_a_measured_rtt_is_not_offloaded_to(aio, tmp_path):
    async def scenario():
        # no bandwidth assumed; the default RTT (5 ms here) must not stand in for an unmeasured one
        p = await Planner.start(tmp_path / "planner.sqlite", default_bandwidth_bytes_per_second=0.0)
        try:
            v1 = await p.register()
            assert v1.split_id == "output"  # nothing measured: local
            await p.telemetry(FAST, rtt=0.0)
            st = p.ps.service.agents["a1"]
            assert p.ps.service.state.link(st, "w1") is None
            q = await p.stub.QueryPlan(pb.PlanQuery(agent_id="a1", top_n=6), timeout=RPC)
            assert [c.split_id for c in q.candidates] == ["output"]
            await p.telemetry(FAST, rtt=RTT)
            lk = p.ps.service.state.link(st, "w1")
            assert (lk.rtt_seconds, lk.bandwidth_bytes_per_second) == (RTT, FAST)
            q = await p.stub.QueryPlan(pb.PlanQuery(agent_id="a1", top_n=1), timeout=RPC)
            assert (q.candidates[0].split_id, q.candidates[0].predicted_seconds) == ("conv2", pytest.approx(
                expected_seconds(2, FAST)))
        finally:
            await p.stop()

    aio.run(scenario())


def test_the_assumed_link_keeps_its_assumed_rtt(aio, tmp_path):
    async def scenario():
        p = await Planner.start(tmp_path / "planner.sqlite")  # default bandwidth FAST, default RTT 5 ms
        try:
            v1 = await p.register()
            assert v1.split_id == "conv2" and v1.predicted_seconds == pytest.approx(expected_seconds(2, FAST))
        finally:
            await p.stop()

    aio.run(scenario())
