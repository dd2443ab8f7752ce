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
slower link.

The state it reads and marks is :class:`planner.state.PlannerState`; an issued plan goes to the
agent's WatchPlan streams through :class:`planner.broadcaster.Broadcaster`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from planner import decide, fallbacks
from planner.broadcaster import Broadcaster
from planner.config import PlannerConfig
from planner.decide import Chain, DecisionCache, PlanKey, Ranked, plan_key
from planner.hysteresis import Hysteresis
from planner.metrics import PlannerMetrics
from planner.state import AgentState, PlannerState, WorkerState
from planner.store import APPLIED, REFUSED, AgentRecord
from runtime.contracts.costmodel import Configuration
from runtime.contracts.errors import NotFound
from runtime.contracts.profile import Profile
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

logger = logging.getLogger(__name__)

Ranking = tuple[list[Ranked], float, Configuration | None]  # best first, seconds it took, the plan's prediction


class RePlanner:
    def __init__(self, config: PlannerConfig, state: PlannerState, broadcaster: Broadcaster, metrics: PlannerMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.state = state
        self.broadcaster = broadcaster
        self.metrics = metrics
        self.clock = clock
        self.hysteresis = Hysteresis(config.switch_gain, config.switch_min_gain_seconds, config.hold_seconds, clock)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="planner-search")
        self.cache = DecisionCache()  # used by the executor's searches (and _chain_of, on the loop)
        self._ticker: asyncio.Task[None] | None = None
        self._closing = False
        self._wake = asyncio.Event()  # run the periodic pass now (a worker registered, a plan was refused)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick_loop(), name="planner-replan")

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
            self._wake.clear()
            try:
                await self.tick()
            except Exception:
                logger.exception("periodic re-planning failed")

    async def tick(self) -> None:
        """Decide for every agent with new conditions or a switch on hold; refresh the age gauge."""
        agents = self.state.agents
        now = time.time()
        # agents with an open WatchPlan stream only: one that left keeps its record (and its last links),
        # and its growing age would hold the stale-telemetry alert on forever
        ages = [now - max(lk.updated_unix for lk in st.links.values()) for aid, st in agents.items()
                if st.links and self.broadcaster.watchers(aid)]
        self.metrics.telemetry_age_seconds.set(max(ages) if ages else 0.0)
        self.metrics.device_slowdown_max.set(max((st.speed.factor for st in agents.values()), default=1.0))
        for aid, st in list(agents.items()):
            if st.dirty or self.hysteresis.holding(aid):
                await self.decide(st)

    # -- ranking -------------------------------------------------------------------------------

    async def rank(self, st: AgentState, top_n: int, rtt: float = 0.0, bandwidth: float = 0.0,
                   exclude: PlanKey | None = None, predict: pb.Plan | None = None,
                   record: AgentRecord | None = None) -> Ranking:
        """Rank now (and predict ``predict`` under the same conditions), for ``record`` (default: the
        agent's; a query may bring other constraints); profiles are derived here, on the event loop,
        and only the searches run in the executor."""
        cands = self.state.candidates(st, rtt, bandwidth, record)
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

        rec, device, include_return, cache = record or st.record, st.device, self.config.include_return, self.cache

        def work() -> Ranking:
            ranked, seconds = decide.rank(rec, device, cands, devices, top_n, include_return, exclude, chained,
                                          cache)
            current = (decide.predict(rec, device, predict, cand, pinned, include_return, chain, forward, cache)
                       if predict is not None else None)
            return ranked, seconds, current

        ranked, seconds, current = await asyncio.get_running_loop().run_in_executor(self.executor, work)
        self.metrics.decision_seconds.observe(seconds)
        return ranked, seconds, current

    def _chain_of(self, plan: pb.Plan, chains: list[Chain]) -> tuple[Chain | None, Profile | None]:
        """The chain a chained ``plan`` runs over now and the edge's profile limited to its hop's
        transfer ((None, None): the pair no longer chains, or the hop is not one it can run)."""
        hop = plan.next_hops[0]
        chain = next((c for c in chains if c.first.worker_id == plan.worker_id
                      and c.second.worker_id == hop.worker_id), None)
        if chain is None or len(plan.next_hops) != 1 or hop.tl_id or not plan.end_split_index > 0:
            return None, None
        return chain, decide.forwarding_at(chain.first.profile, plan.end_split_index, hop.codec, self.cache)

    async def query(self, st: AgentState, top_n: int, rtt: float, bandwidth: float,
                    record: AgentRecord | None) -> tuple[list[Ranked], float]:
        """The ``top_n`` best configurations under a query's link and constraints (no plan changes)."""
        ranked, seconds, _ = await self.rank(st, top_n, rtt=rtt, bandwidth=bandwidth, record=record)
        return ranked, seconds

    # -- decisions -----------------------------------------------------------------------------

    def _refusal_stands(self, st: AgentState) -> bool:
        """A refused plan stays out while the workers and links are (nearly) as they were at the refusal."""
        if st.refused_key is None:
            return False
        then, now = st.refused_conditions, self.state.conditions(st)
        tol = max(self.config.switch_gain, 0.01)
        moved = lambda a, b: abs(a - b) > tol * max(abs(b), 1e-9)  # noqa: E731
        if then.keys() != now.keys() or any(
                now[w][0] != then[w][0] or moved(now[w][1], then[w][1]) or moved(now[w][2], then[w][2]) for w in now):
            logger.info("agent %s: conditions changed since it refused %s; that plan may be proposed again",
                        st.record.id, st.refused_key)
            st.refused_key, st.refused_conditions = None, {}
            return False
        return True

    async def _issue(self, st: AgentState, r: Ranked, reason: str, label: str) -> pb.Plan:
        plan = decide.to_plan(st.record, st.device, r, reason)
        await fallbacks.attach(self.state, self.rank, st, plan)  # the agent's own switches when its link leaves the band
        plan = self.state.issue_plan(plan)
        st.plan = plan
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
                return
            await self._switch(st, best, current, cause)

    async def _switch(self, st: AgentState, best: Ranked, current: Configuration | None, cause: str) -> None:
        """Replace the running plan by ``best`` if the hysteresis says so."""
        assert st.plan is not None
        objective = decide.objective(st.record)
        cur = None if current is None else decide.score(current, objective)
        verdict = self.hysteresis.update(st.record.id, cur, decide.score(best.config, objective))
        if not verdict.switch:
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
            reason = (f"{cause}: predicted {decide.score(best.config, objective) * 1e3:.2f} ms vs {cur * 1e3:.2f} ms "
                      f"for v{st.plan.version}, gain held {verdict.held_seconds:.1f} s{link}")
            label = cause
        await self._issue(st, best, reason, label)

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
                return st.plan
            return await self._issue(st, best, "registration" if old is None else "re-registration", "registration")

    def worker_registered(self, models: dict[str, Profile], old: WorkerState | None) -> None:
        """A worker (re-)registered with ``models``: its agents are decided by the periodic pass, woken now.
        A periodic re-registration that changes nothing wakes nobody: it must not overwrite the reason
        (say, a telemetry change) a pending decision records."""
        if old is not None and _unchanged(old, self.state.workers.get(old.record.id)):
            return
        for st in self.state.agents.values():
            if st.record.model in models or (old and st.record.model in old.profiles):
                st.mark("worker")
        self._wake.set()

    async def telemetry(self, st: AgentState, t: pb.Telemetry, bandwidth: float, rtt: float) -> None:
        """One checked telemetry message: its link and compute figures, and a decision if they changed
        (at most ``telemetry_max_rate_hz`` per agent; the rest wait for the periodic pass)."""
        worker = self.state.resolve_worker(t.worker)
        now = time.time()
        if t.sent_unix > 0:
            self.metrics.telemetry_delay_seconds.observe(max(0.0, now - t.sent_unix))
        st.record.last_seen = now
        if worker and (bandwidth > 0 or rtt > 0):
            # measured when its last sample was taken, not when the message came (an old figure ages out)
            self.state.record_link(st, worker, rtt, bandwidth, now - t.bandwidth_age_seconds if bandwidth > 0 else now)
            st.mark("telemetry")
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
            if wid and wid != worker and (lk.bandwidth_bytes_per_second > 0 or lk.rtt_seconds > 0):
                bw = lk.bandwidth_bytes_per_second
                self.state.record_link(st, wid, lk.rtt_seconds, bw, now - lk.bandwidth_age_seconds if bw > 0 else now)
                st.mark("telemetry")
        if self.config.compute_telemetry and t.stage_seconds and self._observe_compute(st, t):
            st.mark("compute")
        mono = self.clock()
        if st.dirty and mono - st.last_acted >= 1.0 / self.config.telemetry_max_rate_hz:
            st.last_acted = mono
            await self.decide(st)

    def _observe_compute(self, st: AgentState, t: pb.Telemetry) -> bool:
        """Take one report's device stage times into the agent's slowdown factor; True when the
        factor decisions use moved. A report under no plan of this agent (version 0: the agent's own
        split; a version this planner never issued to it) gives no sample."""
        plan = st.plan if st.plan is not None and st.plan.version == t.plan_version else None
        if plan is None and t.plan_version:
            stored = self.state.stored_plan(st.record.id, t.plan_version)
            plan = stored.plan if stored is not None else None
        if plan is None or plan.model_id != st.record.model:
            return False
        assert st.benchmark is not None
        outcome = st.speed.observe(t.stage_seconds, st.benchmark, plan.split_index)
        if outcome is not None:
            self.metrics.compute_samples.labels(outcome).inc()
        if outcome != "used" or not st.apply_speed():
            return False
        logger.debug("agent %s: device compute now %.2fx its profile", st.record.id, st.speed.factor)
        return True

    async def plan_status(self, st: AgentState, request: pb.PlanStatus) -> None:
        """An agent applied or refused a plan; a refusal of the running plan puts the one before back and
        keeps the refused one out until conditions change."""
        async with st.lock:
            status = APPLIED if request.applied else REFUSED
            if not self.state.set_plan_status(st.record.id, request.version, status, request.message):
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


def _unchanged(old: WorkerState, new: WorkerState | None) -> bool:
    """Whether a worker's new registration says what its old one did (address, tier, TLs, next tiers, profiles)."""
    if new is None or new is old:
        return False
    a, b = old.record, new.record
    return (a.address, a.tier, a.tl_ids, a.next_tiers, a.profiles) == (b.address, b.tier, b.tl_ids, b.next_tiers, b.profiles)
