"""The planner's store on both engines (SQLite file, PostgreSQL started by the test), the
write-behind batch, leases, and what a killed planner keeps.

PostgreSQL tests skip with the reason where no server can be started (tests/postgres_server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time

import grpc
import pytest
from prometheus_client import CollectorRegistry

from planner.store import (
    REFUSED,
    AgentRecord,
    LeaseLost,
    LinkRecord,
    SpeedRecord,
    Store,
    StoreError,
    WorkerRecord,
    profile_hash,
)
from planner.store_sql import open_backend, redact
from planner.writebehind import WriteBehind
from runtime.proto.edgesplit.v1 import planner_pb2 as pb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as pb_grpc
from tests.planner_helpers import DEVICE_PROFILE, EDGE_PROFILE, MODEL, RPC
from tests.planner_procs import kill, start_planner
from tests.postgres_server import postgres  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(120)

ENGINES = ("sqlite", "postgresql")


@pytest.fixture(params=ENGINES)
def where(request, tmp_path) -> str:
    """A fresh, empty store location on each engine."""
    if request.param == "sqlite":
        return str(tmp_path / "s.sqlite")
    return request.getfixturevalue("postgres").new_database()


def _fill(s: Store) -> None:
    s.put_worker(WorkerRecord("w1", "10.0.0.5:50051", "edge", ("tl-1",), {MODEL: EDGE_PROFILE}, 1.0, 2.0,
                              ("10.0.0.9:50052",)))
    s.put_agent(AgentRecord("a1", MODEL, "w1", DEVICE_PROFILE, ("w1",), ("tl-1",),
                            pb.Constraints(min_fidelity=0.9, exclude_workers=["w9"]), 1.0, 2.0))
    s.put_link("a1", "w1", LinkRecord(0.004, 2.5e6, 1700000000.123456))
    s.put_speed("a1", SpeedRecord(2.5, 7, 3.0))


def test_same_store_behaviour_on_both_engines(where):
    s = Store(where)
    try:
        _fill(s)
        p1 = s.issue_plan(pb.Plan(agent_id="a1", split_id="conv2", reason="registration",
                                  next_hops=[pb.PlanHop(worker_id="w2", address="10.0.0.9:50052")]))
        p2 = s.issue_plan(pb.Plan(agent_id="a1", split_id="output", reason="telemetry"))
        assert (p1.version, p2.version) == (1, 2) and s.last_version() == 2
        assert s.set_plan_status("a1", 2, REFUSED, "no")
        assert not s.set_plan_status("a1", 7, REFUSED, "no")
    finally:
        s.close()
    s = Store(where)  # everything read back from a new connection
    try:
        w = s.workers()["w1"]
        assert (w.address, w.tl_ids, w.profiles, w.next_tiers) == ("10.0.0.5:50051", ("tl-1",), {MODEL: EDGE_PROFILE},
                                                                   ("10.0.0.9:50052",))
        assert s.workers("w1").keys() == {"w1"} and s.workers("nope") == {}
        a = s.agents()["a1"]
        assert (a.workers, a.constraints.min_fidelity, list(a.constraints.exclude_workers)) == (("w1",), 0.9, ["w9"])
        assert (a.refused_version, a.refused_message) == (2, "no")
        assert s.links()["a1"]["w1"] == LinkRecord(0.004, 2.5e6, 1700000000.123456)  # doubles, not 4-byte floats
        assert s.speeds() == {"a1": SpeedRecord(2.5, 7, 3.0)}
        cur = s.current_plan("a1")
        assert cur is not None and cur.plan.version == 1 and cur.plan.next_hops[0].address == "10.0.0.9:50052"
        assert s.current_plans()["a1"].plan.version == 1
        assert [h.plan.version for h in s.history("a1")] == [2, 1]
        assert s.plan("a1", 2).status == REFUSED
        assert s.issue_plan(pb.Plan(agent_id="a2")).version == 3  # the counter only increases
        s.delete_worker("w1")
        assert s.workers() == {}
    finally:
        s.close()


def test_a_newer_schema_is_refused_with_a_clear_error(where):
    s = Store(where)
    with s.backend.transaction():
        s.backend.execute("UPDATE schema_version SET version = 99")
    s.close()
    with pytest.raises(StoreError, match="schema 99 is not 3; use the edgesplit version that wrote it"):
        Store(where)


def test_device_profiles_are_stored_once_by_content_hash(where):
    other = DEVICE_PROFILE.replace('"machine"', '"machine" ', 1)  # another document (one more space)
    assert other != DEVICE_PROFILE
    s = Store(where)
    try:
        for k in range(5):
            s.put_agent(AgentRecord(f"a{k}", MODEL, "w1", DEVICE_PROFILE if k < 4 else other, (), (), pb.Constraints(),
                                    1.0, 2.0))
        s.put_agent(AgentRecord("a0", MODEL, "w1", DEVICE_PROFILE, (), (), pb.Constraints(), 1.0, 3.0))  # again
        assert s.backend.execute("SELECT COUNT(*) FROM profiles").fetchone()[0] == 2  # 5 agents, 2 documents
        stored = {r[0] for r in s.backend.execute("SELECT profile FROM agents")}
        assert stored == {profile_hash(DEVICE_PROFILE), profile_hash(other)}  # the rows hold hashes, not texts
        agents = s.agents()
        assert [agents[f"a{k}"].profile for k in range(5)] == [DEVICE_PROFILE] * 4 + [other]  # read back as text
        assert s.agents("a4")["a4"].profile == other
    finally:
        s.close()
    again = Store(where)  # a new connection (its own cache of written hashes): still one row per document
    try:
        again.put_agent(AgentRecord("a9", MODEL, "w1", other, (), (), pb.Constraints(), 1.0, 2.0))
        assert again.backend.execute("SELECT COUNT(*) FROM profiles").fetchone()[0] == 2
        assert again.agents("a9")["a9"].profile == other
    finally:
        again.close()


def test_a_schema_2_store_is_migrated_to_one_profile_row_per_document(where):
    s = Store(where)  # made at schema 3, then turned into what schema 2 wrote: the text in every agent row
    with s.backend.transaction():
        for k in range(3):
            s.backend.execute("INSERT INTO agents (id, model, digest, profile, workers, tl_ids, constraints, registered, "
                              "last_seen) VALUES (?,?,?,?,?,?,?,?,?)",
                              (f"a{k}", MODEL, "w1", DEVICE_PROFILE, "[]", "[]", "{}", 1.0, 2.0))
        s.backend.execute("DELETE FROM profiles")
        s.backend.execute("UPDATE schema_version SET version = 2")
    s.close()
    s = Store(where)
    try:
        assert s.backend.execute("SELECT version FROM schema_version").fetchone()[0] == 3
        assert s.backend.execute("SELECT COUNT(*) FROM profiles").fetchone()[0] == 1
        assert {r[0] for r in s.backend.execute("SELECT profile FROM agents")} == {profile_hash(DEVICE_PROFILE)}
        assert [a.profile for a in s.agents().values()] == [DEVICE_PROFILE] * 3
    finally:
        s.close()


def test_leases_on_both_engines(where):
    s = Store(where)
    try:
        assert s.acquire_lease("a1", "r1", 5.0, take=False) == ("", 0.0)
        holder, left = s.acquire_lease("a1", "r2", 5.0, take=False)  # held: r2 does not get it
        assert holder == "r1" and 4.0 < left <= 5.0
        assert s.leases()["a1"][0] == "r1"
        assert s.renew_leases("r1", 5.0) == {"a1"} and s.renew_leases("r2", 5.0) == set()
        s.issue_plan(pb.Plan(agent_id="a1"), fence=("r1", 5.0))
        assert s.acquire_lease("a1", "r2", 5.0, take=True)[0] == "r1"  # a registration takes it
        with pytest.raises(LeaseLost, match="attached to another planner replica"):
            s.issue_plan(pb.Plan(agent_id="a1"), fence=("r1", 5.0))
        assert s.last_version() == 1  # the fenced plan was not written
        s.acquire_lease("a2", "r1", 0.05, take=False)
        time.sleep(0.1)  # the lease's own expiry, on the database's clock
        holder, left = s.acquire_lease("a2", "r2", 5.0, take=False)
        assert holder == "r1" and left < 0  # lapsed: taken over
        assert s.leases()["a2"][0] == "r2"
        s.release_leases("r2")
        assert s.leases() == {}
    finally:
        s.close()


def test_write_behind_writes_n_link_updates_in_one_transaction(where, request):
    """1,000 link estimates (latest of each kept) + heartbeats -> exactly one transaction (on PostgreSQL
    both batches are large enough to go through COPY, a few heartbeats would not)."""
    s = Store(where)
    _fill(s)
    for k in range(2, 101):  # agents a1..a100
        s.put_agent(AgentRecord(f"a{k}", MODEL, "w1", DEVICE_PROFILE, (), (), pb.Constraints(), 1.0, 2.0))
    statements: list[str] = []

    def trace(store: Store) -> None:  # on the store thread: what its connection executes from now on
        if store.backend.name == "sqlite":
            store.backend.connection.set_trace_callback(statements.append)

    def xid() -> int:
        return s.backend.execute("SELECT txid_current()").fetchone()[0]

    registry = CollectorRegistry()

    async def main():
        wb = WriteBehind(s, registry)
        try:
            await wb.flush(trace)
            before = xid() if s.backend.name == "postgresql" else 0
            for i in range(1000):
                wb.put_link("a1", f"w{i % 100}", LinkRecord(0.001, 1e6 + i, 1000.0 + i))
                wb.touch(f"a{i % 100 + 1}", 5.0 + i)
            await wb.flush()
            after = xid() if s.backend.name == "postgresql" else 0
            return wb.stats, after - before - 1  # txid_current() itself takes one
        finally:
            await wb.close()

    stats, pg_transactions = asyncio.run(main())
    assert stats.flushes == 1 and stats.rows == 200  # 100 links (the latest of each) + 100 heartbeats
    assert registry.get_sample_value("edgesplit_planner_store_flush_rows") == 200
    assert registry.get_sample_value("edgesplit_planner_store_flush_seconds_count") == 1
    if s.backend.name == "sqlite":
        begins = [x for x in statements if x.startswith("BEGIN")]
        assert begins == ["BEGIN IMMEDIATE"] and statements.count("COMMIT") == 1, statements[:5]
    else:
        assert pg_transactions == 1
    links = s.links()["a1"]
    assert len(links) == 100 and links["w7"] == LinkRecord(0.001, 1e6 + 907, 1907.0)  # the latest sample won
    agents = s.agents()
    assert agents["a1"].last_seen == 905.0 and agents["a100"].last_seen == 1004.0  # the latest heartbeat of each
    s.close()


def test_a_failed_flush_keeps_its_batch_under_newer_values(tmp_path):
    s = Store(tmp_path / "s.sqlite")
    _fill(s)

    async def main():
        wb = WriteBehind(s)
        wb.put_link("a1", "w1", LinkRecord(0.001, 1.0, 10.0))
        wb.put_link("a1", "w2", LinkRecord(0.001, 2.0, 10.0))
        wb._on_thread = lambda batch, then: wb._write(_Broken(), batch, then)  # the database refuses once
        await wb.flush()
        wb.put_link("a1", "w1", LinkRecord(0.001, 3.0, 11.0))  # newer than the failed one
        del wb._on_thread
        await wb.flush()
        await wb.close()
        return wb.stats

    stats = asyncio.run(main())
    assert stats.failures == 1 and stats.flushes == 1
    links = s.links()["a1"]
    assert links["w1"].bandwidth_bytes_per_second == 3.0 and links["w2"].bandwidth_bytes_per_second == 2.0
    s.close()


class _Broken:
    def write_batch(self, batch):
        raise sqlite3.OperationalError("disk I/O error")


def test_store_locations_and_urls(tmp_path):
    assert open_backend(str(tmp_path / "a.sqlite")).name == "sqlite"
    b = open_backend(f"sqlite:///{tmp_path}/b.sqlite")
    assert b.describe() == f"{tmp_path}/b.sqlite"
    b.close()
    with pytest.raises(StoreError, match="unknown engine"):
        open_backend("mysql://u:secret@h/db")
    assert redact("postgresql://planner:s3cret@db:5432/edgesplit") == "postgresql://planner:***@db:5432/edgesplit"
    with pytest.raises(Exception, match="unreachable") as ei:  # nothing listens there: UNAVAILABLE, no password shown
        open_backend(f"postgresql://u:s3cret@/x?host={tmp_path}&port=1&connect_timeout=2")
    assert "s3cret" not in str(ei.value)


# -- a killed planner: what survives ----------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_a_killed_planner_loses_only_unacknowledged_link_samples(engine, tmp_path, request):
    where = str(tmp_path / "k.sqlite") if engine == "sqlite" else request.getfixturevalue("postgres").new_database()
    # the periodic flush never comes in this test (30 s)
    proc, address = start_planner(where, tmp_path, "--store-flush-seconds", "30", "--lease-seconds", "60")
    try:
        async def main():
            async with grpc.aio.insecure_channel(address) as ch:
                stub = pb_grpc.PlannerStub(ch)
                await stub.RegisterWorker(pb.RegisterWorkerRequest(worker_id="w1", address="127.0.0.1:50051",
                                                                   tier="edge", profiles_json=[EDGE_PROFILE]), timeout=RPC)
                reply = await stub.RegisterAgent(pb.RegisterAgentRequest(agent_id="a1", model_id=MODEL, model_digest="w1",
                                                                         profile_json=DEVICE_PROFILE), timeout=RPC)

                async def one(bw):
                    yield pb.Telemetry(agent_id="a1", worker="w1", bandwidth_bytes_per_second=bw, rtt_seconds=0.005)

                pushed: list[int] = []  # every plan the agent is told, on its WatchPlan stream

                async def watch():
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        async for p in stub.WatchPlan(pb.WatchPlanRequest(agent_id="a1"), timeout=60):
                            pushed.append(p.version)

                watcher = asyncio.create_task(watch())
                acked = await stub.ReportTelemetry(one(2_000_000.0), timeout=RPC)  # acknowledged: stored
                # not acknowledged: the stream is still open when the planner dies
                call = stub.ReportTelemetry(timeout=RPC)
                await call.write(pb.Telemetry(agent_id="a1", worker="w1", bandwidth_bytes_per_second=7_000_000.0,
                                              rtt_seconds=0.005))
                await asyncio.sleep(0.3)  # received and recorded (in memory) by now; no flush is due for 30 s
                kill(proc)
                call.cancel()
                await watcher
                return reply.plan, acked.received, pushed

        plan, received, pushed = asyncio.run(main())
    finally:
        kill(proc)
    assert plan.version == 1 and received == 1
    s = Store(where)
    try:
        assert s.workers().keys() == {"w1"} and s.agents().keys() == {"a1"}  # registrations: written at once
        told = [plan.version, *pushed]  # the registration's reply, then each push (telemetry may re-plan)
        assert s.current_plan("a1").plan.version == max(told)  # the last plan the agent was told is stored
        assert {h.plan.version for h in s.history("a1")} >= set(told)
        assert s.links()["a1"]["w1"].bandwidth_bytes_per_second == 2_000_000.0  # the acknowledged sample
    finally:
        s.close()


def test_a_clean_shutdown_flushes_what_the_write_behind_holds(tmp_path):
    """A link sample the planner holds but has not flushed (no ack asked for it) is written on drain."""
    from planner.config import PlannerConfig
    from planner.server import serve

    db = tmp_path / "p.sqlite"

    async def main():
        ps = await serve(PlannerConfig(listen="127.0.0.1:0", db=str(db), store_flush_seconds=60.0,
                                       default_bandwidth_bytes_per_second=10_000_000.0))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ps.port}") as ch:
                stub = pb_grpc.PlannerStub(ch)
                await stub.RegisterWorker(pb.RegisterWorkerRequest(worker_id="w1", address="127.0.0.1:50051",
                                                                   tier="edge", profiles_json=[EDGE_PROFILE]), timeout=RPC)
                await stub.RegisterAgent(pb.RegisterAgentRequest(agent_id="a1", model_id=MODEL, model_digest="w1",
                                                                 profile_json=DEVICE_PROFILE), timeout=RPC)
                call = stub.ReportTelemetry(timeout=RPC)
                await call.write(pb.Telemetry(agent_id="a1", worker="w1", bandwidth_bytes_per_second=3_000_000.0,
                                              rtt_seconds=0.005))
                st = ps.service.state.agents["a1"]
                deadline = time.monotonic() + 10
                while "w1" not in st.links:  # recorded in memory
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                assert Store(db).links() == {}  # not written yet: the flush is a minute away
                call.cancel()
        finally:
            await ps.drain_and_stop(1.0)

    asyncio.run(main())
    s = Store(db)
    assert s.links()["a1"]["w1"].bandwidth_bytes_per_second == 3_000_000.0
    s.close()


def test_a_lapsed_lease_is_taken_over_by_any_call_and_the_agent_loaded(postgres, tmp_path):  # noqa: F811
    """A replica dies; once its lease lapsed, another replica takes the agent over on a call that is
    not a registration, with the agent's record and plan from the store."""
    where = postgres.new_database()
    flags = ("--store-flush-seconds", "0.2", "--lease-seconds", "0.5", "--default-bandwidth-bytes-per-second", "1e7")
    a, address_a = start_planner(where, tmp_path, *flags)
    b, address_b = start_planner(where, tmp_path, *flags)
    try:
        async def main():
            async with grpc.aio.insecure_channel(address_a) as ca, grpc.aio.insecure_channel(address_b) as cb:
                sa, sb = pb_grpc.PlannerStub(ca), pb_grpc.PlannerStub(cb)
                for stub in (sa, sb):
                    await stub.RegisterWorker(pb.RegisterWorkerRequest(worker_id="w1", address="127.0.0.1:50051",
                                                                       tier="edge", profiles_json=[EDGE_PROFILE]),
                                              timeout=RPC)
                plan = (await sa.RegisterAgent(pb.RegisterAgentRequest(agent_id="a1", model_id=MODEL, model_digest="w1",
                                                                       profile_json=DEVICE_PROFILE), timeout=RPC)).plan
                kill(a)
                s = Store(where)
                try:
                    deadline = time.monotonic() + 10
                    while s.leases()["a1"][1] > 0:  # until A's lease lapsed (the database's clock)
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.05)
                finally:
                    s.close()
                await sb.ReportPlanStatus(pb.PlanStatus(agent_id="a1", version=plan.version, applied=True), timeout=RPC)
                listed = {x.agent_id: x for x in (await sb.ListAgents(pb.ListAgentsRequest(), timeout=RPC)).agents}
                return plan, listed

        plan, listed = asyncio.run(main())
    finally:
        kill(a)
        kill(b)
    assert listed["a1"].plan.version == plan.version and listed["a1"].plan.worker_id == "w1"


