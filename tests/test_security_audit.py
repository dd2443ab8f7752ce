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
