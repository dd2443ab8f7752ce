"""Findings of the control plane's security audit (SECURITY.md): each test is a real planner on
loopback, driven through its gRPC stub, showing a caller refused what it must not do."""

from __future__ import annotations

import grpc
import pytest
from planner_helpers import DEVICE_PROFILE, EDGE_PROFILE, MODEL, RPC, check_status, rpc_error

from runtime.daemon.planner_client import LEASE
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

pytestmark = pytest.mark.timeout(120)

OWNER = LEASE  # what PlannerClient sends: the legitimate processes' lease
STRANGER = (("edgesplit-lease", "s" * 43),)


def worker_request(worker_id="w1", address="127.0.0.1:50051") -> pb.RegisterWorkerRequest:
    return pb.RegisterWorkerRequest(worker_id=worker_id, address=address, tier="edge", profiles_json=[EDGE_PROFILE])


def agent_request(agent_id="a1") -> pb.RegisterAgentRequest:
    return pb.RegisterAgentRequest(agent_id=agent_id, model_id=MODEL, model_digest="w1", profile_json=DEVICE_PROFILE)


def test_probe_targets_of_another_agent_are_refused(aio, planner):
    """ListProbeTargets names the workers an agent may be placed on and its measured bandwidth to each:
    another caller must not read them (as for QueryPlan and WatchPlan)."""
    async def go():
        s = planner.stub
        await s.RegisterWorker(worker_request(), timeout=RPC, metadata=OWNER)
        await s.RegisterAgent(agent_request(), timeout=RPC, metadata=OWNER)
        own = await s.ListProbeTargets(pb.ProbeTargetsRequest(agent_id="a1"), timeout=RPC, metadata=OWNER)
        assert [t.worker_id for t in own.targets] == ["w1"]
        err = await rpc_error(s.ListProbeTargets(pb.ProbeTargetsRequest(agent_id="a1"), timeout=RPC, metadata=STRANGER))
        check_status(err, grpc.StatusCode.PERMISSION_DENIED, "belongs to another caller")

    aio.run(go())


def test_watch_plan_streams_per_agent_are_bounded(aio, planner):
    """Each WatchPlan stream holds a call, a task and a subscription at the planner: one agent opening
    streams without end must not grow it. Beyond MAX_WATCHERS_PER_AGENT the oldest is ended (a
    reconnecting agent's half-open stream is the usual oldest), RESOURCE_EXHAUSTED naming the limit."""
    from planner.broadcaster import MAX_WATCHERS_PER_AGENT

    async def go():
        s = planner.stub
        await s.RegisterWorker(worker_request(), timeout=RPC, metadata=OWNER)
        await s.RegisterAgent(agent_request(), timeout=RPC, metadata=OWNER)
        calls = []
        for _ in range(MAX_WATCHERS_PER_AGENT + 3):
            call = s.WatchPlan(pb.WatchPlanRequest(agent_id="a1"), timeout=RPC, metadata=OWNER)
            assert (await call.read()).version > 0  # subscribed: its first plan came
            calls.append(call)
        assert len(planner.ps.service.broadcaster.watchers("a1")) == MAX_WATCHERS_PER_AGENT
        for call in calls[:3]:  # the three oldest were ended, each with a status that says why
            err = await rpc_error(call.read())
            check_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, f"at most {MAX_WATCHERS_PER_AGENT} WatchPlan streams")
        for call in calls[3:]:
            call.cancel()

    aio.run(go())
