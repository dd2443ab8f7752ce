"""Per-caller limits for callers of a loopback planner without authentication (SECURITY.md): such a caller
is its ``edgesplit-lease`` secret, one per process (runtime.daemon.planner_client), and a process may mint
as many as it likes. That is by design (a fleet simulator runs 10,000 agents each under its own lease,
runtime/measure/fleet/agent.py; one shared key would cap the whole host at --max-ids-per-identity), so a
fresh lease gets a fresh quota; what bounds them all is the planner's totals, checked here."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from planner_helpers import DEVICE_PROFILE, MODEL, RPC, check_status, rpc_error

from planner.config import PlannerConfig
from planner.server import serve
from runtime.proto.edgesplit.v1 import planner_pb2 as pb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)


def _lease(name: str) -> tuple[tuple[str, str], ...]:
    return (("edgesplit-lease", name * 43),)


def _agent(agent_id: str) -> pb.RegisterAgentRequest:
    return pb.RegisterAgentRequest(agent_id=agent_id, model_id=MODEL, model_digest="w1", profile_json=DEVICE_PROFILE)


def test_a_lease_holds_its_quota_a_fresh_lease_its_own_and_the_total_bounds_them_all(tmp_path):
    async def go():
        handle = await serve(PlannerConfig(listen="127.0.0.1:0", db=str(tmp_path / "p.sqlite"),
                                           max_ids_per_identity=2, max_agents=3))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as ch:
                s = pb_grpc.PlannerStub(ch)
                for aid in ("a1", "a2"):
                    await s.RegisterAgent(_agent(aid), timeout=RPC, metadata=_lease("a"))
                check_status(await rpc_error(s.RegisterAgent(_agent("a3"), timeout=RPC, metadata=_lease("a"))),
                             grpc.StatusCode.RESOURCE_EXHAUSTED, "max_ids_per_identity")
                await s.RegisterAgent(_agent("a3"), timeout=RPC, metadata=_lease("b"))  # a fresh lease: its own quota
                check_status(await rpc_error(s.RegisterAgent(_agent("a4"), timeout=RPC, metadata=_lease("c"))),
                             grpc.StatusCode.RESOURCE_EXHAUSTED, "max_agents")  # the total binds every lease
                check_status(await rpc_error(s.RegisterAgent(_agent("a1"), timeout=RPC, metadata=_lease("c"))),
                             grpc.StatusCode.PERMISSION_DENIED, "registered by another caller")  # nor acts for another
                assert set(handle.service.state.agents) == {"a1", "a2", "a3"}
                assert len(handle.service.owners.bindings) == 3  # refused registrations kept no binding
        finally:
            await handle.drain_and_stop(1.0)

    asyncio.run(go())
