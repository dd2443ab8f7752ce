"""Leases kept alive by one heartbeat row per replica (planner.store_leases), on both engines
(PostgreSQL started by the test; skipped with the reason where none can be started)."""

from __future__ import annotations

import threading
import time

import pytest

from planner import store_leases
from planner.store import LeaseLost, Store
from runtime.proto.edgesplit.v1 import planner_pb2 as pb
from tests.postgres_server import postgres  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(120)


def _rows(s: Store) -> dict[str, tuple[str, float]]:
    """The lease rows as stored: agent -> (replica, the row's own expiry)."""
    return {a: (r, float(t)) for a, r, t in s.backend.execute("SELECT agent_id, replica, expires_unix FROM leases")}


def test_the_heartbeat_keeps_every_lease_of_its_replica_alive_without_writing_them(store):
    s = store
    s.start_replica("r1", 30.0)
    for aid in ("a1", "a2", "a3"):
        s.acquire_lease(aid, "r1", 0.05, take=False)  # the rows' own expiry lapses at once
    rows = _rows(s)
    time.sleep(0.1)  # on the database's clock
    assert s.heartbeat("r1", 30.0) == (set(), None)  # nothing taken, the leases not read
    assert _rows(s) == rows  # no lease row written
    holder, left = s.acquire_lease("a1", "r2", 5.0, take=False)
    assert holder == "r1" and 25 < left <= 30  # alive by r1's heartbeat: not taken without a registration
    assert {a: r for a, (r, _) in s.leases().items()} == {"a1": "r1", "a2": "r1", "a3": "r1"}
    s.issue_plan(pb.Plan(agent_id="a1"), fence=("r1", 30.0))  # the fence: the row names r1


def test_a_registration_elsewhere_is_handed_to_the_live_holder_once(store):
    s = store
    s.start_replica("r1", 30.0)
    s.start_replica("r2", 30.0)
    s.acquire_lease("a1", "r1", 30.0, take=False)
    s.acquire_lease("a2", "r1", 30.0, take=False)
    assert s.acquire_lease("a1", "r2", 30.0, take=True)[0] == "r1"  # the agent registered on r2
    with pytest.raises(LeaseLost):
        s.issue_plan(pb.Plan(agent_id="a1"), fence=("r1", 30.0))
    assert s.heartbeat("r1", 30.0) == ({"a1"}, None)  # r1 learns it once, and drops the agent
    assert s.heartbeat("r1", 30.0) == (set(), None)
    # it comes back to r1: r2 learns it; r1 holds it again and is not told it lost it
    s.acquire_lease("a1", "r2", 30.0, take=True)
    s.acquire_lease("a1", "r1", 30.0, take=True)
    assert s.heartbeat("r2", 30.0) == ({"a1"}, None)
    assert s.heartbeat("r1", 30.0) == (set(), None)
    assert {a: r for a, (r, _) in s.leases().items()} == {"a1": "r1", "a2": "r1"}


def test_a_lapsed_heartbeat_lets_any_call_take_the_agents_and_its_replica_reads_its_leases_again(store):
    s = store
    s.start_replica("r1", 0.05)
    s.start_replica("r2", 30.0)
    for aid in ("a1", "a2", "a3"):
        s.acquire_lease(aid, "r1", 0.05, take=False)
    time.sleep(0.1)  # r1 stalled past its lease: no heartbeat
    holder, left = s.acquire_lease("a1", "r2", 30.0, take=False)  # a call that is not a registration
    assert holder == "r1" and left <= 0
    assert s.leases()["a2"][1] <= 0 and s.leases()["a1"] == ("r2", pytest.approx(30, abs=5))
    taken, held = s.heartbeat("r1", 30.0)
    assert taken == set() and held == {"a2", "a3"}  # the take was not logged: it reads what it holds
    assert s.heartbeat("r1", 30.0) == (set(), None)  # alive again: no need to read them
    assert s.heartbeat("r2", 30.0) == (set(), None)


def test_a_missing_heartbeat_row_reads_the_leases_and_a_release_ends_the_heartbeat(store):
    s = store
    s.start_replica("r1", 30.0)
    s.acquire_lease("a1", "r1", 30.0, take=False)
    s.release_leases("r1")
    assert s.leases() == {}
    assert s.backend.execute("SELECT COUNT(*) FROM replicas").fetchone()[0] == 0
    assert s.heartbeat("r1", 30.0) == (set(), set())  # no row: it reads its leases (none now)


def test_dead_replicas_are_forgotten_with_their_handovers(store, monkeypatch):
    s = store
    s.start_replica("dead", 0.05)
    s.start_replica("live", 30.0)
    s.acquire_lease("a1", "dead", 30.0, take=False)
    s.acquire_lease("a1", "live", 30.0, take=True)  # logged for "dead" (alive by the lease row then)
    time.sleep(0.1)
    monkeypatch.setattr(store_leases, "FORGET_SECONDS", 0.0)
    assert s.forget_dead_replicas() == 1
    assert [r[0] for r in s.backend.execute("SELECT id FROM replicas")] == ["live"]
    assert s.backend.execute("SELECT COUNT(*) FROM handovers").fetchone()[0] == 0


def test_a_take_and_a_heartbeat_of_a_lapsed_holder_never_lose_the_take(postgres):  # noqa: F811
    """PostgreSQL, two connections racing: r2 takes r1's agents while r1's heartbeat had lapsed (not
    logged), and r1's heartbeat runs at the same time. Whichever goes first, r1 ends up knowing every
    agent r2 took: from its full read or from the handovers."""
    where = postgres.new_database()
    a, b = Store(where), Store(where)
    try:
        for round_ in range(20):
            ids = [f"x{round_}-{i}" for i in range(50)]
            a.start_replica("r1", 0.02)
            for aid in ids:
                a.acquire_lease(aid, "r1", 0.02, take=False)
            time.sleep(0.05)
            got: dict[str, object] = {}
            t = threading.Thread(target=lambda got=got: got.update(beat=a.heartbeat("r1", 30.0)))
            t.start()
            took = b.acquire_lease(ids[0], "r2", 30.0, take=False)[0] == "r1"
            t.join()
            taken, held = got["beat"]  # type: ignore[misc]
            still = {x for x, (r, _) in a.leases().items() if r == "r1"}
            known = (held if held is not None else set(ids)) - taken
            assert known == still, (round_, took, taken, held)
    finally:
        a.close()
        b.close()
