"""Rankings shared by the agents that would get the same one (issue 15: a fleet of board types).

A ranking (:func:`planner.decide.rank`, and the re-costed running plan beside it) depends on the
agent's device profile, its record (model, weights, allowed workers, Transfer Layers,
constraints), the candidate workers (profiles, addresses, tiers, TLs, next tiers) with their
links, and what is excluded or re-costed. Agents of one board type, under the same constraints,
whose links fall in the same band, ask the same question: :class:`RankCache` answers it once.

Links are put in bands before ranking (:class:`Bands`): bandwidth on a geometric grid of
``rank_band`` relative steps anchored at powers of ten (so 1, 10, 100 MB/s rank exactly as
given), RTT rounded to ``rank_rtt_quantum_seconds``. Every agent in a band is ranked at the band's
figure, so a shared ranking is the ranking each of them would get. The error this allows in a
prediction is at most half a step (2.4 % of the transfer time at the default 5 %), below the
switch threshold (:mod:`planner.hysteresis`, 10 %).

Profiles and other objects in a key are named by identity; an entry holds them, so no other
object can take their ids while it lives (as :class:`planner.cache.IdentityMemo` does;
tests/test_rankcache.py frees profiles until CPython reuses their ids). Not by the record's profile
hash: the device profile ranked is the registered one as this agent's measurements scaled it
(:attr:`planner.state.AgentState.device`: speed, wire bytes, overhead) and each worker's is scaled
by the agent's tail factor (:meth:`planner.compute.WorkerSpeeds.profiles`), so two agents
registered with one profile text may rank different profiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generic, TypeVar

from planner.cache import LRU
from planner.decide import Candidate, PlanKey, Ranked, plan_key
from planner.store import AgentRecord
from runtime.contracts.costmodel import Configuration, Link
from runtime.contracts.profile import Profile
from runtime.proto.edgesplit.v1 import planner_pb2 as pb


@dataclass(frozen=True)
class Bands:
    """How link figures are put in bands (0: exactly as measured)."""

    bandwidth: float = 0.05  # relative step
    rtt_quantum_seconds: float = 0.0005

    @property
    def steps_per_decade(self) -> int:
        return math.ceil(math.log(10) / math.log1p(self.bandwidth)) if self.bandwidth > 0 else 0

    def bandwidth_of(self, bw: float) -> float:
        k = self.steps_per_decade
        if k == 0 or bw <= 0 or not math.isfinite(bw):
            return bw
        n = round(k * math.log10(bw))
        return float(10.0 ** (n / k))

    def rtt_of(self, rtt: float) -> float:
        q = self.rtt_quantum_seconds
        return rtt if q <= 0 or rtt <= 0 else round(rtt / q) * q

    def link(self, link: Link) -> Link:
        bw, rtt = self.bandwidth_of(link.bandwidth_bytes_per_second), self.rtt_of(link.rtt_seconds)
        if (bw, rtt) == (link.bandwidth_bytes_per_second, link.rtt_seconds):
            return link
        return Link(rtt, bw)

    def candidate(self, c: Candidate) -> Candidate:
        link = self.link(c.link)
        return c if link is c.link else Candidate(c.worker_id, c.address, c.tier, c.profile, c.tl_ids, link, c.next_tiers)


def _predicted(plan: pb.Plan | None) -> tuple[object, ...] | None:
    """What of a plan its re-costing reads (its key, addresses and cuts)."""
    if plan is None:
        return None
    return (plan_key(plan), plan.model_id, plan.worker_address, plan.end_split_index,
            tuple((h.address, h.end_split_index) for h in plan.next_hops))


def rank_key(device: Profile, rec: AgentRecord, cands: list[Candidate], top_n: int, exclude: PlanKey | None,
             predict: pb.Plan | None) -> tuple[tuple[object, ...], tuple[object, ...]]:
    """(key, objects the key names by identity) of one ranking."""
    held: list[object] = [device]
    workers = []
    for c in cands:
        held.append(c.profile)
        workers.append((c.worker_id, c.address, c.tier, id(c.profile), c.tl_ids, c.link.rtt_seconds,
                        c.link.bandwidth_bytes_per_second, c.next_tiers))
    constraints = rec.constraints.SerializeToString(deterministic=True)
    key = (id(device), rec.model, rec.digest, rec.workers, rec.tl_ids, constraints, tuple(workers), top_n, exclude,
           _predicted(predict))
    return key, tuple(held)


Ranking = tuple[list[Ranked], float, Configuration | None]


V = TypeVar("V")


class HeldLRU(Generic[V]):
    """The ``size`` most recently used values by :func:`rank_key`, each entry holding the objects its key names by
    identity (see the module docstring); hits and misses counted."""

    def __init__(self, size: int) -> None:
        self._lru: LRU[tuple[object, ...], tuple[tuple[object, ...], V]] = LRU(size)
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[object, ...]) -> V | None:
        hit = self._lru.get(key)
        if hit is None:
            self.misses += 1
            return None
        self.hits += 1
        return hit[1]

    def __len__(self) -> int:
        return len(self._lru)


class RankCache(HeldLRU[tuple[list[Ranked], Configuration | None]]):
    """The ``size`` most recently used rankings with the running plan re-costed beside them."""

    def put(self, key: tuple[object, ...], held: tuple[object, ...], ranked: list[Ranked], current: Configuration | None) -> None:
        self._lru.put(key, (held, (list(ranked), current)))


BAND_TABLES = 1024  # band tables kept for the planner's own in-band check (RePlanner._rank_bands)


@dataclass(frozen=True)
class BandTable:
    """A running plan's band table as :func:`planner.fallbacks.attach` ranked it, for the planner's own
    in-band check (:mod:`planner.inband`): the entries, the band worker's address, and the bandwidth the
    grid was ranked around."""

    fallbacks: tuple[pb.BandPlan, ...]
    address: str
    around: float


class BandTables(HeldLRU[BandTable]):
    """Band tables shared by the agents that would rank the same one (issue 15: 5,000 agents re-attaching
    to a replica each ranked its table again, 26 ranking lookups apiece).

    A table ranks the band worker at ``GRID`` factors around the measured bandwidth; every ranking in
    it is made at banded link figures (:class:`Bands`), so agents whose key (:func:`rank_key` at the
    measured bandwidth: device profile, record, the band worker's banded link) is the same get the same
    entries. Only the band edges (geometric midpoints of grid points a factor 2 apart) and the ranked
    span follow the exact bandwidth of the agent that ranked it first, within one band step (5 % at the
    default) of any other's: far inside the grid's own resolution. The tables decide nothing an agent
    receives; a plan's own table is ranked for it (:meth:`planner.replanner.RePlanner._issue`)."""

    def __init__(self, size: int = BAND_TABLES) -> None:
        super().__init__(size)

    def put(self, key: tuple[object, ...], held: tuple[object, ...], table: BandTable) -> None:
        self._lru.put(key, (held, table))
