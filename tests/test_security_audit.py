"""Findings of the control plane's security audit (SECURITY.md): each test is a real planner on
loopback, driven through its gRPC stub, showing a caller refused what it must not do."""

from __future__ import annotations

import time

import grpc
import pytest
from planner_helpers import (
    DEVICE_PROFILE,
    EDGE_PROFILE,
    MODEL,
    OWNER,
    RPC,
    STRANGER,
    agent_request,
    check_status,
    rpc_error,
    worker_request,
)

from planner.config import PlannerConfig
from planner.server import serve
from runtime.proto.edgesplit.v1 import planner_pb2 as pb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as pb_grpc
from runtime.wire.security import SecurityOptions
from runtime.wire.transport import TransportOptions
from tests.postgres_server import postgres  # noqa: F401 - the fixture
from tests.security_site import site  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(120)

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
        shed = planner.ps.service.metrics.registry.get_sample_value
        assert shed("edgesplit_planner_streams_shed_total", {"stream": "WatchPlan", "reason": "oldest_ended"}) == 3
        assert shed("edgesplit_planner_streams_shed_total", {"stream": "telemetry", "reason": "oldest_ended"}) == 0

    aio.run(go())


def _as(site, stem: str) -> TransportOptions:  # noqa: F811 - site is the fixture's value
    return TransportOptions(security=SecurityOptions(ca_file=str(site / "ca.pem"), cert_file=str(site / f"{stem}.pem"),
                                                     key_file=str(site / f"{stem}.key")))


def test_a_replica_takes_no_lease_for_a_caller_that_does_not_own_the_agent(aio, site, postgres):  # noqa: F811
    """With replicas, every agent RPC first attaches the agent to the replica it reached (its lease and
    rows read from the shared store; a free or lapsed lease taken). That must come after the caller's
    right to the id: agent a2 naming a1 moves no lease, loads nothing, and is refused."""
    store = postgres.new_database()
    mtls = dict(ca_file=str(site / "ca.pem"), cert_file=str(site / "worker-w1.pem"), key_file=str(site / "worker-w1.key"))

    async def replica(name: str):
        return await serve(PlannerConfig(listen="127.0.0.1:0", store=store, replica_id=name,
                                         default_bandwidth_bytes_per_second=10_000_000.0, **mtls))

    async def go():
        first = await replica("r1")
        async with _as(site, "worker-w1").aio_channel(f"127.0.0.1:{first.port}") as ch:
            await pb_grpc.PlannerStub(ch).RegisterWorker(worker_request(), timeout=RPC)
        async with _as(site, "agent-a1").aio_channel(f"127.0.0.1:{first.port}") as ch:
            assert (await pb_grpc.PlannerStub(ch).RegisterAgent(agent_request(), timeout=RPC)).plan.version > 0
        await first.drain_and_stop(1.0)  # a clean stop frees a1's lease: the next replica may take it over
        second = await replica("r2")
        try:
            async with _as(site, "agent-a2").aio_channel(f"127.0.0.1:{second.port}") as ch:
                s = pb_grpc.PlannerStub(ch)
                err = await rpc_error(s.WatchPlan(pb.WatchPlanRequest(agent_id="a1"), timeout=RPC).read())
                check_status(err, grpc.StatusCode.PERMISSION_DENIED, "only for its own agent id")

                async def one():
                    yield pb.Telemetry(agent_id="a1", worker="w1", bandwidth_bytes_per_second=1.0, sent_unix=time.time())

                err = await rpc_error(s.ReportTelemetry(one(), timeout=RPC))
                check_status(err, grpc.StatusCode.PERMISSION_DENIED, "only for its own agent id")
                for call in (s.ReportPlanStatus(pb.PlanStatus(agent_id="a1", version=1, applied=False), timeout=RPC),
                             s.QueryPlan(pb.PlanQuery(agent_id="a1"), timeout=RPC),
                             s.ListProbeTargets(pb.ProbeTargetsRequest(agent_id="a1"), timeout=RPC)):
                    check_status(await rpc_error(call), grpc.StatusCode.PERMISSION_DENIED, "only for its own agent id")
            service = second.service
            assert "a1" not in service.agents and service.replica.takeovers == 0  # nothing attached for a2's calls
            # the owner's own call still attaches it here (its lease was free)
            async with _as(site, "agent-a1").aio_channel(f"127.0.0.1:{second.port}") as ch:
                plans = pb_grpc.PlannerStub(ch).WatchPlan(pb.WatchPlanRequest(agent_id="a1"), timeout=RPC)
                assert (await plans.read()).version > 0
                plans.cancel()
            assert "a1" in service.agents and service.replica.takeovers == 1
        finally:
            await second.drain_and_stop(1.0)

    aio.run(go())


