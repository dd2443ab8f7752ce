"""Planner authorisation (planner.owners): ids bound to their first registrant, spoofing refused,
expiry, quotas; with leases on a loopback planner and with certificates under mTLS."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from planner_helpers import (
    EDGE_PROFILE,
    OWNER,
    RPC,
    STRANGER,
    Planner,
    agent_request,
    check_status,
    rpc_error,
    worker_request,
)

from planner.config import PlannerConfig
from planner.owners import Owners
from planner.server import serve
from runtime.daemon.auth import ANONYMOUS, Identity
from runtime.proto.edgesplit.v1 import planner_pb2 as pb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as pb_grpc
from runtime.tools import pki
from runtime.wire.security import SecurityOptions
from runtime.wire.transport import TransportOptions

pytestmark = pytest.mark.timeout(120)

def test_worker_id_hijack_is_refused_and_the_plan_keeps_the_real_worker(aio, planner):
    async def go():
        s = planner.stub
        await s.RegisterWorker(worker_request(), timeout=RPC, metadata=OWNER)
        plan = (await s.RegisterAgent(agent_request(), timeout=RPC, metadata=OWNER)).plan
        assert plan.worker_id == "w1" and plan.worker_address == "127.0.0.1:50051"
        for md in (STRANGER, None):  # another lease, or none at all
            err = await rpc_error(s.RegisterWorker(worker_request(address="127.0.0.1:6666"), timeout=RPC, metadata=md))
            check_status(err, grpc.StatusCode.PERMISSION_DENIED, "registered by another caller")
        await planner.ps.service.tick()
        assert planner.ps.service.workers["w1"].record.address == "127.0.0.1:50051"
        current = planner.ps.service.agents["a1"].plan
        assert current.worker_address != "127.0.0.1:6666"
        await s.RegisterWorker(worker_request(), timeout=RPC, metadata=OWNER)  # the owner renews freely

    aio.run(go())


def test_spoofed_agent_telemetry_status_and_watch_are_refused(aio, planner):
    async def go():
        s = planner.stub
        await s.RegisterWorker(worker_request(), timeout=RPC, metadata=OWNER)
        plan = (await s.RegisterAgent(agent_request(), timeout=RPC, metadata=OWNER)).plan

        async def one():
            yield pb.Telemetry(agent_id="a1", worker="w1", bandwidth_bytes_per_second=1.0, rtt_seconds=1.0,
                               sent_unix=time.time())

        err = await rpc_error(s.ReportTelemetry(one(), timeout=RPC, metadata=STRANGER))
        check_status(err, grpc.StatusCode.PERMISSION_DENIED, "belongs to another caller")
        refusal = pb.PlanStatus(agent_id="a1", version=plan.version, applied=False, message="x")
        err = await rpc_error(s.ReportPlanStatus(refusal, timeout=RPC, metadata=STRANGER))
        check_status(err, grpc.StatusCode.PERMISSION_DENIED, "belongs to another caller")
        watch = s.WatchPlan(pb.WatchPlanRequest(agent_id="a1"), timeout=RPC, metadata=STRANGER)
        err = await rpc_error(watch.read())
        check_status(err, grpc.StatusCode.PERMISSION_DENIED, "belongs to another caller")
        err = await rpc_error(s.RegisterAgent(agent_request(), timeout=RPC, metadata=STRANGER))
        check_status(err, grpc.StatusCode.PERMISSION_DENIED, "registered by another caller")
        assert planner.ps.service.agents["a1"].plan.version == plan.version  # nothing changed
        assert planner.ps.service.agents["a1"].record.refused_version != plan.version
        await s.ReportPlanStatus(pb.PlanStatus(agent_id="a1", version=plan.version, applied=True),
                                 timeout=RPC, metadata=OWNER)

    aio.run(go())


def test_bindings_expire_and_quotas_are_per_identity():
    now = [0.0]
    owners = Owners(ttl_seconds=10.0, max_ids_per_identity=2, clock=lambda: now[0])
    owners.claim("worker", "w1", ANONYMOUS, "lease-a")
    owners.claim("worker", "w2", ANONYMOUS, "lease-a")
    with pytest.raises(Exception, match="max_ids_per_identity"):
        owners.claim("worker", "w3", ANONYMOUS, "lease-a")
    owners.claim("worker", "w3", ANONYMOUS, "lease-b")  # another caller has its own quota
    with pytest.raises(Exception, match="another caller"):
        owners.claim("worker", "w1", ANONYMOUS, "lease-b")
    now[0] = 11.0
    assert sorted(owners.expired("worker")) == ["w1", "w2", "w3"]
    owners.claim("worker", "w1", ANONYMOUS, "lease-b")  # free again after its TTL


def test_an_expired_worker_is_dropped_and_no_plan_points_at_it(aio, tmp_path):
    async def go():
        p = await Planner.start(tmp_path / "p.sqlite", registration_ttl_seconds=0.5)
        try:
            s = p.stub
            await s.RegisterWorker(worker_request(), timeout=RPC, metadata=OWNER)
            plan = (await s.RegisterAgent(agent_request(), timeout=RPC, metadata=OWNER)).plan
            assert plan.worker_id == "w1"
            deadline = time.monotonic() + 10.0
            while "w1" in p.ps.service.workers and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert "w1" not in p.ps.service.workers and "w1" not in p.ps.service.store.workers()
            while p.ps.service.agents["a1"].plan.worker_id == "w1" and time.monotonic() < deadline:
                await p.ps.service.tick()
                await asyncio.sleep(0.1)
            assert p.ps.service.agents["a1"].plan.worker_id == ""  # runs on the board, not on a ghost
            await s.RegisterWorker(worker_request(address="127.0.0.1:7777"), timeout=RPC, metadata=STRANGER)  # id free again
        finally:
            await p.stop()

    aio.run(go())


def test_under_mtls_a_worker_registers_only_its_own_id(aio, tmp_path):
    ca = pki.make_ca()
    pki.write(ca, tmp_path, "ca")
    pki.write(pki.issue(ca, "worker", "planner", ("127.0.0.1",)), tmp_path, "planner")
    for role, ident in (("worker", "w1"), ("worker", "w2"), ("agent", "a1"), ("operator", "op")):
        pki.write(pki.issue(ca, role, ident), tmp_path, f"{role}-{ident}")

    def security(stem):
        return SecurityOptions(ca_file=str(tmp_path / "ca.pem"), cert_file=str(tmp_path / f"{stem}.pem"),
                               key_file=str(tmp_path / f"{stem}.key"))

    async def go():
        ps = await serve(PlannerConfig(listen="127.0.0.1:0", db=str(tmp_path / "p.sqlite"),
                                       ca_file=str(tmp_path / "ca.pem"), cert_file=str(tmp_path / "planner.pem"),
                                       key_file=str(tmp_path / "planner.key")))
        try:
            async def call(stem, method, request):
                async with TransportOptions(security=security(stem)).aio_channel(f"127.0.0.1:{ps.port}") as ch:
                    return await getattr(pb_grpc.PlannerStub(ch), method)(request, timeout=RPC)

            await call("worker-w1", "RegisterWorker", worker_request())
            err = await rpc_error(call("worker-w2", "RegisterWorker", worker_request(address="127.0.0.1:6666")))
            check_status(err, grpc.StatusCode.PERMISSION_DENIED, "only for its own worker id 'w2'")
            err = await rpc_error(call("agent-a1", "RegisterWorker", worker_request()))
            check_status(err, grpc.StatusCode.PERMISSION_DENIED, "may be called by")
            await call("agent-a1", "RegisterAgent", agent_request())
            err = await rpc_error(call("agent-a1", "ListAgents", pb.ListAgentsRequest()))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "a1" in {a.agent_id for a in (await call("operator-op", "ListAgents", pb.ListAgentsRequest())).agents}
            assert ps.service.workers["w1"].record.address == "127.0.0.1:50051"
        finally:
            await ps.drain_and_stop(1.0)

    aio.run(go())


def test_identity_rules_of_owners():
    owners = Owners(60.0, 8)
    w1 = Identity("worker", "w1", "cert")
    owners.claim("worker", "w1", w1, "")
    with pytest.raises(Exception, match="only for its own"):
        owners.claim("worker", "w2", w1, "")
    with pytest.raises(Exception, match="only for its own"):
        owners.check("agent", "w1", w1, "")
    owners.claim("worker", "w1", Identity("operator", "op", "token"), "")  # operators act for anyone


def test_a_leaving_worker_is_forgotten_at_once_and_only_its_owner_may_say_so(aio, planner):
    async def go():
        s = planner.stub
        await s.RegisterWorker(worker_request(), timeout=RPC, metadata=OWNER)
        plan = (await s.RegisterAgent(agent_request(), timeout=RPC, metadata=OWNER)).plan
        assert plan.worker_id == "w1"
        leaving = pb.RegisterWorkerRequest(worker_id="w1", leaving=True)
        err = await rpc_error(s.RegisterWorker(leaving, timeout=RPC, metadata=STRANGER))
        check_status(err, grpc.StatusCode.PERMISSION_DENIED, "registered by another caller")
        assert "w1" in planner.ps.service.workers
        await s.RegisterWorker(leaving, timeout=RPC, metadata=OWNER)
        assert "w1" not in planner.ps.service.workers and "w1" not in planner.ps.service.store.workers()
        for _ in range(50):
            await planner.ps.service.tick()
            if planner.ps.service.agents["a1"].plan.worker_id != "w1":
                break
            await asyncio.sleep(0.05)
        assert planner.ps.service.agents["a1"].plan.worker_id == ""

    aio.run(go())


def test_a_real_worker_registers_over_mtls_and_leaves_on_drain(aio, tmp_path):
    """The worker's own planner client carries its certificate (WorkerConfig -> TransportOptions)."""
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve as serve_worker

    ca = pki.make_ca()
    pki.write(ca, tmp_path, "ca")
    pki.write(pki.issue(ca, "planner", "planner", ("127.0.0.1",)), tmp_path, "planner")
    pki.write(pki.issue(ca, "worker", "edge-1", ("127.0.0.1",)), tmp_path, "worker")
    (tmp_path / "edge.json").write_text(EDGE_PROFILE)
    tls = {"ca_file": str(tmp_path / "ca.pem")}

    async def go():
        ps = await serve(PlannerConfig(listen="127.0.0.1:0", db=str(tmp_path / "p.sqlite"), **tls,
                                       cert_file=str(tmp_path / "planner.pem"), key_file=str(tmp_path / "planner.key")))
        ws = await serve_worker(WorkerConfig(
            listen="127.0.0.1:0", planner=f"127.0.0.1:{ps.port}", worker_id="edge-1", profiles=(str(tmp_path / "edge.json"),),
            **tls, cert_file=str(tmp_path / "worker.pem"), key_file=str(tmp_path / "worker.key")))
        try:
            await asyncio.wait_for(ws.registration.registered.wait(), 20.0)
            assert "edge-1" in ps.service.workers
            await ws.drain_and_stop(0.5)
            assert "edge-1" not in ps.service.workers  # it said it leaves
        finally:
            await ps.drain_and_stop(0.5)

    aio.run(go())