def test_a_lost_postgresql_connection_is_opened_again(postgres):  # noqa: F811
    """The server ends the planner's connection (a restart, a failover): the next call reconnects."""
    import psycopg

    where = postgres.new_database()
    s = Store(where)
    try:
        _fill(s)
        pid = s.backend.connection.info.backend_pid
        with psycopg.connect(where, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert s.issue_plan(pb.Plan(agent_id="a1")).version == 1  # BEGIN on a new connection
        assert s.backend.connection.info.backend_pid != pid
        pid = s.backend.connection.info.backend_pid
        with psycopg.connect(where, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert s.agents().keys() == {"a1"}  # a read outside a transaction
    finally:
        s.close()


def test_a_barrier_returns_once_the_batch_is_committed_not_after_the_lease_renewal(tmp_path):
    """A telemetry ack waits for its samples' commit only: the replica's lease renewal that runs after
    the batch on the store thread (one row per agent held) does not hold it."""
    import threading

    s = Store(str(tmp_path / "s.sqlite"))
    s.put_agent(AgentRecord("a1", MODEL, "w1", DEVICE_PROFILE, (), (), pb.Constraints(), 1.0, 2.0))
    renewing, release = threading.Event(), threading.Event()

    def renewal(store: Store) -> str:
        renewing.set()
        release.wait(10)
        return "renewed"

    async def main():
        wb = WriteBehind(s)
        wb.put_link("a1", "w1", LinkRecord(0.004, 1e6, 3.0))
        waiter = asyncio.create_task(wb.barrier())
        await asyncio.sleep(0)
        flush = asyncio.create_task(wb.flush(renewal))
        await asyncio.wait_for(waiter, 5)  # returned before the renewal could end (it waits for release)
        assert not flush.done()
        # the renewal runs after the batch on the store thread: it may start only now
        assert await asyncio.to_thread(renewing.wait, 5) and not flush.done()
        release.set()
        assert await flush == "renewed"
        await wb.close()

    try:
        asyncio.run(main())
        assert s.links()["a1"]["w1"].bandwidth_bytes_per_second == 1e6
    finally:
        release.set()
        s.close()
