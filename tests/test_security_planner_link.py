"""The agent's own planner session under mTLS (issue 10: "agent and worker -> planner"): a real agent
with its PlannerLink and its agent certificate registers and receives plans from a planner serving
mTLS (the plans name a worker that is not there, so the agent refuses them: what matters here is that
they arrive); the same agent given a CRL that revokes the planner's certificate never calls it (the
planner admits no call from it) and keeps running on its own."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from conftest import REPO, TINY_NET

from planner.config import PlannerConfig
from planner.server import serve as serve_planner
from runtime.agent.planner_link import PlannerLink
from runtime.agent.sources import open_source
from runtime.models.loader import load_model
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as ppb_grpc
from runtime.tools import pki
from runtime.wire.crl import REFUSED
from runtime.wire.transport import TransportOptions
from tests.test_planner_e2e import AGENT, PLANNER, RPC, WORKER, make_agent, make_link, make_profile, until
from tests.test_security import creds

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(120)]


@pytest.fixture()
def planner_site(tmp_path):
    ca = pki.make_ca()
    pki.write(ca, tmp_path, "ca")
    pki.write(pki.issue(ca, "planner", "planner", ("127.0.0.1",)), tmp_path, "planner")
    pki.write(pki.issue(ca, "worker", WORKER), tmp_path, "worker")
    pki.write(pki.issue(ca, "agent", AGENT), tmp_path, "agent")
    pki.revoke(ca, tmp_path / "crl.pem", [])
    pki.revoke(ca, tmp_path / "crl-planner.pem", [(tmp_path / "planner.pem").read_bytes()])
    return tmp_path


def test_the_agents_planner_session_runs_over_mtls_and_refuses_a_revoked_planner(planner_site):
    d = planner_site
    loaded = load_model(str(REPO / TINY_NET))
    frame = next(iter(open_source(loaded.spec, "synthetic", 1))).tensor

    async def session(address, crl: str):
        agent = make_agent(loaded)
        link = make_link(agent, loaded, address)
        transport = TransportOptions(security=creds(d, "agent", crl_file=str(d / crl)))
        link = PlannerLink(agent, dataclasses.replace(link.options, transport=transport))
        try:
            refused_before = REFUSED["revoked"]
            await link.start()
            await until(lambda: link.plans_applied + link.plans_refused > 0 or REFUSED["revoked"] >= refused_before + 2,
                        30, "a plan pushed, or two sessions refused")
            return link.registrations, link.plans_applied + link.plans_refused, (await agent.infer(frame)).where
        finally:
            await link.close()
            await agent.close()

    async def go():
        ps = await serve_planner(PlannerConfig(listen="127.0.0.1:0", db=str(d / "p.sqlite"), ca_file=str(d / "ca.pem"),
                                               cert_file=str(d / "planner.pem"), key_file=str(d / "planner.key"),
                                               crl_file=str(d / "crl.pem"), **PLANNER))
        address = f"127.0.0.1:{ps.port}"
        try:
            async with TransportOptions(security=creds(d, "worker")).aio_channel(address) as ch:
                await ppb_grpc.PlannerStub(ch).RegisterWorker(ppb.RegisterWorkerRequest(
                    worker_id=WORKER, address="127.0.0.1:1", tier="edge",
                    profiles_json=[make_profile(loaded, "edge", WORKER).to_json()]), timeout=RPC)
            planned = await session(address, "crl.pem")
            admitted = ps.daemon.auth.admitted
            refused = await session(address, "crl-planner.pem")
            return planned, refused, ps.daemon.auth.admitted - admitted
        finally:
            await ps.drain_and_stop(1.0)

    (registered, plans, _), (refused_registered, refused_plans, where), admitted = asyncio.run(go())
    assert registered >= 1 and plans >= 1  # registered, planned and pushed over mTLS with the agent's certificate
    assert refused_registered == refused_plans == 0 and admitted == 0  # a revoked planner is never called
    assert where == "local"  # the agent runs on its own meanwhile
