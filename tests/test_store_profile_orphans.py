"""Device profile texts no agent names any more are deleted from the planner's store (SECURITY.md): the
``profiles`` table (one row per SHA-256 of a profile text) was never cleaned, so a client re-registering
an agent with ever new profiles grew the database without bound. Both engines."""

from __future__ import annotations

import pytest

from planner.store import AgentRecord, Store, profile_hash
from planner.store_batch import attach_rows
from runtime.proto.edgesplit.v1 import planner_pb2 as pb
from tests.postgres_server import postgres  # noqa: F401 - the fixture


def _profile(board: int) -> str:
    return f'{{"machine": "board-{board}", "role": "device", "model": "m", "blocks": []}}'


def _agent(agent_id: str, board: int) -> AgentRecord:
    return AgentRecord(agent_id, "m", "d", _profile(board), ("w0",), (), pb.Constraints(), 1.0, 1.0)


def _hashes(store: Store) -> set[str]:
    return {r[0] for r in store.backend.execute("SELECT hash FROM profiles")}


def test_a_profile_no_agent_names_is_deleted_when_its_last_agent_moves_off_it(store):
    store.put_agent(_agent("a1", 1))
    store.put_agent(_agent("a2", 1))
    store.put_agent(_agent("a1", 2))  # a2 still names board 1's text: kept
    assert _hashes(store) == {profile_hash(_profile(1)), profile_hash(_profile(2))}
    store.put_agent(_agent("a2", 3))  # its last agent left board 1's text
    assert _hashes(store) == {profile_hash(_profile(2)), profile_hash(_profile(3))}
    store.put_agent(_agent("a2", 3))  # the same profile again: nothing moves
    assert _hashes(store) == {profile_hash(_profile(2)), profile_hash(_profile(3))}
    assert {a: r.profile for a, r in store.agents().items()} == {"a1": _profile(2), "a2": _profile(3)}


def test_one_agent_re_registering_with_ever_new_profiles_keeps_one_row(store):
    for board in range(50):
        store.put_agent(_agent("a1", board))
    assert _hashes(store) == {profile_hash(_profile(49))}
    texts: dict[str, str] = {}
    assert attach_rows(store, ["a1"], texts)["a1"][0].profile == _profile(49)  # the batch reader sees the new text


def test_a_text_deleted_behind_this_store_is_written_again(store):
    """Another replica may delete a text this one wrote before (its last agent moved off it there): the
    next agent naming it here writes it again; no agent row ever names a text that is not stored."""
    store.put_agent(_agent("a1", 1))
    store.backend.execute("DELETE FROM profiles")  # as another replica's deletion would
    store.put_agent(_agent("a2", 1))
    assert _hashes(store) == {profile_hash(_profile(1))}
    assert set(store.agents()) == {"a1", "a2"}


def test_orphans_left_before_are_pruned_in_bounded_passes(store):
    """Texts orphaned by a planner that did not delete them (or a crash between the agent's row and the
    deletion): each pass deletes at most ``limit``, never a text an agent names; the store's opening runs one."""
    store.put_agent(_agent("a1", 1))
    b = store.backend
    with b.transaction():
        for board in range(100, 105):
            b.execute("INSERT INTO profiles (hash, text) VALUES (?,?)", (profile_hash(_profile(board)), _profile(board)))
    assert store.prune_profiles(limit=2) == 2
    assert len(_hashes(store)) == 4
    assert store.prune_profiles(limit=2) == 2
    assert store.prune_profiles(limit=2) == 1
    assert store.prune_profiles(limit=2) == 0
    assert _hashes(store) == {profile_hash(_profile(1))}
    with b.transaction():
        b.execute("INSERT INTO profiles (hash, text) VALUES (?,?)", (profile_hash(_profile(7)), _profile(7)))
    again = Store(b.clone())  # a planner opening the store
    try:
        assert _hashes(again) == {profile_hash(_profile(1))}
        assert again.agents()["a1"].profile == _profile(1)
    finally:
        again.close()


