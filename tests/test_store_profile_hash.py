"""A device profile's store key (its SHA-256) travels with the record that holds the text
(``AgentRecord.profile_sha256``): taken from whoever computed it (the servicer's ProfileCache key, the
store's own column), never from a module-global cache; a record given another text gets that text's hash."""

from __future__ import annotations

import hashlib

import pytest

from planner import store, store_batch, store_profiles
from planner.store import AgentRecord, Store
from runtime.proto.edgesplit.v1 import planner_pb2 as pb
from tests.planner_helpers import DEVICE_PROFILE, Planner

pytestmark = pytest.mark.timeout(120)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _record(aid: str, text: str) -> AgentRecord:
    return AgentRecord(aid, "m", "d", text, ("w0",), (), pb.Constraints(), 1.0, 1.0)


def _no_hashing(monkeypatch) -> None:
    def refuse(text: str) -> str:
        raise AssertionError("hashed a profile text whose hash was known")

    monkeypatch.setattr(store, "profile_hash", refuse)
    monkeypatch.setattr(store_profiles, "profile_hash", refuse)


def _stored(s: Store) -> dict[str, str]:
    """agent id -> the hash its row names, and that the profiles table holds that text under it."""
    texts = dict(s.backend.execute("SELECT hash, text FROM profiles"))
    rows = dict(s.backend.execute("SELECT id, profile FROM agents"))
    assert all(_sha(texts[h]) == h for h in rows.values())
    return rows


def test_a_record_given_another_text_is_stored_under_that_texts_hash(store):
    one, two = DEVICE_PROFILE, DEVICE_PROFILE.replace("{", "{ ", 1)
    rec = _record("a1", one)
    assert rec.profile_sha256() == _sha(one)
    rec.profile = two  # after its hash was taken: the new text's hash, not the one held
    assert rec.profile_sha256() == _sha(two)
    store.put_agent(rec)
    rec.hold_profile(one, _sha(one))
    store.put_agent(rec)
    store.put_agent(_record("a2", two))
    assert _stored(store) == {"a1": _sha(one), "a2": _sha(two)}


def test_records_read_from_the_store_carry_their_hash(store, monkeypatch):
    other = DEVICE_PROFILE.replace("{", "{ ", 1)
    for aid, text in (("a1", DEVICE_PROFILE), ("a2", other), ("a3", DEVICE_PROFILE)):
        store.put_agent(_record(aid, text))
    _no_hashing(monkeypatch)
    read = store.agents()
    batch = store_batch.attach_rows(store, ["a1", "a2", "a3"], {})
    for aid, text in (("a1", DEVICE_PROFILE), ("a2", other), ("a3", DEVICE_PROFILE)):
        assert read[aid].profile == text and read[aid].profile_sha256() == _sha(text)
        assert batch[aid][0].profile == text and batch[aid][0].profile_sha256() == _sha(text)
    store.put_agent(read["a2"])  # written again as read: no hashing
    read["a3"].hold_profile(other, _sha(other))
    store.put_agent(read["a3"])
    assert _stored(store) == {"a1": _sha(DEVICE_PROFILE), "a2": _sha(other), "a3": _sha(other)}


def test_a_registration_and_a_restart_hash_the_profile_once_not_again_to_store_it(aio, tmp_path, monkeypatch):
    """The servicer hashes the text for its ProfileCache; the store takes that key (and a restart takes the row's)."""
    _no_hashing(monkeypatch)

    async def scenario():
        for restart in (False, True):
            p = await Planner.start(tmp_path / "p.sqlite")
            try:
                if restart:
                    assert "a1" in await p.agents()  # resumed from the store
                await p.register(agent="a2" if restart else "a1")
            finally:
                await p.stop()

    aio.run(scenario())
    s = Store(tmp_path / "p.sqlite")
    try:
        assert _stored(s) == {"a1": _sha(DEVICE_PROFILE), "a2": _sha(DEVICE_PROFILE)}
    finally:
        s.close()