def test_a_refusal_never_echoes_an_unbounded_client_string(aio, site, tmp_path):  # noqa: F811
    """An authenticated agent naming a 1 MB agent_id is refused PERMISSION_DENIED with a short message
    (the id cut, as check_id cuts it): the status details are a trailer, and neither they nor the log line
    may carry the client's megabyte back."""
    mtls = dict(ca_file=str(site / "ca.pem"), cert_file=str(site / "worker-w1.pem"), key_file=str(site / "worker-w1.key"))

    async def go():
        handle = await serve(PlannerConfig(listen="127.0.0.1:0", db=str(tmp_path / "p.sqlite"), **mtls))
        try:
            async with _as(site, "agent-a2").aio_channel(f"127.0.0.1:{handle.port}") as ch:
                s = pb_grpc.PlannerStub(ch)
                huge = "x" * 2**20
                for call in (s.ReportPlanStatus(pb.PlanStatus(agent_id=huge, version=1), timeout=RPC),
                             s.QueryPlan(pb.PlanQuery(agent_id=huge), timeout=RPC),
                             s.WatchPlan(pb.WatchPlanRequest(agent_id=huge), timeout=RPC).read()):
                    err = await rpc_error(call)
                    check_status(err, grpc.StatusCode.PERMISSION_DENIED, "only for its own agent id")
                    assert len(err.details()) < 1024, len(err.details())
        finally:
            await handle.drain_and_stop(1.0)

    aio.run(go())


def test_status_details_are_cut_at_the_cap_for_every_daemon():
    """The one error-to-status mapping (runtime.contracts.errors.to_status) cuts what any message echoes."""
    from runtime.contracts.errors import MAX_STATUS_CHARS, InvalidInput, to_status

    code, details = to_status(InvalidInput("bad id " + "y" * 10**6))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(details) <= MAX_STATUS_CHARS and details.startswith("bad id yyy") and "characters cut" in details
    assert to_status(InvalidInput("short"))[1] == "short"


def test_refused_registrations_hold_no_id_binding(aio, planner):
    """An id is bound to its caller before the registration's work (planner.owners); a registration then
    refused must not keep the binding: on a loopback planner each new lease is a new owner, so refused
    registrations under fresh ids and leases grew the bindings without bound (max_agents never applies:
    nothing is registered). A registered agent's binding stays when its re-registration is refused."""
    async def go():
        s = planner.stub
        owners = planner.ps.service.owners
        for i in range(40):
            lease = (("edgesplit-lease", f"junk-{i:04d}-" + "z" * 32),)
            bad = pb.RegisterAgentRequest(agent_id=f"junk{i}", model_id=MODEL, profile_json="{}")
            check_status(await rpc_error(s.RegisterAgent(bad, timeout=RPC, metadata=lease)),
                         grpc.StatusCode.INVALID_ARGUMENT, "profile")
            bad_worker = pb.RegisterWorkerRequest(worker_id=f"junkw{i}", address="127.0.0.1:50051", profiles_json=["{}"])
            check_status(await rpc_error(s.RegisterWorker(bad_worker, timeout=RPC, metadata=lease)),
                         grpc.StatusCode.INVALID_ARGUMENT, "profile")
        assert len(owners.bindings) == 0, len(owners.bindings)
        await s.RegisterWorker(worker_request(), timeout=RPC, metadata=OWNER)
        await s.RegisterAgent(agent_request(), timeout=RPC, metadata=OWNER)
        bad = pb.RegisterAgentRequest(agent_id="a1", model_id=MODEL, profile_json="{}")
        await rpc_error(s.RegisterAgent(bad, timeout=RPC, metadata=OWNER))
        assert set(owners.bindings) == {("worker", "w1"), ("agent", "a1")}
        err = await rpc_error(s.RegisterAgent(agent_request(), timeout=RPC, metadata=STRANGER))
        check_status(err, grpc.StatusCode.PERMISSION_DENIED, "registered by another caller")

    aio.run(go())