def test_a_deletion_waits_for_an_agent_row_being_written_under_its_text(tmp_path, postgres):  # noqa: F811
    """PostgreSQL, two replicas: one writes an agent naming a text (its transaction open, the text read FOR
    SHARE as put_agent does) while the other deletes that text as orphaned. The deletion waits for the write,
    then sees the agent's row and keeps the text."""
    import threading

    url = postgres.new_database()
    one, two = Store(url), Store(url)
    try:
        h = profile_hash(_profile(1))
        b = one.backend
        with b.transaction():  # board 1's text, named by no agent (its last one just moved off it)
            b.execute("INSERT INTO profiles (hash, text) VALUES (?,?)", (h, _profile(1)))
        locked, done = threading.Event(), threading.Event()
        out: list[int] = []

        def delete() -> None:
            locked.wait(10)
            out.append(two.drop_orphan_profiles([h]))
            done.set()

        thread = threading.Thread(target=delete)
        thread.start()
        with b.transaction():  # put_agent's steps, held open while replica two tries to delete
            assert b.execute("SELECT 1 FROM profiles WHERE hash=?" + b.share_sql, (h,)).fetchone() is not None
            b.execute("INSERT INTO agents (id, model, digest, profile, workers, tl_ids, constraints, registered, "
                      "last_seen) VALUES ('a2','m','d',?,'[]','[]','{}',1,1)", (h,))
            locked.set()
            assert not done.wait(0.5)  # the deletion waits for this transaction
        thread.join(10)
        assert out == [0] and h in _hashes(two)
        assert two.agents()["a2"].profile == _profile(1)
    finally:
        one.close()
        two.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("first", [False, True], ids=["re-registration", "first-registration"])
def test_two_registrations_of_one_agent_at_once_leave_no_orphan(store, first):
    """Review: replicas registering one agent at the same moment with two new profiles. Both wait behind a
    third transaction (holding the agent's row locked, or inserting its first row); when it ends they run.
    Only the profile the agent names at the end is stored: the later registration read the earlier one's hash
    under the row lock and deleted its text. (Before, both read the hash from before them and deleted only that
    one: the earlier one's text stayed until a prune.) SQLite runs one writer at a time: the same outcome."""
    import threading

    if not first:
        store.put_agent(_agent("a1", 0))
    b = store.backend
    watch, ready, go = b.clone(), threading.Barrier(3, timeout=30), threading.Event()  # watch: a connection of its own
    errors: list[BaseException] = []

    def register(board: int) -> None:
        s = Store(b.clone())  # in its thread: SQLite's connections stay in theirs
        try:
            ready.wait()
            go.wait(30)
            s.put_agent(_agent("a1", board))
        except BaseException as e:  # reported by the test
            errors.append(e)
        finally:
            s.close()

    threads = [threading.Thread(target=register, args=(board,)) for board in (1, 2)]
    for t in threads:
        t.start()
    try:
        ready.wait()
        with b.transaction():
            if first:  # its first row, uncommitted: both registrations find none, then wait at their insert
                b.execute("INSERT INTO profiles (hash, text) VALUES (?,?)", (profile_hash(_profile(0)), _profile(0)))
                b.execute("INSERT INTO agents (id, model, digest, profile, workers, tl_ids, constraints, registered, "
                          "last_seen) VALUES ('a1','m','d',?,'[]','[]','{}',1,1)", (profile_hash(_profile(0)),))
            else:
                b.execute("SELECT id FROM agents WHERE id='a1'" + b.lock_sql)
            go.set()
            if b.lock_sql:  # PostgreSQL: until both wait on a lock (bounded); SQLite: both wait at BEGIN IMMEDIATE
                waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type='Lock' AND datname=current_database()"
                for _ in range(1000):
                    if watch.execute(waiting).fetchone()[0] == 2:
                        break
                    threading.Event().wait(0.01)
                else:
                    raise AssertionError("the two registrations did not both wait within 10 s")
        for t in threads:
            t.join(30)
        assert not errors and not any(t.is_alive() for t in threads)
        final = store.agents()["a1"].profile
        assert final in (_profile(1), _profile(2)) and _hashes(store) == {profile_hash(final)}
    finally:
        go.set()
        watch.close()
