"""When a new plan is due, and which: telemetry and registrations in, decisions out.

Every decision ranks configurations with :func:`planner.decide.rank` (one search per candidate
worker; a Transfer Layer is usable only where both the agent and that worker hold it) in a
one-thread executor, so the event loop stays responsive, with this re-planner's
:class:`planner.decide.DecisionCache` (bounded: the search's tables and derived profiles). A
change of plan for a running agent goes through :class:`planner.hysteresis.Hysteresis`; a first
plan, a re-registration and a running plan that became infeasible are decided at once.
Telemetry decides at once (at most ``telemetry_max_rate_hz`` per agent); the rest waits for the
periodic pass (``replan_interval_seconds``, or sooner when :meth:`RePlanner.wake` is called: a
worker registered, a plan was refused).

Device compute telemetry (the ``head`` stage median against the profile's prediction for the
split the agent runs) keeps a smoothed slowdown factor per agent (:mod:`planner.compute`); the
device profile every decision and query uses is the registered one with its block times scaled
by it, so a board that slows down moves work to a worker through the same hysteresis as a
slower link. The worker's tail time (``edge_tail``) keeps a factor per (agent, worker) the same way
(:class:`planner.compute.WorkerSpeeds`): that agent's rankings use the worker's profile scaled by it.
When a compute factor moved and the same configuration stays (best, or kept by the hysteresis), but
its prediction stayed more than 10 % off the figure it was issued with, it is issued again (reason
"prediction", :mod:`planner.refresh`): the agent's result lines carry the plan's prediction.

The state it reads and marks is :class:`planner.state.PlannerState`; an issued plan goes to the
agent's WatchPlan streams through :class:`planner.broadcaster.Broadcaster`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from planner import decide, fallbacks, measured
from planner.broadcaster import Broadcaster
from planner.config import PlannerConfig
from planner.decide import Ranked, plan_key
from planner.dpfp_factors import load_many as load_tile_factors
from planner.gcfreeze import GcFreezer
from planner.hysteresis import Hysteresis
from planner.inband import Basis, basis_of, in_band
from planner.intake import Intake
from planner.metrics import PlannerMetrics
from planner.parallel_push import ParallelPlanner
from planner.rankcache import BandTable, BandTables, rank_key
from planner.ranking import Ranker
from planner.refresh import Refresh
from planner.state import AgentState, PlannerState, WorkerState
from planner.store import APPLIED, REFUSED, AgentRecord
from runtime.contracts.costmodel import Configuration
from runtime.contracts.errors import NotFound
from runtime.contracts.profile import Profile
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

logger = logging.getLogger(__name__)

Ranking = tuple[list[Ranked], float, Configuration | None]  # best first, seconds it took, the plan's prediction
GAUGE_SECONDS = 5.0  # how often the periodic pass refreshes the gauges that read every agent
DEFER_SECONDS = 2.0  # a periodic pass waits at most this long while registrations wait their turn
DEFER_STEP_SECONDS = 0.05  # ... looking again this often


class RePlanner:
    def __init__(self, config: PlannerConfig, state: PlannerState, broadcaster: Broadcaster, metrics: PlannerMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.state = state
        self.broadcaster = broadcaster
        self.metrics = metrics
        self.clock = clock
        self.hysteresis = Hysteresis(config.switch_gain, config.switch_min_gain_seconds, config.hold_seconds, clock)
        # rankings: the search executor, its caches, the link bands and the shared rankings (planner.ranking)
        self.ranker = Ranker(config, state, metrics)
        self.executor, self.cache, self.rank_cache = self.ranker.executor, self.ranker.cache, self.ranker.rank_cache
        self.rank, self.prefetch = self.ranker.rank, self.ranker.prefetch
        self.band_tables = BandTables()  # the planner's own band tables of running plans, shared (planner.rankcache)
        # parallel stages over several workers (planner.parallel_push), tiles priced by the measured factors
        self.parallel = ParallelPlanner(tile_factors=load_tile_factors(config.parallel_tile_factors),
                                        halo=config.parallel_halo, halo_round_seconds=config.parallel_halo_round_ms / 1e3)
        self.intake = Intake(config.telemetry_max_pending, config.telemetry_max_age_seconds, metrics, self.decide)
        self._basis: dict[str, Basis] = {}  # agent id -> what its plan's bands were ranked with (planner.inband)
        self._banded: dict[str, int] = {}  # agent id -> plan version whose bands were ranked
        self.gc = GcFreezer(config.gc_freeze_agents)  # full GC scans of long-lived agent state: rare and short
        self._previous: dict[str, pb.Plan] = {}  # agent id -> its plan before the current one (version, model, split)
        self._gauged = -float("inf")  # monotonic time the per-agent gauges were last refreshed
        self.refresh = Refresh(config.hold_seconds, clock)  # kept plans whose prediction moved (planner.refresh)
        self._ticker: asyncio.Task[None] | None = None
        self._closing = False
        self._wake = asyncio.Event()  # run the periodic pass now (a worker registered, a plan was refused)
        self.registering: Callable[[], bool] = lambda: False  # registrations wait their turn (set by the servicer)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick_loop(), name="planner-replan")
        self.intake.start()

    def wake(self) -> None:
        """Run the periodic pass now."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop re-planning (the executor stays until :meth:`shutdown`)."""
        # A flag, not only cancel(): on Python 3.11 asyncio.wait_for loses a cancellation that
        # races with the awaited event being set, and RegisterWorker/telemetry set it all the
        # time, so a cancelled ticker could keep running and close() wait for it forever.
        self._closing = True
        self._wake.set()
        await self.intake.stop()
        if self._ticker is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._ticker), 5.0)
            except asyncio.TimeoutError:
                self._ticker.cancel()
                await asyncio.gather(self._ticker, return_exceptions=True)
            self._ticker = None

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _tick_loop(self) -> None:
        while not self._closing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.replan_interval_seconds)
            if self._closing:
                break
            deferred = time.monotonic()  # registrations waiting their turn go first (a replica's agents re-attaching)
            while self.registering() and time.monotonic() - deferred < DEFER_SECONDS and not self._closing:
                await asyncio.sleep(DEFER_STEP_SECONDS)
            self._wake.clear()
            try:
                # the gauges that read every agent: every few seconds, not every pass
                await self.tick(gauges=time.monotonic() - self._gauged >= min(GAUGE_SECONDS,
                                                                              self.config.replan_interval_seconds * 10))
            except Exception:
                logger.exception("periodic re-planning failed")

    async def tick(self, gauges: bool = True) -> None:
        """Decide for agents with new conditions or a switch on hold (those the telemetry intake holds
        are its own), at most ``replan_batch`` of them (the rest: the next pass, which follows at once),
        yielding to the event loop between decisions; refresh the per-agent gauges now and then."""
        agents = self.state.agents
        if gauges:
            self._gauged = time.monotonic()
            self._gauges()
        dirty: list[AgentState] = []
        holding: list[AgentState] = []  # re-evaluated once per interval, never in a tight loop
        for aid, st in agents.items():
            if st.dirty and aid not in self.intake:
                dirty.append(st)
            elif self.hysteresis.holding(aid):
                holding.append(st)
        for st in (dirty + holding)[:self.config.replan_batch]:
            await self.decide(st)
            await asyncio.sleep(0)  # one decision at a time: health checks and plan pushes go between
        if len(dirty) > self.config.replan_batch:  # the rest of the changed ones: the next pass, at once
            self._wake.set()

    def _gauges(self) -> None:
        """The gauges that read every agent (O(agents): refreshed every few seconds, not per pass)."""
        agents = self.state.agents
        now = time.time()
        # agents with an open WatchPlan stream only: one that left keeps its record (and its last links),
        # and its growing age would hold the stale-telemetry alert on forever
        ages = [now - max(lk.updated_unix for lk in st.links.values()) for aid, st in agents.items()
                if st.links and self.broadcaster.watching(aid)]
        self.metrics.telemetry_age_seconds.set(max(ages) if ages else 0.0)
        self.metrics.device_slowdown_max.set(max((st.speed.factor for st in agents.values()), default=1.0))
        self.metrics.worker_slowdown_max.set(max((s.applied for st in agents.values() for s in st.tails.speeds.values()),
                                                 default=1.0))
        self.gc.check(len(agents))
        memos: tuple[dict[str, Any], ...] = (self._basis, self._banded, self._previous, *self.refresh.memos)
        for memo in memos:  # agents no longer held here (another replica took them)
            for aid in [a for a in memo if a not in agents]:
                del memo[aid]

    # -- ranking -------------------------------------------------------------------------------

    async def query(self, st: AgentState, top_n: int, rtt: float, bandwidth: float,
                    record: AgentRecord | None) -> tuple[list[Ranked], float]:
        """The ``top_n`` best configurations under a query's link and constraints (no plan changes), at
        the link's figures exactly (a query asks about those, not about a band)."""
        ranked, seconds, _ = await self.rank(st, top_n, rtt=rtt, bandwidth=bandwidth, record=record, exact=True)
        return ranked, seconds

    # -- decisions -----------------------------------------------------------------------------

    def _refusal_stands(self, st: AgentState) -> bool:
        """A refused plan stays out while the workers and links are (nearly) as they were at the refusal."""
        if st.refused_key is None:
            return False
        then, now = st.refused_conditions, self.state.conditions(st)
        tol = max(self.config.switch_gain, 0.01)

        def moved(a: float, b: float) -> bool:
            return abs(a - b) > tol * max(abs(b), 1e-9)

        if then.keys() != now.keys() or any(
                now[w][0] != then[w][0] or moved(now[w][1], then[w][1]) or moved(now[w][2], then[w][2]) for w in now):
            logger.info("agent %s: conditions changed since it refused %s; that plan may be proposed again",
                        st.record.id, st.refused_key)
            st.refused_key, st.refused_conditions = None, {}
            return False
        return True

    async def _issue(self, st: AgentState, r: Ranked, reason: str, label: str) -> pb.Plan:
        plan = decide.to_plan(st.record, st.device, r, reason)
        wid, measured = fallbacks.band_worker(self.state, st, plan)
        if wid and wid in self.state.workers:  # what attach ranks, in one executor job
            record = dataclasses.replace(st.record, workers=(wid,))
            await self.prefetch(st, [(measured * f, record) for f in fallbacks.GRID])
        around = await fallbacks.attach(self.state, self.rank, st, plan)  # the agent's own switches off its band
        await self.parallel.consider(self.state, st, plan, self.executor)  # Plan.parallel when faster (DPFP)
        plan = await self.state.issue_plan(plan)  # committed before it is pushed
        if st.plan is not None:
            self._previous[st.record.id] = pb.Plan(version=st.plan.version, model_id=st.plan.model_id,
                                                   split_index=st.plan.split_index)
        st.plan = plan
        self._set_basis(st, around=around)
        self.hysteresis.reset(st.record.id)
        st.cause = "telemetry"
        self.metrics.plan_changes.labels(label).inc()
        route = "".join(f" -> {h.worker_id}@{h.end_split or 'output'} via {h.codec or '-'}" for h in plan.next_hops)
        logger.info("agent %s: plan v%d %s@%s via %s%s (%.2f ms predicted): %s", st.record.id, plan.version,
                    plan.worker_id or "local", plan.split_id, plan.codec or "-",
                    f" (slice ..{plan.end_split}{route})" if plan.end_split else "", plan.predicted_seconds * 1e3, reason)
        self.broadcaster.publish(st.record.id, plan)
        return plan

    async def decide(self, st: AgentState) -> None:
        """Re-plan one running agent under its current conditions, through the hysteresis."""
        async with st.lock:
            if self.state.agents.get(st.record.id) is not st:  # re-registered meanwhile
                return
            st.dirty = False
            cause = st.cause
            refresh_cause = "compute" if st.model_moved else cause  # planner.refresh: only for a model that moved
            st.model_moved = False
            self.state.save_links(st)
            aid = st.record.id
            exclude = st.refused_key if self._refusal_stands(st) else None
            ranked, _, current = await self.rank(st, 1, exclude=exclude, predict=st.plan)
            if not ranked:
                if st.plan is not None and current is None:
                    logger.warning("agent %s: plan v%d is no longer feasible and nothing else is", aid, st.plan.version)
                return
            best = ranked[0]
            if st.plan is None:
                await self._issue(st, best, f"{cause}: first feasible configuration", cause)
                return
            if current is not None and decide.config_key(st.device, best) == plan_key(st.plan):
                self.hysteresis.reset(aid)
                if await self.parallel.changed(self.state, st, self.executor):  # usable workers changed: DPFP again
                    await self._issue(st, best, f"{cause}: usable workers changed, parallel stage reconsidered", cause)
                    return
                if self.refresh.due(st, refresh_cause, best.config):
                    await self._refresh(st, best)
                    return
                await self._rank_bands(st, again=not self._confirm_basis(st))
                return
            await self._switch(st, best, current, cause, refresh_cause)

    def _set_basis(self, st: AgentState, plan: pb.Plan | None = None, around: float = 0.0) -> None:
        """Remember the band of the running plan (``plan``: it, or a copy carrying the bands ranked
        for it now around the bandwidth ``around``) and what it was ranked with (planner.inband);
        none when no band within the ranked span holds it."""
        aid = st.record.id
        plan = plan or st.plan
        self._basis.pop(aid, None)
        if plan is None or st.plan is None:
            return
        if plan is not st.plan or plan.fallbacks or fallbacks.band_worker(self.state, st, plan)[0]:
            self._banded[aid] = st.plan.version  # bands were ranked for this version (found or not): not again
        wid = self.state.resolve_worker(plan.band_worker_address) if plan.fallbacks else ""
        lk = self.state.measured_link(st, wid) if wid else None
        if lk is not None:
            basis = basis_of(plan, st.plan.version, wid, lk.rtt_seconds, lk.bandwidth_bytes_per_second, around)
            if basis is not None:
                self._basis[aid] = basis

    async def _rank_bands(self, st: AgentState, again: bool = False) -> None:
        """The running plan's bands were not ranked here (it was issued before its link was measured, or by
        another replica or before a restart: the plan carries its bands, but not the bandwidth they were
        ranked around), or (``again``) it was kept with its link outside the span its bands were ranked
        over: rank its bands now, around the link's current bandwidth, for the planner's own in-band check
        only (the agent gets bands with its next plan). Without it, every report of an agent taken over
        from a dead replica was decided in full (its plan's bands were never ranked here)."""
        if st.plan is None or (not again and self._banded.get(st.record.id) == st.plan.version):
            return
        wid, measured = fallbacks.band_worker(self.state, st, st.plan)
        if not wid or wid not in self.state.workers:
            return
        probe = pb.Plan()
        probe.CopyFrom(st.plan)
        del probe.fallbacks[:]
        record = dataclasses.replace(st.record, workers=(wid,))
        cands = [self.ranker.bands.candidate(c) for c in self.ranker.candidates(st, 0.0, measured, record)]
        key, held = rank_key(st.device, record, cands, 1, None, None)
        table = self.band_tables.get(key)  # another agent ranked the same table (planner.rankcache.BandTables)
        if table is None:
            await self.prefetch(st, [(measured * f, record) for f in fallbacks.GRID])
            around = await fallbacks.attach(self.state, self.rank, st, probe)
            table = BandTable(tuple(probe.fallbacks), probe.band_worker_address, around)
            if around > 0:
                self.band_tables.put(key, held, table)
        else:
            probe.fallbacks.extend(table.fallbacks)
            probe.band_worker_address = table.address
        self._set_basis(st, probe, table.around)

    def _confirm_basis(self, st: AgentState) -> bool:
        """The running plan was decided again and kept: in-band estimates are measured from now on.
        False when its link has left the span its bands were ranked over (they say nothing there)."""
        b = self._basis.get(st.record.id)
        lk = self.state.measured_link(st, b.worker) if b is not None else None
        if b is not None and lk is not None and st.plan is not None and b.version == st.plan.version:
            self._basis[st.record.id] = dataclasses.replace(b, bandwidth=lk.bandwidth_bytes_per_second)
            return b.ranked(lk.bandwidth_bytes_per_second)
        return True

    async def _switch(self, st: AgentState, best: Ranked, current: Configuration | None, cause: str,
                      refresh_cause: str = "") -> None:
        """Replace the running plan by ``best`` if the hysteresis says so."""
        assert st.plan is not None
        objective = decide.objective(st.record)
        cur = None if current is None else decide.score(current, objective)
        verdict = self.hysteresis.update(st.record.id, cur, decide.score(best.config, objective))
        if not verdict.switch:
            if current is not None and not self.hysteresis.holding(st.record.id) and self.refresh.due(
                    st, refresh_cause or cause, current):
                await self._refresh(st, Ranked(current, st.plan.worker_id, st.plan.worker_address,
                                               tuple((h.worker_id, h.address) for h in st.plan.next_hops)))
            return
        if cur is None:
            reason = f"plan v{st.plan.version} is no longer feasible (worker gone, moved or excluded, or constraints)"
            label = "infeasible"
        else:
            lk = st.links.get(best.worker_id) if best.worker_id else None
            link = f"; link to {best.worker_id}: {lk.bandwidth_bytes_per_second / 1e6:.2f} MB/s, " \
                   f"{lk.rtt_seconds * 1e3:.1f} ms RTT" if lk else ""
            if st.speed.applied != 1.0:
                link += f"; device compute {st.speed.applied:.2f}x its profile"
            if best.worker_id and st.tails.applied(best.worker_id) != 1.0:
                link += f"; {best.worker_id}'s compute {st.tails.applied(best.worker_id):.2f}x its profile"
            reason = (f"{cause}: predicted {decide.score(best.config, objective) * 1e3:.2f} ms vs {cur * 1e3:.2f} ms "
                      f"for v{st.plan.version}, gain held {verdict.held_seconds:.1f} s{link}")
            label = cause
        await self._issue(st, best, reason, label)

    async def _refresh(self, st: AgentState, kept: Ranked) -> None:
        """The running configuration stays, re-costed with the compute factors measured since it was issued:
        issued again, so that the agent's result lines carry what the model predicts now."""
        assert st.plan is not None
        self.refresh.done(st.record.id)
        await self._issue(st, kept, f"{st.cause}: same configuration, predicted {kept.config.seconds * 1e3:.2f} ms now "
                                    f"against {st.plan.predicted_seconds * 1e3:.2f} ms at v{st.plan.version}", "prediction")

    # -- what changes conditions ---------------------------------------------------------------

    async def register(self, rec: AgentRecord, device: Profile) -> pb.Plan:
        """Hold an agent's registration and decide its plan at once (a plan with only a reason when
        nothing is feasible yet: one follows on WatchPlan when something is)."""
        aid = rec.id
        old = self.state.agents.get(aid)
        lock = old.lock if old is not None else asyncio.Lock()
        async with lock:
            st, old = self.state.put_agent(rec, device, lock)
            self.hysteresis.reset(aid)
            ranked, _, current = await self.rank(st, 1, predict=st.plan)
            if not ranked:
                reason = ("no configuration satisfies this agent's constraints with the workers registered now; a plan "
                          "follows on WatchPlan when one does (relax the constraints or register a worker)")
                logger.warning("agent %s: %s", aid, reason)
                return pb.Plan(agent_id=aid, model_id=rec.model, reason=reason)
            best = ranked[0]
            if st.plan is not None and current is not None and decide.config_key(st.device, best) == plan_key(st.plan):
                await self._rank_bands(st)  # taken over or resumed from the store: its in-band basis is not here yet
                return st.plan
            return await self._issue(st, best, "registration" if old is None else "re-registration", "registration")

    def worker_registered(self, models: dict[str, Profile], old: WorkerState | None, worker_id: str = "") -> None:
        """A worker (re-)registered with ``models`` (or left: ``old`` alone): the agents that could use it
        (or used it) are decided by the periodic passes, ``replan_batch`` at a time, woken now. A periodic
        re-registration that changes nothing marks nobody (O(1)): it must not overwrite the reason
        (say, a telemetry change) a pending decision records."""
        if old is not None and _unchanged(old, self.state.workers.get(old.record.id)):
            return
        wid = worker_id or (old.record.id if old is not None else "")
        affected = set(models) | (set(old.profiles) if old is not None else set())
        for st in self.state.agents.values():
            if st.record.model in affected and (not wid or _may_use(st.record, wid) or (st.plan is not None and (
                    st.plan.worker_id == wid or any(h.worker_id == wid for h in st.plan.next_hops)))):
                st.mark("worker")
        self._wake.set()

    def telemetry(self, st: AgentState, t: pb.Telemetry, bandwidth: float, rtt: float) -> bool:
        """One checked telemetry message: record its link and compute figures (in memory); True when
        they could change the plan and a decision is due now (at most ``telemetry_max_rate_hz`` per
        agent; the rest wait for the periodic pass): the caller queues it (:class:`planner.intake.Intake`).
        An estimate inside the running plan's band is only recorded (:mod:`planner.inband`)."""
        worker = self.state.resolve_worker(t.worker)
        now = time.time()
        if t.sent_unix > 0:
            self.metrics.telemetry_delay_seconds.observe(max(0.0, now - t.sent_unix))
        st.record.last_seen = now
        if worker and (bandwidth > 0 or rtt > 0):
            # measured when its last sample was taken, not when the message came (an old figure ages out)
            self.state.record_link(st, worker, rtt, bandwidth, now - t.bandwidth_age_seconds if bandwidth > 0 else now)
            lk = st.links[worker]
            if self.hysteresis.holding(st.record.id) or not in_band(
                    st.plan, self._basis.get(st.record.id), worker, lk.bandwidth_bytes_per_second, lk.rtt_seconds,
                    self.hysteresis):
                st.mark("telemetry")
            else:
                self.metrics.telemetry_in_band.inc()
        elif t.worker and not worker:
            self.metrics.telemetry_unknown_worker.inc()
            logger.debug("agent %s: telemetry for %r, which is no registered worker; link ignored", st.record.id,
                         t.worker[:80])
        for lk in t.other_links:  # links the agent probed beside its plan's (checked in requests.check_telemetry)
            wid = self.state.resolve_worker(lk.worker)
            old = self.state.measured_link(st, wid) if wid else None
            if old is not None and (old.bandwidth_bytes_per_second, old.rtt_seconds) == (lk.bandwidth_bytes_per_second,
                                                                                      lk.rtt_seconds):
                continue  # reported again unchanged
            if (old is not None and wid != worker and _close(old.bandwidth_bytes_per_second, lk.bandwidth_bytes_per_second,
                                                             self.config.rank_band)
                    and _close(old.rtt_seconds, lk.rtt_seconds, self.config.switch_gain)):
                # moved less than a band: the recorded figures stand (no drift by small steps), only fresher
                old.updated_unix = max(old.updated_unix, now - lk.bandwidth_age_seconds)
                continue
            if wid and wid != worker and (lk.bandwidth_bytes_per_second > 0 or lk.rtt_seconds > 0):
                bw = lk.bandwidth_bytes_per_second
                self.state.record_link(st, wid, lk.rtt_seconds, bw, now - lk.bandwidth_age_seconds if bw > 0 else now)
                st.mark("telemetry")
        # the model moved (compute factors, runtime overheads, bytes per frame): decide again; a link change in the
        # same message stays the recorded cause (it is what the agent saw change; the decision uses both)
        model = self.config.compute_telemetry and bool(t.stage_seconds) and measured.observe_compute(
            self.state, self.metrics, st, t, self._previous.get(st.record.id))
        model = measured.observe_wire(st, t, now) or model  # transfers priced with the bytes the agent measured
        if model:
            st.model_moved = True  # a kept plan's prediction may be re-issued for it (planner.refresh), whatever the cause
            if not st.dirty:
                st.mark("compute")
        mono = self.clock()
        if st.dirty and mono - st.last_acted >= 1.0 / self.config.telemetry_max_rate_hz:
            st.last_acted = mono
            return True
        return False

    async def plan_status(self, st: AgentState, request: pb.PlanStatus) -> None:
        """An agent applied or refused a plan; a refusal of the running plan puts the one before back and
        keeps the refused one out until conditions change."""
        async with st.lock:
            status = APPLIED if request.applied else REFUSED
            if not await self.state.set_plan_status(st.record.id, request.version, status, request.message):
                raise NotFound(f"agent {st.record.id} has no plan version {request.version}"
                               + (f" (its current plan is v{st.plan.version})" if st.plan else ""))
            if request.applied:
                return
            st.mark("refusal")  # decide again, without the refused plan
            self._wake.set()
            self.metrics.refusals.inc()
            st.record.refused_version, st.record.refused_message = request.version, request.message
            stored = self.state.stored_plan(st.record.id, request.version)
            assert stored is not None
            logger.warning("agent %s refused plan v%d: %s", st.record.id, request.version,
                           request.message or "(no reason)")
            if st.plan is not None and st.plan.version == request.version:
                back = self.state.current_plan(st.record.id)
                st.plan = back.plan if back else None
                st.refused_key = plan_key(stored.plan)
                st.refused_conditions = self.state.conditions(st)
                self.hysteresis.reset(st.record.id)


def _close(a: float, b: float, rel: float) -> bool:
    return a == b or abs(a - b) <= rel * max(abs(a), abs(b))


def _may_use(rec: AgentRecord, worker_id: str) -> bool:
    """Whether an agent's registration allows ``worker_id`` (its list, include and exclude constraints)."""
    c = rec.constraints
    return ((not rec.workers or worker_id in rec.workers) and worker_id not in c.exclude_workers
            and (not c.include_workers or worker_id in c.include_workers))


def _unchanged(old: WorkerState, new: WorkerState | None) -> bool:
    """Whether a worker's new registration says what its old one did (address, tier, TLs, next tiers, profiles)."""
    if new is None or new is old:
        return False
    a, b = old.record, new.record
    return (a.address, a.tier, a.tl_ids, a.next_tiers, a.profiles) == (b.address, b.tier, b.tl_ids, b.next_tiers, b.profiles)