def test_plan_queries_waiting_for_the_search_executor_are_bounded(aio, planner):
    """QueryPlan ranks at the query's exact link figures (no cache across different figures) in the one
    search thread every decision of every agent uses: a caller firing queries must not queue searches
    without bound ahead of those decisions. With the search thread held busy, at most QUERIES_RUNNING +
    QUERIES_WAITING queries are taken; the rest are refused at once, RESOURCE_EXHAUSTED with
    retry-after-ms; the taken ones are answered once the thread is free."""
    import asyncio
    import threading

    from planner.servicer import QUERIES_RUNNING, QUERIES_WAITING

    async def go():
        s = planner.stub
        await s.RegisterWorker(worker_request(), timeout=RPC, metadata=OWNER)
        await s.RegisterAgent(agent_request(), timeout=RPC, metadata=OWNER)
        release = threading.Event()
        busy = planner.ps.service.replanner.ranker.executor.submit(release.wait, RPC)
        n = QUERIES_RUNNING + QUERIES_WAITING + 12
        calls = [s.QueryPlan(pb.PlanQuery(agent_id="a1", bandwidth_bytes_per_second=1e6 + i, top_n=1),
                             timeout=RPC, metadata=OWNER) for i in range(n)]
        codes = {call: asyncio.ensure_future(call.code()) for call in calls}
        done, _ = await asyncio.wait(codes.values(), timeout=2.0)  # the refused end at once, the thread still held
        refused = [call for call, code in codes.items() if code in done]
        assert len(refused) == n - QUERIES_RUNNING - QUERIES_WAITING, len(refused)
        for call in refused:
            assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queries" in await call.details()
            assert any(k == "retry-after-ms" for k, _ in await call.trailing_metadata())
        release.set()
        busy.result(RPC)
        answered = [await c for c in calls if c not in refused]
        assert len(answered) == QUERIES_RUNNING + QUERIES_WAITING and all(len(r.candidates) == 1 for r in answered)

    aio.run(go())


def test_a_model_name_from_the_wire_never_imports_a_file_on_the_planner(aio, planner, tmp_path):
    """The planner loads a model to take its geometry for a parallel stage (planner.parallel_push). The name
    comes from the agent's and workers' profiles: a name like 'path/to/file.py:factory' (a user model, as
    runtime.models.get_spec reads it) imported and ran that file on the planner's host. Only bundled models
    are loaded there; any other name gets no parallel stage, and the plan is issued as before."""
    import json

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('imported')\n\ndef build():\n    return None\n")
    model = f"{evil}:build"
    assert len(model) <= 128

    def renamed(text: str) -> str:
        doc = json.loads(text)
        doc["model"] = model
        return json.dumps(doc)

    async def go():
        s = planner.stub
        for wid, port in (("w1", 50051), ("w2", 50052)):
            await s.RegisterWorker(pb.RegisterWorkerRequest(worker_id=wid, address=f"127.0.0.1:{port}", tier="edge",
                                                            profiles_json=[renamed(EDGE_PROFILE)]),
                                   timeout=RPC, metadata=OWNER)
        reply = await s.RegisterAgent(pb.RegisterAgentRequest(agent_id="a1", model_id=model, model_digest="w1",
                                                              profile_json=renamed(DEVICE_PROFILE)),
                                      timeout=RPC, metadata=OWNER)
        assert reply.plan.version > 0 and not reply.plan.parallel.worker_addresses
        await planner.ps.service.tick()
        assert not marker.exists(), "the planner imported a file named by a model id from the wire"

    aio.run(go())


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_plan_history_kept_per_agent_is_bounded(backend, tmp_path, request):
    """Every plan issued is a row of the store's plan history; an agent that keeps plans changing (refusing
    each plan the planner pushes, flapping telemetry) grew it without end. The store keeps the newest
    MAX_PLAN_HISTORY plans per agent, and always the newest one not refused (the plan it runs after a restart)."""
    from planner.store import MAX_PLAN_HISTORY, REFUSED, Store

    store = Store(str(tmp_path / "p.sqlite") if backend == "sqlite" else request.getfixturevalue("postgres").new_database())
    try:
        kept = store.issue_plan(pb.Plan(agent_id="a1", split_id="conv2", reason="registration"))
        store.set_plan_status("a1", kept.version, "applied")
        other = store.issue_plan(pb.Plan(agent_id="a2", split_id="conv1", reason="registration"))
        for _ in range(MAX_PLAN_HISTORY + 40):  # a1 refuses every plan after its first
            p = store.issue_plan(pb.Plan(agent_id="a1", split_id="output", reason="refused before"))
            store.set_plan_status("a1", p.version, REFUSED, "no")
        history = store.history("a1", limit=10 * MAX_PLAN_HISTORY)
        assert len(history) == MAX_PLAN_HISTORY + 1  # the newest MAX_PLAN_HISTORY, and the one it runs
        assert store.current_plan("a1").plan.version == kept.version
        assert store.plan("a2", other.version) is not None  # another agent's history is its own
    finally:
        store.close()


