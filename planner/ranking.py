"""Ranking for the re-planner: the search executor, its caches, and rankings shared across agents.

:class:`Ranker` ranks configurations for one agent (:func:`planner.decide.rank`, one search per
candidate worker, in a one-thread executor so the event loop stays responsive) and re-costs its
running plan beside them. Links are put in bands first (:class:`planner.rankcache.Bands`), and a
ranking asked before, by this agent or any other with the same profiles, constraints and link band,
comes from the shared :class:`planner.rankcache.RankCache` without a search. The executor's
searches reuse this ranker's :class:`planner.decide.DecisionCache` (transfer tables, derived profiles).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

from planner import decide
from planner.cache import LRU
from planner.config import PlannerConfig
from planner.decide import Chain, DecisionCache, PlanKey, Ranked
from planner.metrics import PlannerMetrics
from planner.rankcache import Bands, RankCache, rank_key
from planner.state import AgentState, PlannerState
from planner.store import AgentRecord
from runtime.contracts.costmodel import Configuration
from runtime.contracts.profile import Profile
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

Ranking = tuple[list[Ranked], float, Configuration | None]  # best first, seconds it took, the plan's prediction
Cached = tuple[list[Ranked], Configuration | None]  # a ranking from the cache, and the plan's prediction
EXACT = Bands(0.0, 0.0)
FITS = 1024  # (agent profile, worker profile) pairs whose compatibility is remembered


class Ranker:
    def __init__(self, config: PlannerConfig, state: PlannerState, metrics: PlannerMetrics) -> None:
        self.config = config
        self.state = state
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="planner-search")
        self.cache = DecisionCache()  # used by the executor's searches (and _chain_of, on the loop)
        self.bands = Bands(config.rank_band, config.rank_rtt_quantum_seconds)  # links ranked by band
        self.rank_cache = RankCache(config.rank_cache_size)  # rankings shared by agents asking the same (on the loop)
        self._fits: LRU[tuple[object, ...], tuple[tuple[object, ...], str]] = LRU(FITS)  # decide.incompatibility, remembered

    def candidates(self, st: AgentState, rtt: float = 0.0, bandwidth: float = 0.0,
                   record: AgentRecord | None = None) -> list[decide.Candidate]:
        """:meth:`planner.state.PlannerState.candidates`, with whether a worker's profile fits the agent's
        remembered per (agent profile, worker profile) pair instead of comparing block lists every time."""
        workers = [(w.record, st.tails.profiles(wid, w.profiles, st.record.model))  # scaled by the agent's tail factor
                   for wid, w in sorted(self.state.workers.items())]
        return decide.candidates(record or st.record, st.device, workers, lambda wid: self.state.link(st, wid), rtt,
                                 bandwidth, self._incompatible)

    def _incompatible(self, agent: AgentRecord, device: Profile, worker_id: str, profiles: Mapping[str, Profile]) -> str:
        theirs = profiles.get(agent.model)
        key = (agent.model, agent.digest, worker_id, id(device), id(theirs))
        hit = self._fits.get(key)
        if hit is None:
            hit = ((device, theirs), decide.incompatibility(agent, device, worker_id, profiles))  # holds both: ids stay theirs
            self._fits.put(key, hit)
        return hit[1]

    async def rank(self, st: AgentState, top_n: int, rtt: float = 0.0, bandwidth: float = 0.0,
                   exclude: PlanKey | None = None, predict: pb.Plan | None = None,
                   record: AgentRecord | None = None, exact: bool = False) -> Ranking:
        """Rank now (and predict ``predict`` under the same conditions), for ``record`` (default: the
        agent's; a query may bring other constraints), with links in the configured bands (``exact``:
        at their figures); a ranking asked before is taken from the shared cache. Profiles are
        derived here, on the event loop, and only the searches run in the executor."""
        t0 = time.perf_counter()
        bands = EXACT if exact else self.bands
        key, held, work, hit = self._ranking(st, top_n, rtt, bandwidth, exclude, predict, record, bands)
        if hit is not None:
            return list(hit[0]), time.perf_counter() - t0, hit[1]
        ranked, seconds, current = await asyncio.get_running_loop().run_in_executor(self.executor, work)
        self.metrics.decision_seconds.observe(seconds)
        self.rank_cache.put(key, held, ranked, current)
        return ranked, seconds, current

    async def prefetch(self, st: AgentState, asks: list[tuple[float, AgentRecord]]) -> None:
        """Rank ``st`` (top 1) at each (bandwidth, record) of ``asks`` not in the cache, all in one
        executor job (a plan's bands rank a dozen times: one thread hop, not a dozen)."""
        jobs = []
        for bandwidth, record in asks:
            key, held, work, hit = self._ranking(st, 1, 0.0, bandwidth, None, None, record, self.bands)
            if hit is None:
                jobs.append((key, held, work))
        if not jobs:
            return
        results = await asyncio.get_running_loop().run_in_executor(self.executor, lambda: [w() for _, _, w in jobs])
        for (key, held, _), (ranked, seconds, current) in zip(jobs, results, strict=True):
            self.metrics.decision_seconds.observe(seconds)
            self.rank_cache.put(key, held, ranked, current)

    def _ranking(self, st: AgentState, top_n: int, rtt: float, bandwidth: float, exclude: PlanKey | None,
                 predict: pb.Plan | None, record: AgentRecord | None,
                 bands: Bands) -> tuple[tuple[object, ...], tuple[object, ...], Callable[[], Ranking], Cached | None]:
        """(cache key, objects it names, the search to run, the cached ranking: None when there is none)."""
        cands = [bands.candidate(c) for c in self.candidates(st, rtt, bandwidth, record)]
        rec, device = record or st.record, st.device
        key, held = rank_key(device, rec, cands, top_n, exclude, predict)
        hit = self.rank_cache.get(key)
        self.metrics.rank_cache.labels("miss" if hit is None else "hit").inc()
        if hit is not None:
            return key, held, _cached, hit
        devices = [st.device_for(c.tl_ids) for c in cands]
        chains = decide.chains(cands, self.state.worker_link())
        chained = [(ch, st.device_for(ch.first.tl_ids)) for ch in chains]
        cand = pinned = chain = forward = None
        if predict is not None and predict.worker_id:
            cand = next((c for c in cands if c.worker_id == predict.worker_id), None)
            usable = not predict.tl_id or (cand is not None and predict.tl_id in cand.tl_ids)
            if cand is not None and usable and 0 <= predict.split_index < st.device.n_blocks:
                pinned = st.device_for(cand.tl_ids, (predict.split_index, predict.codec, predict.tl_id))
            if predict.next_hops:
                chain, forward = self._chain_of(predict, chains)

        include_return, cache = self.config.include_return, self.cache

        def work() -> Ranking:
            ranked, seconds = decide.rank(rec, device, cands, devices, top_n, include_return, exclude, chained,
                                          cache)
            current = (decide.predict(rec, device, predict, cand, pinned, include_return, chain, forward, cache)
                       if predict is not None else None)
            return ranked, seconds, current

        return key, held, work, None

    def _chain_of(self, plan: pb.Plan, chains: list[Chain]) -> tuple[Chain | None, Profile | None]:
        """The chain a chained ``plan`` runs over now and the edge's profile limited to its hop's
        transfer ((None, None): the pair no longer chains, or the hop is not one it can run)."""
        hop = plan.next_hops[0]
        chain = next((c for c in chains if c.first.worker_id == plan.worker_id
                      and c.second.worker_id == hop.worker_id), None)
        if chain is None or len(plan.next_hops) != 1 or hop.tl_id or not plan.end_split_index > 0:
            return None, None
        return chain, decide.forwarding_at(chain.first.profile, plan.end_split_index, hop.codec, self.cache)


def _cached() -> Ranking:
    raise RuntimeError("a cached ranking has no search to run")
