"""Many agents' leases and rows in one batch of statements (planner.store_batch), on both engines
(PostgreSQL started by the test; skipped with the reason where none can be started)."""

from __future__ import annotations

import time

import pytest

from planner import store_batch
from planner.store import AgentRecord, LinkRecord, SpeedRecord, Store, profile_hash
from runtime.proto.edgesplit.v1 import planner_pb2 as pb
from tests.planner_helpers import DEVICE_PROFILE, MODEL, Planner

pytestmark = pytest.mark.timeout(120)  # store: on both engines (tests/store_fixtures.py)


def _agent(s: Store, aid: str, version: int = 0) -> None:
    s.put_agent(AgentRecord(aid, MODEL, "d", DEVICE_PROFILE, ("w1",), ("tl-1",), pb.Constraints(min_fidelity=0.5),
                            1.0, 2.0))
    if version:
        s.issue_plan(pb.Plan(agent_id=aid, model_id=MODEL, worker_id="w1", split_id="s"))


def test_batched_leases_take_free_lapsed_own_and_registered_but_not_held(store, monkeypatch):
    monkeypatch.setattr(store_batch, "CHUNK", 3)  # several statements per batch
    s = store  # opened on each engine, closed after (tests/store_fixtures.py)
    assert s.acquire_lease("held", "r2", 30.0, take=False) == ("", 0.0)
    s.acquire_lease("taken", "r2", 30.0, take=False)
    s.acquire_lease("lapsed", "r2", 0.05, take=False)
    s.acquire_lease("own", "r1", 30.0, take=False)
    time.sleep(0.1)  # on the database's clock
    asks = {"held": False, "taken": True, "lapsed": False, "own": False, "free": False, **{f"n{i}": False for i in range(5)}}
    got = store_batch.acquire_leases(s, asks, "r1", 5.0)
    assert set(got) == set(asks)
    assert got["held"][0] == "r2" and got["held"][1] > 20
    assert got["taken"][0] == "r2" and got["lapsed"][0] == "r2" and got["lapsed"][1] <= 0
    assert got["own"][0] == "r1" and got["free"] == ("", 0.0)
    leases = s.leases()
    assert leases["held"][0] == "r2"  # a held lease is not taken without a registration
    assert {a for a, (r, _) in leases.items() if r == "r1"} == set(asks) - {"held"}
    assert all(left > 4 for a, (r, left) in leases.items() if a != "held")


def test_batched_rows_are_what_the_single_reads_give_and_profiles_are_read_once(store, monkeypatch):
    monkeypatch.setattr(store_batch, "CHUNK", 2)
    s = store  # opened on each engine, closed after (tests/store_fixtures.py)
    for i in range(5):
        _agent(s, f"a{i}", version=1 if i % 2 == 0 else 0)
    s.issue_plan(pb.Plan(agent_id="a0", model_id=MODEL, worker_id="w1", split_id="t"))  # a0's v2 is current
    s.put_link("a1", "w1", LinkRecord(0.004, 2.5e6, 17.5))
    s.put_speed("a2", SpeedRecord(2.5, 7, 3.0))
    texts: dict[str, str] = {}
    rows = store_batch.attach_rows(s, ["a0", "a1", "a2", "a3", "a4", "nobody"], texts)
    assert set(rows) == {f"a{i}" for i in range(5)}  # an agent not stored: absent
    assert texts == {profile_hash(DEVICE_PROFILE): DEVICE_PROFILE}
    for aid, (rec, plan, links, speed) in rows.items():
        assert rec == s.agents(aid)[aid]
        single = s.current_plan(aid)
        assert (plan.plan, plan.status) == (single.plan, single.status) if single else plan is None
        assert links == s.links(aid).get(aid, {}) and speed == s.speeds(aid).get(aid)
    assert rows["a0"][1].plan.split_id == "t"
    # a text held already is not read again (the cache is the caller's): a stale one would show here
    held = {profile_hash(DEVICE_PROFILE): "held text"}
    assert store_batch.attach_rows(s, ["a1"], held)["a1"][0].profile == "held text"


def test_an_unchanged_registration_writes_no_row_and_a_changed_one_does(aio, tmp_path, monkeypatch):
    """A re-attach re-registers thousands of agents at once: what the store holds already is not written
    again (only the heartbeat, with the next flush); a change is written before the reply."""
    writes: list[str] = []
    put = Store.put_agent

    def counted(self, a):
        writes.append(a.id)
        put(self, a)

    monkeypatch.setattr(Store, "put_agent", counted)

    async def scenario():
        p = await Planner.start(tmp_path / "p.sqlite")
        try:
            first = await p.register()
            assert writes == ["a1"]
            again = await p.register()
            assert writes == ["a1"] and again.version == first.version  # stored as it is: nothing written
            await p.register(constraints=pb.Constraints(min_fidelity=0.5))
            assert writes == ["a1", "a1"]  # a changed registration is written before its reply
        finally:
            await p.stop()
        s = Store(tmp_path / "p.sqlite")
        try:
            assert s.agents("a1")["a1"].constraints.min_fidelity == 0.5
        finally:
            s.close()

    aio.run(scenario())
