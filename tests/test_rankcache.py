"""The shared rank cache (planner.rankcache) keys profiles by identity: a ranking is served only for the very
objects it was made from, never for another profile that CPython put at a freed one's address."""

from __future__ import annotations

from planner.decide import Candidate
from planner.rankcache import RankCache, rank_key
from planner.store import AgentRecord
from runtime.contracts.costmodel import Link
from runtime.contracts.profile import Block, Profile

RECORD = AgentRecord("agent-1", "m", "w1", "{}", ("w",), ())


def _profile(role: str, seconds: float) -> Profile:
    return Profile("board" if role == "device" else "edge", role, "m", (Block(0, "b0", seconds, 4000),), 12000)


def _ask(cache: RankCache, device: Profile, worker: Profile) -> tuple[object, object]:
    """The cached answer for (device, worker), or None; a miss is answered and cached as a ranking naming the
    device's content."""
    cands = [Candidate("w", "127.0.0.1:1", "edge", worker, frozenset(), Link(0.001, 1e6))]
    key, held = rank_key(device, RECORD, cands, 1, None, None)
    hit = cache.get(key)
    if hit is None:
        cache.put(key, held, [f"ranked on {device.blocks[0].seconds}"], None)  # type: ignore[list-item]
    return hit, f"ranked on {device.blocks[0].seconds}"


def test_a_ranking_is_served_for_the_same_objects():
    cache = RankCache(4)
    device, worker = _profile("device", 1.0), _profile("edge", 0.1)
    assert _ask(cache, device, worker)[0] is None
    hit, mine = _ask(cache, device, worker)
    assert hit is not None and hit[0] == [mine]
    assert (cache.hits, cache.misses) == (1, 1)


def test_a_freed_profiles_address_never_serves_its_ranking_to_another():
    # A small cache: entries are evicted, their profiles freed, and CPython hands the same addresses (ids) to the
    # profiles made next. Every profile here has its own content, so every question is a new one: each must miss.
    # An entry holds the objects its key names by id, so while it lives no other object can have those ids; take
    # that hold away (RankCache.put keeping no `held`) and the new profiles hit the freed ones' rankings.
    cache = RankCache(4)
    worker = _profile("edge", 0.1)  # one worker: the device profile is all that changes
    ids: set[int] = set()
    reused = 0
    for i in range(300):
        device = _profile("device", 1.0 + i)
        reused += id(device) in ids
        ids.add(id(device))
        hit, _ = _ask(cache, device, worker)
        assert hit is None, f"profile {i} got a ranking made for another profile: {hit[0]}"
        del device
    assert cache.misses == 300 and cache.hits == 0
    assert reused > 0  # the addresses were reused (else this test would show nothing)