@pytest.mark.parametrize("address", ["evil\nINFO planner: forged line:80", "host name:50051", "h\x00st:50051",
                                     "unix:/run/x.sock\nforged", "unix:/run/x y.sock", "[::1]x:80", "exa$mple.com:80"])
def test_a_worker_address_is_a_host_and_port_or_a_socket_path(aio, planner, address):
    """A worker's address is pushed to every agent placed on it, which dials it, and written to the planner's
    log: control characters, spaces and other characters no host name holds are refused INVALID_ARGUMENT
    (a newline forged log lines)."""
    async def go():
        err = await rpc_error(planner.stub.RegisterWorker(worker_request(address=address), timeout=RPC, metadata=OWNER))
        check_status(err, grpc.StatusCode.INVALID_ARGUMENT, "HOST:PORT")
        assert "w1" not in planner.ps.service.workers

    aio.run(go())


@pytest.mark.parametrize("address", ["10.0.0.5:50051", "edge-1.plant.example:443", "[::1]:50051", "[fe80::1%eth0]:50051",
                                     "unix:/run/edgesplit/worker.sock", "localhost:1"])
def test_ordinary_worker_addresses_are_accepted(aio, planner, address):
    async def go():
        await planner.stub.RegisterWorker(worker_request(address=address), timeout=RPC, metadata=OWNER)
        assert planner.ps.service.workers["w1"].record.address == address

    aio.run(go())


def test_an_id_with_a_trailing_newline_is_refused(aio, planner):
    """check_id's pattern ended in '$', which also matches before a final newline: 'w1\\n' was a valid id."""
    async def go():
        for address in ("127.0.0.1:50051", "edge\n:50051"):
            err = await rpc_error(planner.stub.RegisterWorker(worker_request("w1\n", address), timeout=RPC, metadata=OWNER))
            check_status(err, grpc.StatusCode.INVALID_ARGUMENT, "not a valid id")
        assert not planner.ps.service.workers

    aio.run(go())


def test_registrations_of_one_agent_in_flight_at_once_are_bounded(aio, planner):
    """Registrations wait their turn (2,048 may wait) each holding its request, up to 16 MiB of profile: one
    agent sending its own registration many times at once held all of them (2,048 x 16 MiB). At most
    REGISTRATIONS_PER_AGENT of one agent_id are in flight; more are refused at once, RESOURCE_EXHAUSTED with
    retry-after-ms, and those in flight are answered (the search thread held busy meanwhile: no timing)."""
    import asyncio
    import threading

    from planner.servicer import REGISTRATIONS_PER_AGENT

    async def go():
        s = planner.stub
        await s.RegisterWorker(worker_request(), timeout=RPC, metadata=OWNER)
        release = threading.Event()
        busy = planner.ps.service.replanner.ranker.executor.submit(release.wait, RPC)
        calls = [s.RegisterAgent(agent_request(), timeout=RPC, metadata=OWNER) for _ in range(REGISTRATIONS_PER_AGENT + 4)]
        codes = {call: asyncio.ensure_future(call.code()) for call in calls}
        done, _ = await asyncio.wait(codes.values(), timeout=2.0)
        refused = [call for call, code in codes.items() if code in done]
        assert len(refused) == 4, len(refused)
        for call in refused:
            assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "in flight" in await call.details()
            assert any(k == "retry-after-ms" for k, _ in await call.trailing_metadata())
        release.set()
        busy.result(RPC)
        answered = [await c for c in calls if c not in refused]
        assert len(answered) == REGISTRATIONS_PER_AGENT and all(r.plan.version > 0 for r in answered)
        assert ("agent", "a1") in planner.ps.service.owners.bindings  # the refused ones took nothing from it

    aio.run(go())


