"""The Planner gRPC service: registrations, telemetry, plan decisions and their distribution.

State lives in memory (parsed profiles, link estimates, the plan each agent runs, WatchPlan
streams) and in :class:`planner.store.Store` (everything that must survive a restart). Every
decision ranks configurations with :func:`planner.search.search`, once per candidate worker (a
Transfer Layer is usable only where both the agent and that worker hold it), in a one-thread
executor so the event loop stays responsive. A change of plan for a running agent goes through
:class:`planner.hysteresis.Hysteresis`; a first plan, a re-registration and a running plan that
became infeasible are decided at once.

Chained plans (device -> edge -> cloud): an edge worker registers its ``--next-tier`` allowlist
(``RegisterWorkerRequest.next_tiers``), and each decision also ranks every (edge, cloud) pair in
which the edge forwards to the cloud worker's registered address (:func:`planner.decide.chains`),
with the configured worker-to-worker link (``worker_link_*``: agents measure only their own link).
A chained plan carries its route (``Plan.end_split``, ``next_hops``); its key includes the route,
so hysteresis, refusals and versions treat it like any other plan.

Device compute telemetry (the ``head`` stage median against the profile's prediction for the
split the agent runs) keeps a smoothed slowdown factor per agent (:mod:`planner.compute`); the
device profile every decision and query uses is the registered one with its block times scaled
by it, so a board that slows down moves work to a worker through the same hysteresis as a
slower link. The factor is stored (``device_speed``) with the agent's links.

Requests are checked by :mod:`planner.requests`; the ranking, the re-costing of a running plan and
the Configuration -> Plan mapping are in :mod:`planner.decide`. This module holds the state and
the servicer: who is registered, what each agent runs, when to decide, and who is told.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import grpc

from planner import compute, decide
from runtime.contracts import profile as profiles
from planner import requests
from planner.compute import DeviceSpeed
from planner.config import PlannerConfig
from runtime.contracts.costmodel import Link
from planner.decide import Candidate, Chain, PlanKey, Ranked, plan_key
from planner.hysteresis import Hysteresis
from planner.metrics import PlannerMetrics
from runtime.contracts.profile import Profile
from planner.store import APPLIED, REFUSED, AgentRecord, LinkRecord, SpeedRecord, Store, WorkerRecord
from runtime.contracts.errors import EdgesplitError, NotFound, Overloaded, PreconditionFailed
from runtime.proto.edgesplit.v1 import planner_pb2 as pb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

# -- state ---------------------------------------------------------------------------------------


@dataclass
class WorkerState:
    record: WorkerRecord
    profiles: dict[str, Profile]  # model -> profile with machine = worker id
    generation: int = 0


@dataclass(eq=False)
class _Watcher:
    event: asyncio.Event = field(default_factory=asyncio.Event)
    latest: pb.Plan | None = None
    closed: bool = False


@dataclass
class AgentState:
    record: AgentRecord
    device: Profile  # what decisions use: the registered profile scaled by speed.applied
    plan: pb.Plan | None = None  # what the planner believes runs (the last plan not refused)
    links: dict[str, LinkRecord] = field(default_factory=dict)  # worker id -> last estimate
    unsaved_links: set[str] = field(default_factory=set)
    last_acted: float = -math.inf  # monotonic time telemetry last triggered a decision
    dirty: bool = False  # conditions changed since the last decision
    cause: str = "telemetry"  # what changed them (a metrics label of PLAN_REASONS)
    refused_key: PlanKey | None = None  # not proposed again until conditions change
    refused_conditions: dict = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    watchers: set[_Watcher] = field(default_factory=set)
    _derived: dict = field(default_factory=dict)  # cached device profiles (stable ids for the search's cache)
    speed: DeviceSpeed = field(default_factory=DeviceSpeed)  # measured / profiled device compute
    benchmark: Profile | None = None  # the device profile as registered (default: device)

    def __post_init__(self):
        if self.benchmark is None:
            self.benchmark = self.device

    def apply_speed(self, force: bool = False) -> bool:
        """Scale the device profile decisions use by the slowdown factor, if it moved (or ``force``);
        True when it did."""
        if not (force or self.speed.moved()):
            return False
        self.speed.applied = self.speed.factor
        self.device = compute.scaled(self.benchmark, self.speed.factor)
        self._derived.clear()
        return True

    def device_for(self, tl_ids: frozenset[str], cut_transfer: tuple[int, str, str] | None = None) -> Profile | None:
        """The device profile limited to TLs held on both ends, optionally to one transfer at one cut."""
        key = (tl_ids, cut_transfer)
        if key in self._derived:
            return self._derived[key]
        p = decide.limit_device(self.device, tl_ids, cut_transfer)
        if len(self._derived) > 64:
            self._derived.clear()
        self._derived[key] = p
        return p


# -- the service ---------------------------------------------------------------------------------


def _rpc(fn):
    """Map EdgesplitError to its status (with its message); anything else to INTERNAL."""

    @functools.wraps(fn)
    async def wrapper(self: PlannerService, request, context: grpc.aio.ServicerContext):
        try:
            return await fn(self, request, context)
        except EdgesplitError as e:
            self.metrics.errors.labels(e.code.name).inc()
            await context.abort(e.code, str(e))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug: log it, answer INTERNAL instead of UNKNOWN
            logger.exception("%s failed", fn.__name__)
            self.metrics.errors.labels("INTERNAL").inc()
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")

    return wrapper


class PlannerService(pb_grpc.PlannerServicer):
    def __init__(self, config: PlannerConfig, store: Store, metrics: PlannerMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.store = store
        self.metrics = metrics or PlannerMetrics()
        self.clock = clock
        self.hysteresis = Hysteresis(config.switch_gain, config.switch_min_gain_seconds, config.hold_seconds, clock)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="planner-search")
        self.workers: dict[str, WorkerState] = {}
        self.agents: dict[str, AgentState] = {}
        self.generation = 0  # counts worker registrations (each worker remembers the one that made it)
        self._ticker: asyncio.Task | None = None
        self._closing = False
        self._wake = asyncio.Event()  # run the periodic pass now (a worker registered, a plan was refused)
        self._load()

    # -- lifecycle -----------------------------------------------------------------------------

    def _load(self) -> None:
        """Resume from the store: workers, agents, their plans, links and refusals."""
        for wid, rec in self.store.workers().items():
            self.workers[wid] = WorkerState(rec, requests.parse_worker_profiles(rec.id, list(rec.profiles.values())))
        plans, links, speeds = self.store.current_plans(), self.store.links(), self.store.speeds()
        for aid, rec in self.store.agents().items():
            st = AgentState(rec, profiles.loads(rec.profile, f"stored profile of agent {aid}"))
            st.plan = plans[aid].plan if aid in plans else None
            st.links = links.get(aid, {})
            if aid in speeds and self.config.compute_telemetry:
                st.speed = DeviceSpeed(speeds[aid].slowdown, speeds[aid].samples)
                st.apply_speed()
            if rec.refused_version and (st.plan is None or rec.refused_version > st.plan.version):
                refused = self.store.plan(aid, rec.refused_version)
                if refused is not None:
                    st.refused_key = plan_key(refused.plan)
                    st.refused_conditions = self._conditions(st)
            st.dirty, st.cause = True, "restart"  # re-check once: a worker may have changed meanwhile
            self.agents[aid] = st
        self.metrics.agents.set(len(self.agents))
        self.metrics.workers.set(len(self.workers))
        if self.agents or self.workers:
            logger.info("resumed %d agents and %d workers from %s (last plan version %d)", len(self.agents),
                        len(self.workers), self.store.path, self.store.last_version())

    def start(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick_loop(), name="planner-replan")

    async def close(self) -> None:
        """Stop re-planning and end every WatchPlan stream (agents reconnect to the next planner)."""
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
        for st in self.agents.values():
            self._save_links(st)
            for w in st.watchers:
                w.closed = True
                w.event.set()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _tick_loop(self) -> None:
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.replan_interval_seconds)
            except asyncio.TimeoutError:
                pass
            if self._closing:
                break
            self._wake.clear()
            try:
                await self.tick()
            except Exception:
                logger.exception("periodic re-planning failed")

    async def tick(self) -> None:
        """Decide for every agent with new conditions or a switch on hold; refresh the age gauge."""
        now = time.time()
        ages = [now - max(lk.updated_unix for lk in st.links.values()) for st in self.agents.values() if st.links]
        self.metrics.telemetry_age_seconds.set(max(ages) if ages else 0.0)
        self.metrics.device_slowdown_max.set(max((st.speed.factor for st in self.agents.values()), default=1.0))
        for aid, st in list(self.agents.items()):
            if st.dirty or self.hysteresis.holding(aid):
                await self._decide(st)

    # -- candidates and ranking ----------------------------------------------------------------

    def _link(self, st: AgentState, worker_id: str) -> LinkRecord:
        lk = st.links.get(worker_id)
        if lk is None:
            return LinkRecord(self.config.default_rtt_seconds, self.config.default_bandwidth_bytes_per_second, 0.0)
        return lk

    def _candidates(self, st: AgentState, rtt: float = 0.0, bandwidth: float = 0.0,
                    record: AgentRecord | None = None) -> list[Candidate]:
        workers = [(w.record, w.profiles) for _, w in sorted(self.workers.items())]
        return decide.candidates(record or st.record, st.device, workers, lambda wid: self._link(st, wid), rtt,
                                 bandwidth)

    def _key(self, st: AgentState, r: Ranked) -> PlanKey:
        return decide.config_key(st.device, r)

    async def _rank(self, st: AgentState, top_n: int, rtt: float = 0.0, bandwidth: float = 0.0,
                    exclude: PlanKey | None = None, predict: pb.Plan | None = None, record: AgentRecord | None = None):
        """Rank now (and predict ``predict`` under the same conditions), for ``record`` (default: the
        agent's; a query may bring other constraints); profiles are derived here, on the event loop,
        and only the searches run in the executor."""
        cands = self._candidates(st, rtt, bandwidth, record)
        devices = [st.device_for(c.tl_ids) for c in cands]
        chains = decide.chains(cands, self._worker_link())
        chained = [(ch, st.device_for(ch.first.tl_ids)) for ch in chains]
        cand = pinned = chain = forward = None
        if predict is not None and predict.worker_id:
            cand = next((c for c in cands if c.worker_id == predict.worker_id), None)
            usable = not predict.tl_id or (cand is not None and predict.tl_id in cand.tl_ids)
            if cand is not None and usable and 0 <= predict.split_index < st.device.n_blocks:
                pinned = st.device_for(cand.tl_ids, (predict.split_index, predict.codec, predict.tl_id))
            if predict.next_hops:
                chain, forward = self._chain_of(predict, chains)

        rec, device, include_return = record or st.record, st.device, self.config.include_return

        def work():
            ranked, seconds = decide.rank(rec, device, cands, devices, top_n, include_return, exclude, chained)
            current = (decide.predict(rec, device, predict, cand, pinned, include_return, chain, forward)
                       if predict is not None else None)
            return ranked, seconds, current

        ranked, seconds, current = await asyncio.get_running_loop().run_in_executor(self.executor, work)
        self.metrics.decision_seconds.observe(seconds)
        return ranked, seconds, current

    def _worker_link(self) -> Link:
        return Link(self.config.worker_link_rtt_seconds, self.config.worker_link_bandwidth_bytes_per_second)

    @staticmethod
    def _chain_of(plan: pb.Plan, chains: list[Chain]):
        """The chain a chained ``plan`` runs over now and the edge's profile limited to its hop's
        transfer ((None, None): the pair no longer chains, or the hop is not one it can run)."""
        hop = plan.next_hops[0]
        chain = next((c for c in chains if c.first.worker_id == plan.worker_id
                      and c.second.worker_id == hop.worker_id), None)
        if chain is None or len(plan.next_hops) != 1 or hop.tl_id or not 0 < plan.end_split_index:
            return None, None
        return chain, decide.forwarding_at(chain.first.profile, plan.end_split_index, hop.codec)

    # -- decisions -----------------------------------------------------------------------------

    def _conditions(self, st: AgentState) -> dict[str, tuple[int, float, float]]:
        """What a refusal is remembered against: per candidate worker, its registration and link."""
        return {c.worker_id: (self.workers[c.worker_id].generation, c.link.rtt_seconds, c.link.bandwidth_bytes_per_second)
                for c in self._candidates(st)}

    def _refusal_stands(self, st: AgentState) -> bool:
        """A refused plan stays out while the workers and links are (nearly) as they were at the refusal."""
        if st.refused_key is None:
            return False
        then, now = st.refused_conditions, self._conditions(st)
        tol = max(self.config.switch_gain, 0.01)
        moved = lambda a, b: abs(a - b) > tol * max(abs(b), 1e-9)  # noqa: E731
        if then.keys() != now.keys() or any(
                now[w][0] != then[w][0] or moved(now[w][1], then[w][1]) or moved(now[w][2], then[w][2]) for w in now):
            logger.info("agent %s: conditions changed since it refused %s; that plan may be proposed again",
                        st.record.id, st.refused_key)
            st.refused_key, st.refused_conditions = None, {}
            return False
        return True

    def _issue(self, st: AgentState, r: Ranked, reason: str, label: str) -> pb.Plan:
        plan = self.store.issue_plan(decide.to_plan(st.record, st.device, r, reason))
        st.plan = plan
        self.hysteresis.reset(st.record.id)
        st.cause = "telemetry"
        self.metrics.plan_changes.labels(label).inc()
        route = "".join(f" -> {h.worker_id}@{h.end_split or 'output'} via {h.codec or '-'}" for h in plan.next_hops)
        logger.info("agent %s: plan v%d %s@%s via %s%s (%.2f ms predicted): %s", st.record.id, plan.version,
                    plan.worker_id or "local", plan.split_id, plan.codec or "-",
                    f" (slice ..{plan.end_split}{route})" if plan.end_split else "", plan.predicted_seconds * 1e3, reason)
        for w in st.watchers:
            w.latest = plan
            w.event.set()
        return plan

    def _save_links(self, st: AgentState) -> None:
        for wid in sorted(st.unsaved_links):
            if wid in st.links:
                self.store.put_link(st.record.id, wid, st.links[wid])
        if st.unsaved_links:
            self.store.touch_agent(st.record.id, st.record.last_seen)
        st.unsaved_links.clear()
        if st.speed.unsaved:
            self.store.put_speed(st.record.id, SpeedRecord(st.speed.factor, st.speed.samples, time.time()))
            st.speed.unsaved = False

    async def _decide(self, st: AgentState) -> None:
        """Re-plan one running agent under its current conditions, through the hysteresis."""
        async with st.lock:
            if self.agents.get(st.record.id) is not st:  # re-registered meanwhile
                return
            st.dirty = False
            cause = st.cause
            self._save_links(st)
            aid = st.record.id
            exclude = st.refused_key if self._refusal_stands(st) else None
            ranked, _, current = await self._rank(st, 1, exclude=exclude, predict=st.plan)
            if not ranked:
                if st.plan is not None and current is None:
                    logger.warning("agent %s: plan v%d is no longer feasible and nothing else is", aid, st.plan.version)
                return
            best = ranked[0]
            if st.plan is None:
                self._issue(st, best, f"{cause}: first feasible configuration", cause)
                return
            objective = decide.objective(st.record)
            if current is not None and self._key(st, best) == plan_key(st.plan):
                self.hysteresis.reset(aid)
                return
            cur = None if current is None else decide.score(current, objective)
            verdict = self.hysteresis.update(aid, cur, decide.score(best.config, objective))
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
            self._issue(st, best, reason, label)

    # -- RPCs ----------------------------------------------------------------------------------

    @_rpc
    async def RegisterWorker(self, request: pb.RegisterWorkerRequest, context) -> pb.RegisterWorkerReply:
        req = requests.check_worker_request(request, self.config)
        wid, address, tier, tl_ids, next_tiers = req.worker_id, req.address, req.tier, req.tl_ids, req.next_tiers
        if wid not in self.workers and len(self.workers) >= self.config.max_workers:
            raise Overloaded(f"the planner holds {len(self.workers)} workers, its max_workers limit")
        parsed = requests.parse_worker_profiles(wid, list(request.profiles_json))
        now = time.time()
        old = self.workers.get(wid)
        rec = WorkerRecord(wid, address, tier, tl_ids, {m: t for m, t in zip(parsed, request.profiles_json)},
                           old.record.registered if old else now, now, next_tiers)
        self.store.put_worker(rec)
        self.generation += 1
        self.workers[wid] = WorkerState(rec, parsed, self.generation)
        self.metrics.workers.set(len(self.workers))
        logger.info("worker %s at %s (%s): %s%s", wid, address, tier, ", ".join(sorted(parsed)),
                    f"; forwards to {', '.join(next_tiers)}" if next_tiers else "")
        for st in self.agents.values():  # decided by the periodic pass, woken now
            if st.record.model in parsed or (old and st.record.model in old.profiles):
                st.dirty, st.cause = True, "worker"
        self._wake.set()
        return pb.RegisterWorkerReply(profiles=len(parsed))

    @_rpc
    async def RegisterAgent(self, request: pb.RegisterAgentRequest, context) -> pb.RegisterAgentReply:
        req = requests.check_agent_request(request)
        aid, model, device, workers, tl_ids = req.agent_id, req.model, req.device, req.workers, req.tl_ids
        if aid not in self.agents and len(self.agents) >= self.config.max_agents:
            raise Overloaded(f"the planner holds {len(self.agents)} agents, its max_agents limit")
        constraints = pb.Constraints()
        constraints.CopyFrom(request.constraints)
        now = time.time()
        old = self.agents.get(aid)
        rec = AgentRecord(aid, model, request.model_digest or device.model_digest, request.profile_json, workers,
                          tl_ids, constraints, old.record.registered if old else now, now)
        named = [wid for wid in workers if wid in self.workers]
        problems = [why for why in (decide.incompatibility(rec, device, wid, self.workers[wid].profiles)
                                    for wid in named) if why]
        if problems and len(problems) == len(named):
            raise PreconditionFailed("none of the workers this agent names can take its frames: " + "; ".join(problems))
        for why in problems:
            logger.warning("agent %s: %s", aid, why)
        lock = old.lock if old is not None else asyncio.Lock()
        async with lock:
            old = self.agents.get(aid)
            st = AgentState(rec, device, lock=lock)
            if old is not None:  # same board, new registration: keep what it runs, its links and watchers
                st.plan, st.links, st.watchers = old.plan, old.links, old.watchers
                st.unsaved_links, st.last_acted = old.unsaved_links, old.last_acted
                if old.record.profile == rec.profile:  # the same benchmark: its slowdown factor still holds
                    st.speed = old.speed
                    st.apply_speed(force=True)
                elif old.speed.samples:  # re-profiled: measured against the new profile from scratch
                    self.store.put_speed(aid, SpeedRecord(1.0, 0, now))
            self.store.put_agent(rec)
            self.agents[aid] = st
            self.hysteresis.reset(aid)
            self.metrics.agents.set(len(self.agents))
            ranked, _, current = await self._rank(st, 1, predict=st.plan)
            if not ranked:
                reason = ("no configuration satisfies this agent's constraints with the workers registered now; a plan "
                          "follows on WatchPlan when one does (relax the constraints or register a worker)")
                logger.warning("agent %s: %s", aid, reason)
                return pb.RegisterAgentReply(plan=pb.Plan(agent_id=aid, model_id=model, reason=reason))
            best = ranked[0]
            if st.plan is not None and current is not None and self._key(st, best) == plan_key(st.plan):
                return pb.RegisterAgentReply(plan=st.plan)
            plan = self._issue(st, best, "registration" if old is None else "re-registration", "registration")
        return pb.RegisterAgentReply(plan=plan)

    def _agent(self, agent_id: str) -> AgentState:
        st = self.agents.get(agent_id)
        if st is None:
            shown = agent_id if len(agent_id) <= 40 else agent_id[:40] + "..."
            raise NotFound(f"agent {shown!r} is not registered with this planner: call RegisterAgent first")
        return st

    def _resolve_worker(self, name: str) -> str:
        """A worker id, or the id of the worker at that address (an agent may only know the address); "" if none."""
        if not name or name in self.workers:
            return name
        return next((wid for wid, w in self.workers.items() if w.record.address == name), "")

    @_rpc
    async def ReportTelemetry(self, request_iterator, context) -> pb.TelemetryAck:
        received = 0
        min_gap = 1.0 / self.config.telemetry_max_rate_hz
        async for t in request_iterator:
            st = self._agent(t.agent_id)
            received += 1
            self.metrics.telemetry.inc()
            worker = self._resolve_worker(t.worker)
            bw, rtt = requests.check_telemetry(t)
            now = time.time()
            if t.sent_unix > 0:
                self.metrics.telemetry_delay_seconds.observe(max(0.0, now - t.sent_unix))
            st.record.last_seen = now
            if worker and (bw > 0 or rtt > 0):
                old = self._link(st, worker)
                st.links[worker] = LinkRecord(rtt or old.rtt_seconds, bw or old.bandwidth_bytes_per_second, now)
                st.unsaved_links.add(worker)
                st.dirty, st.cause = True, "telemetry"
            elif t.worker and not worker:
                self.metrics.telemetry_unknown_worker.inc()
                logger.debug("agent %s: telemetry for %r, which is no registered worker; link ignored", st.record.id,
                             t.worker[:80])
            if self.config.compute_telemetry and t.stage_seconds and self._observe_compute(st, t):
                st.dirty, st.cause = True, "compute"
            mono = self.clock()
            if st.dirty and mono - st.last_acted >= min_gap:  # the rest wait for the periodic pass
                st.last_acted = mono
                await self._decide(st)
        return pb.TelemetryAck(received=received)

    def _observe_compute(self, st: AgentState, t: pb.Telemetry) -> bool:
        """Take one report's device stage times into the agent's slowdown factor; True when the
        factor decisions use moved. A report under no plan of this agent (version 0: the agent's own
        split; a version this planner never issued to it) gives no sample."""
        plan = st.plan if st.plan is not None and st.plan.version == t.plan_version else None
        if plan is None and t.plan_version:
            stored = self.store.plan(st.record.id, t.plan_version)
            plan = stored.plan if stored is not None else None
        if plan is None or plan.model_id != st.record.model:
            return False
        outcome = st.speed.observe(t.stage_seconds, st.benchmark, plan.split_index)
        if outcome is not None:
            self.metrics.compute_samples.labels(outcome).inc()
        if outcome != "used" or not st.apply_speed():
            return False
        logger.debug("agent %s: device compute now %.2fx its profile", st.record.id, st.speed.factor)
        return True

    @_rpc
    async def ReportPlanStatus(self, request: pb.PlanStatus, context) -> pb.PlanStatusAck:
        st = self._agent(request.agent_id)
        requests.check_plan_status(request)
        async with st.lock:
            status = APPLIED if request.applied else REFUSED
            if not self.store.set_plan_status(st.record.id, request.version, status, request.message):
                raise NotFound(f"agent {st.record.id} has no plan version {request.version}"
                               + (f" (its current plan is v{st.plan.version})" if st.plan else ""))
            if request.applied:
                return pb.PlanStatusAck()
            st.dirty, st.cause = True, "refusal"  # decide again, without the refused plan
            self._wake.set()
            self.metrics.refusals.inc()
            st.record.refused_version, st.record.refused_message = request.version, request.message
            refused = self.store.plan(st.record.id, request.version).plan
            logger.warning("agent %s refused plan v%d: %s", st.record.id, request.version, request.message or "(no reason)")
            if st.plan is not None and st.plan.version == request.version:
                back = self.store.current_plan(st.record.id)
                st.plan = back.plan if back else None
                st.refused_key = plan_key(refused)
                st.refused_conditions = self._conditions(st)
                self.hysteresis.reset(st.record.id)
        return pb.PlanStatusAck()

    async def WatchPlan(self, request: pb.WatchPlanRequest, context):
        try:
            st = self._agent(request.agent_id)
        except EdgesplitError as e:
            self.metrics.errors.labels(e.code.name).inc()
            await context.abort(e.code, str(e))
        w = _Watcher(latest=st.plan)
        if st.plan is not None:
            w.event.set()
        st.watchers.add(w)
        self.metrics.watchers.inc()
        sent = request.known_version
        try:
            while True:
                await w.event.wait()
                w.event.clear()
                if w.closed:
                    return
                plan = w.latest
                if plan is not None and plan.version > sent:
                    sent = plan.version
                    yield plan
        finally:
            st.watchers.discard(w)
            self.agents.get(request.agent_id, st).watchers.discard(w)
            self.metrics.watchers.dec()

    @_rpc
    async def QueryPlan(self, request: pb.PlanQuery, context) -> pb.PlanQueryReply:
        st = self._agent(request.agent_id)
        top_n, bw, rtt = requests.check_query(request, self.config, st.device)
        record = dataclasses.replace(st.record, constraints=request.constraints) if request.HasField("constraints") else None
        ranked, seconds, _ = await self._rank(st, top_n, rtt=rtt, bandwidth=bw, record=record)
        reply = pb.PlanQueryReply(decision_seconds=seconds)
        for i, r in enumerate(ranked):
            reply.candidates.append(decide.to_plan(st.record, st.device, r,
                                                   f"candidate {i + 1} of {len(ranked)}: {r.config.describe()}"))
        return reply

    @_rpc
    async def ListAgents(self, request: pb.ListAgentsRequest, context) -> pb.ListAgentsReply:
        reply = pb.ListAgentsReply()
        now = time.time()
        for aid, st in sorted(self.agents.items()):
            info = pb.AgentInfo(agent_id=aid, model_id=st.record.model, refused_version=st.record.refused_version,
                                refused_message=st.record.refused_message, telemetry_age_seconds=-1.0)
            if st.plan is not None:
                info.plan.CopyFrom(st.plan)
            lk = st.links.get(st.plan.worker_id) if st.plan is not None and st.plan.worker_id else None
            if lk is not None:
                info.bandwidth_bytes_per_second, info.rtt_seconds = lk.bandwidth_bytes_per_second, lk.rtt_seconds
            if st.links:
                info.telemetry_age_seconds = max(0.0, now - max(x.updated_unix for x in st.links.values()))
            reply.agents.append(info)
        return reply