def test_registrations_of_one_worker_in_flight_at_once_are_bounded(aio, planner):
    """RegisterWorker has no gate: each call parses its profiles (up to 16 MiB) in a thread, the rest waiting
    with their requests held. At most REGISTRATIONS_PER_WORKER of one worker_id are in flight; more are
    refused at once, RESOURCE_EXHAUSTED with retry-after-ms (the parsing threads held busy: no timing)."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from planner.servicer import REGISTRATIONS_PER_WORKER

    async def go():
        loop = asyncio.get_running_loop()
        release = threading.Event()
        pool = ThreadPoolExecutor(2)
        old = loop._default_executor
        loop.set_default_executor(pool)  # the planner's loop is this test's loop: hold its to_thread pool busy
        held = [pool.submit(release.wait, RPC) for _ in range(2)]
        try:
            s = planner.stub
            calls = [s.RegisterWorker(worker_request(), timeout=RPC, metadata=OWNER)
                     for _ in range(REGISTRATIONS_PER_WORKER + 3)]
            codes = {call: asyncio.ensure_future(call.code()) for call in calls}
            done, _ = await asyncio.wait(codes.values(), timeout=2.0)
            refused = [call for call, code in codes.items() if code in done]
            assert len(refused) == 3, len(refused)
            for call in refused:
                assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "in flight" in await call.details()
            release.set()
            answered = [await c for c in calls if c not in refused]
            assert len(answered) == REGISTRATIONS_PER_WORKER and all(r.profiles == 1 for r in answered)
        finally:
            release.set()
            for f in held:
                f.result(RPC)
            loop._default_executor = old
            pool.shutdown()

    aio.run(go())


def test_an_agents_open_telemetry_streams_are_bounded(aio, site, tmp_path):  # noqa: F811
    """A ReportTelemetry stream is a call and a task at the planner from its opening, before any message
    names an agent: an agent opening streams without end (sending nothing) grew them without bound (3,000
    accepted in an exploratory run). An authenticated agent keeps at most TELEMETRY_STREAMS_PER_AGENT; a
    newer one ends its oldest RESOURCE_EXHAUSTED; another agent's streams are its own."""
    import asyncio

    from planner.streams import TELEMETRY_STREAMS_PER_AGENT

    mtls = dict(ca_file=str(site / "ca.pem"), cert_file=str(site / "worker-w1.pem"), key_file=str(site / "worker-w1.key"))

    async def go():
        handle = await serve(PlannerConfig(listen="127.0.0.1:0", db=str(tmp_path / "p.sqlite"), **mtls))
        slots = handle.service.telemetry_streams
        try:
            async with _as(site, "agent-a2").aio_channel(f"127.0.0.1:{handle.port}") as ch, \
                    _as(site, "agent-a1").aio_channel(f"127.0.0.1:{handle.port}") as ch1:
                stop = asyncio.Event()

                async def nothing():
                    await stop.wait()
                    return
                    yield  # an async generator that sends no message

                other = pb_grpc.PlannerStub(ch1).ReportTelemetry(nothing(), timeout=RPC)
                calls = []
                for _ in range(TELEMETRY_STREAMS_PER_AGENT + 2):
                    calls.append(pb_grpc.PlannerStub(ch).ReportTelemetry(nothing(), timeout=RPC))
                    for _ in range(500):  # until the planner holds it (its handler started)
                        if slots.open + slots.ended == len(calls) + 1:
                            break
                        await asyncio.sleep(0.01)
                assert (slots.open, slots.ended) == (TELEMETRY_STREAMS_PER_AGENT + 1, 2)
                assert handle.service.metrics.registry.get_sample_value(
                    "edgesplit_planner_streams_shed_total", {"stream": "telemetry", "reason": "oldest_ended"}) == 2
                for call in calls[:2]:
                    check_status(await rpc_error(call), grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"at most {TELEMETRY_STREAMS_PER_AGENT} telemetry streams")
                assert not other.done() and not any(c.done() for c in calls[2:])
                stop.set()
                for call in (other, *calls[2:]):
                    assert (await call).received == 0
        finally:
            await handle.drain_and_stop(1.0)

    aio.run(go())
