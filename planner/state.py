"""The planner's registry: the workers and agents it knows, their link estimates, and the store.

:class:`PlannerState` is the only owner of :class:`planner.store.Store` access. It holds, per
worker, its record and parsed profiles (:class:`WorkerState`), and per agent what decisions read
and what they leave (:class:`AgentState`: its record, its device profile scaled by the measured
compute speed, the plan the planner believes runs, its links, whether conditions changed and the
last refusal). It decides nothing: :mod:`planner.replanner` reads and marks it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import overload

from planner import compute, decide, requests, wirebytes
from planner.cache import LRU
from planner.compute import DeviceSpeed
from planner.config import PlannerConfig
from planner.decide import Candidate, PlanKey
from planner.metrics import PlannerMetrics
from planner.store import AgentRecord, LinkRecord, PlanRecord, SpeedRecord, Store, WorkerRecord
from planner.writebehind import WriteBehind
from runtime.contracts import profile as profiles
from runtime.contracts.costmodel import Link
from runtime.contracts.errors import NotFound, Overloaded, PreconditionFailed
from runtime.contracts.profile import Profile
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

logger = logging.getLogger(__name__)

DERIVED = 64  # device profiles limited to some transfers that an agent keeps


@dataclass
class WorkerState:
    record: WorkerRecord
    profiles: dict[str, Profile]  # model -> profile with machine = worker id
    generation: int = 0


@dataclass
class AgentState:
    """One registered agent: made from its record and device profile; the rest is filled in as it runs."""

    record: AgentRecord  # its registration
    device: Profile  # what decisions use: the registered profile scaled by speed.applied
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one decision or registration at a time
    written: asyncio.Future[None] | None = field(default=None, repr=False)  # its registration's write (store thread)
    benchmark: Profile | None = None  # the device profile as registered (default: device)
    plan: pb.Plan | None = field(default=None, init=False)  # what the planner believes runs (the last not refused)
    links: dict[str, LinkRecord] = field(default_factory=dict, init=False)  # worker id -> last estimate
    unsaved_links: set[str] = field(default_factory=set, init=False)  # worker ids whose estimate is not stored
    last_acted: float = field(default=-math.inf, init=False)  # monotonic time telemetry last triggered a decision
    dirty: bool = field(default=False, init=False)  # conditions changed since the last decision
    cause: str = field(default="telemetry", init=False)  # what changed them (a metrics label of PLAN_REASONS)
    model_moved: bool = field(default=False, init=False)  # the model (factors, overheads, bytes) moved since the last decision
    refused_key: PlanKey | None = field(default=None, init=False)  # not proposed again until conditions change
    refused_conditions: dict[str, tuple[int, float, float]] = field(default_factory=dict, init=False)  # PlannerState.conditions at the refusal
    speed: DeviceSpeed = field(default_factory=DeviceSpeed, init=False)  # measured / profiled device compute
    tails: compute.WorkerSpeeds = field(default_factory=compute.WorkerSpeeds, init=False)  # per worker, its tail compute
    wire: wirebytes.WireFigures = field(default_factory=wirebytes.WireFigures, init=False)  # measured bytes, encode
    overhead: compute.Overhead = field(default_factory=compute.Overhead, init=False)  # the board runtime's own time
    # derived device profiles, the same objects while they live (so the search finds their tables again)
    _derived: LRU[tuple[object, ...], Profile] = field(default_factory=lambda: LRU(DERIVED), init=False, repr=False)

    def __post_init__(self) -> None:
        if self.benchmark is None:
            self.benchmark = self.device

    def mark(self, cause: str) -> None:
        """Conditions changed (``cause``: a metrics label of PLAN_REASONS): decide again."""
        self.dirty, self.cause = True, cause

    def apply_speed(self, force: bool = False) -> bool:
        """Scale the device profile decisions use by the slowdown factor, if it moved (or ``force``);
        True when it did."""
        if not (force or self.speed.moved()):
            return False
        self.speed.applied = self.speed.factor
        self._remake()
        return True

    def apply_wire(self) -> bool:
        """Price the device profile's transfers with the measured bytes and encode times (planner.wirebytes),
        if they moved; True when they did."""
        if not self.wire.moved():
            return False
        self.wire.apply()
        self._remake()
        return True

    def apply_overhead(self, stages: dict[str, float]) -> bool:
        """Take one report's runtime overhead medians (planner.compute.Overhead) into the profile decisions
        use, if they moved; True when they did."""
        if not self.overhead.observe(stages):
            return False
        self.overhead.apply()
        self._remake()
        return True

    def _remake(self) -> None:
        assert self.benchmark is not None
        device = wirebytes.patched(compute.scaled(self.benchmark, self.speed.applied), self.wire.applied)
        self.device = compute.with_overhead(device, self.overhead.applied)
        self._derived.clear()

    @overload
    def device_for(self, tl_ids: frozenset[str]) -> Profile: ...

    @overload
    def device_for(self, tl_ids: frozenset[str], cut_transfer: tuple[int, str, str] | None) -> Profile | None: ...

    def device_for(self, tl_ids: frozenset[str], cut_transfer: tuple[int, str, str] | None = None) -> Profile | None:
        """The device profile limited to TLs held on both ends, optionally to one transfer at one cut (None
        when that transfer is not among them; never without one)."""
        key = (tl_ids, cut_transfer)
        hit = self._derived.get(key)
        if hit is not None:
            return hit
        p = decide.limit_device(self.device, tl_ids, cut_transfer)
        if p is not None:
            self._derived.put(key, p)
        return p


def _put_agent(store: Store, rec: AgentRecord, speed: SpeedRecord | None) -> None:
    """A registration's writes (on the store thread): its record, and its reset slowdown factor when re-profiled."""
    if speed is not None:
        store.put_speed(rec.id, speed)
    store.put_agent(rec)


def _stored_as(old: AgentState, rec: AgentRecord) -> bool:
    """``rec`` is what the store holds already: ``old``'s registration was committed (or read from the
    store, planner.replicas) and differs from ``rec`` in its times only."""
    w, r = old.written, old.record
    return (w is not None and w.done() and not w.cancelled() and w.exception() is None
            and (r.model, r.digest, r.profile, r.workers, r.tl_ids, r.constraints, r.refused_version, r.refused_message)
            == (rec.model, rec.digest, rec.profile, rec.workers, rec.tl_ids, rec.constraints, rec.refused_version,
                rec.refused_message))


class PlannerState:
    """Who is registered, their links, and everything read from or written to the store."""

    def __init__(self, config: PlannerConfig, store: Store, metrics: PlannerMetrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.workers: dict[str, WorkerState] = {}
        self.agents: dict[str, AgentState] = {}
        self.generation = 0  # counts worker registrations (each worker remembers the one that made it)
        self.behind = WriteBehind(store, metrics.registry)  # links, heartbeats, speeds: one transaction per interval
        self.fence: tuple[str, float] | None = None  # (replica id, lease seconds): plans only under the lease
        # profiles parsed and checked once per content hash (agents of one board type share one; issue 15)
        self.profiles = profiles.ProfileCache(config.profile_cache_size)

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> None:
        """Resume from the store: workers, and agents with their plans, links and refusals. With a
        shared store (replicas) agents are not loaded here: each is loaded when it attaches
        (:meth:`load_agent`, planner.replicas)."""
        for wid, wrec in self.store.workers().items():
            self.workers[wid] = WorkerState(wrec, requests.parse_worker_profiles(wrec.id, list(wrec.profiles.values()),
                                                                                 self.profiles))
        if not self.store.backend.shared:
            plans, links, speeds = self.store.current_plans(), self.store.links(), self.store.speeds()
            tails = self.store.worker_speeds()
            for aid, rec in self.store.agents().items():
                self.agents[aid] = self._resumed(rec, plans.get(aid), links.get(aid, {}), speeds.get(aid))
                self._restore_tails(self.agents[aid], tails.get(aid, {}))
        self.metrics.agents.set(len(self.agents))
        self.metrics.workers.set(len(self.workers))
        if self.agents or self.workers:
            logger.info("resumed %d agents and %d workers from %s (last plan version %d)", len(self.agents),
                        len(self.workers), self.store.path, self.store.last_version())

    def load_agent(self, agent_id: str) -> AgentState | None:
        """Take ``agent_id`` over from the store (its record, current plan, links, speed, refusal) and hold
        it; None when the store has no such agent."""
        rec = self.store.agents(agent_id).get(agent_id)
        if rec is None:
            return None
        st = self.adopt(rec, self.store.current_plan(agent_id), self.store.links(agent_id).get(agent_id, {}),
                        self.store.speeds(agent_id).get(agent_id))
        self._restore_tails(st, self.store.worker_speeds(agent_id).get(agent_id, {}))
        return st

    def _restore_tails(self, st: AgentState, tails: dict[str, SpeedRecord]) -> None:
        """The agent's worker tail factors as stored (planner.compute.WorkerSpeeds: each is forgotten once
        its last sample is older than its TTL, restarts included)."""
        if self.config.compute_telemetry:
            for wid, sp in tails.items():
                st.tails.restore(wid, sp.slowdown, sp.samples, sp.updated_unix)

    def adopt(self, rec: AgentRecord, plan: PlanRecord | None, links: dict[str, LinkRecord],
              speed: SpeedRecord | None) -> AgentState:
        """Hold an agent as the store had it (read elsewhere: planner.replicas reads off the event loop)."""
        st = self._resumed(rec, plan, links, speed)
        self.agents[rec.id] = st
        self.metrics.agents.set(len(self.agents))
        return st

    def _resumed(self, rec: AgentRecord, plan: PlanRecord | None, links: dict[str, LinkRecord],
                 speed: SpeedRecord | None) -> AgentState:
        """An agent's state as the store left it, marked to be decided again (a worker may have changed)."""
        aid = rec.id
        key = bytes.fromhex(rec.profile_sha256())  # the store's key for it (read with the record): not hashed here
        st = AgentState(rec, self.profiles.loads(rec.profile, f"stored profile of agent {aid}", key))
        rec.hold_profile(self.profiles.shared(rec.profile, key), key.hex())  # one copy of the text per board type
        st.plan = plan.plan if plan is not None else None
        st.links = links
        if speed is not None and self.config.compute_telemetry:
            st.speed = DeviceSpeed(speed.slowdown, speed.samples)
            st.apply_speed()
        if rec.refused_version and (st.plan is None or rec.refused_version > st.plan.version):
            refused = self.store.plan(aid, rec.refused_version)
            if refused is not None:
                st.refused_key = decide.plan_key(refused.plan)
                st.refused_conditions = self.conditions(st)
        st.mark("restart")  # re-check once: a worker may have changed meanwhile
        return st

    # -- lookups -------------------------------------------------------------------------------

    def agent(self, agent_id: str) -> AgentState:
        st = self.agents.get(agent_id)
        if st is None:
            shown = agent_id if len(agent_id) <= 40 else agent_id[:40] + "..."
            raise NotFound(f"agent {shown!r} is not registered with this planner: call RegisterAgent first")
        return st

    def resolve_worker(self, name: str) -> str:
        """A worker id, or the id of the worker at that address (an agent may only know the address); "" if none."""
        if not name or name in self.workers:
            return name
        return next((wid for wid, w in self.workers.items() if w.record.address == name), "")

    def measured_link(self, st: AgentState, worker_id: str) -> LinkRecord | None:
        """The agent's measured link to ``worker_id`` if its last sample is within ``link_ttl_seconds``
        (a record read back after a restart included); else None."""
        lk = st.links.get(worker_id)
        if lk is None or time.time() - lk.updated_unix > self.config.link_ttl_seconds:
            return None
        return lk

    def link(self, st: AgentState, worker_id: str) -> LinkRecord | None:
        """The link decisions use: measured, or the configured assumption (default_bandwidth_bytes_per_second
        with default_rtt_seconds) for a link whose bandwidth no telemetry measured; None when unknown (never
        offloaded to): no bandwidth measured and none assumed, or a measured bandwidth with no RTT measured
        (issue 11: the assumed 5 ms stood for a link of 60 ms; the agent measures its RTT before each report)."""
        lk = self.measured_link(st, worker_id)
        bw = lk.bandwidth_bytes_per_second if lk is not None else 0.0
        if bw > 0:
            return LinkRecord(lk.rtt_seconds, bw, lk.updated_unix) if lk is not None and lk.rtt_seconds > 0 else None
        bw = self.config.default_bandwidth_bytes_per_second
        if bw <= 0:
            return None
        rtt = lk.rtt_seconds if lk is not None and lk.rtt_seconds > 0 else self.config.default_rtt_seconds
        return LinkRecord(rtt, bw, lk.updated_unix if lk is not None else 0.0)

    def worker_link(self) -> Link:
        """The worker-to-worker link of chained plans (configured: agents measure only their own)."""
        return Link(self.config.worker_link_rtt_seconds, self.config.worker_link_bandwidth_bytes_per_second)

    def candidates(self, st: AgentState, rtt: float = 0.0, bandwidth: float = 0.0,
                   record: AgentRecord | None = None) -> list[Candidate]:
        workers = [(w.record, st.tails.profiles(wid, w.profiles, st.record.model)) for wid, w in sorted(self.workers.items())]
        return decide.candidates(record or st.record, st.device, workers, lambda wid: self.link(st, wid), rtt,
                                 bandwidth)

    def conditions(self, st: AgentState) -> dict[str, tuple[int, float, float]]:
        """What a refusal is remembered against: per candidate worker, its registration and link."""
        return {c.worker_id: (self.workers[c.worker_id].generation, c.link.rtt_seconds, c.link.bandwidth_bytes_per_second)
                for c in self.candidates(st)}

    # -- registrations -------------------------------------------------------------------------

    async def register_worker(self, req: requests.WorkerRequest, parsed: dict[str, Profile],
                        texts: list[str]) -> WorkerState | None:
        """Store and hold a worker's registration (``texts``: its profile documents, as ``parsed``);
        returns its previous state, if any."""
        wid = req.worker_id
        if wid not in self.workers and len(self.workers) >= self.config.max_workers:
            raise Overloaded(f"the planner holds {len(self.workers)} workers, its max_workers limit")
        now = time.time()
        old = self.workers.get(wid)
        rec = WorkerRecord(wid, req.address, req.tier, req.tl_ids, dict(zip(parsed, texts, strict=False)),
                           old.record.registered if old else now, now, req.next_tiers)
        await self.behind.submit(lambda store: store.put_worker(rec))  # on the store thread (SQLite's lock)
        self.generation += 1
        self.workers[wid] = WorkerState(rec, parsed, self.generation)
        self.metrics.workers.set(len(self.workers))
        logger.info("worker %s at %s (%s): %s%s", wid, req.address, req.tier, ", ".join(sorted(parsed)),
                    f"; forwards to {', '.join(req.next_tiers)}" if req.next_tiers else "")
        return old

    def agent_record(self, req: requests.AgentRequest, request: pb.RegisterAgentRequest) -> AgentRecord:
        """The record of a checked agent registration, once it can run here (room, and a worker it names
        that can take its frames, if it names any registered)."""
        aid = req.agent_id
        if aid not in self.agents and len(self.agents) >= self.config.max_agents:
            raise Overloaded(f"the planner holds {len(self.agents)} agents, its max_agents limit")
        constraints = pb.Constraints()
        constraints.CopyFrom(request.constraints)
        now = time.time()
        old = self.agents.get(aid)
        rec = AgentRecord(aid, req.model, request.model_digest or req.device.model_digest, request.profile_json,
                          req.workers, req.tl_ids, constraints, old.record.registered if old else now, now)
        named = [wid for wid in req.workers if wid in self.workers]
        problems = [why for why in (decide.incompatibility(rec, req.device, wid, self.workers[wid].profiles)
                                    for wid in named) if why]
        if problems and len(problems) == len(named):
            raise PreconditionFailed("none of the workers this agent names can take its frames: " + "; ".join(problems))
        for why in problems:
            logger.warning("agent %s: %s", aid, why)
        return rec

    def put_agent(self, rec: AgentRecord, device: Profile, lock: asyncio.Lock) -> tuple[AgentState, AgentState | None]:
        """Hold an agent's registration (under its ``lock``) and queue its write on the store thread
        (``AgentState.written``: the RPC awaits it before answering; plans issued after it commit after
        it); a re-registration of the same board keeps what it runs and its links, and its slowdown
        factor if the benchmark is the same. Returns the new state and the old one."""
        aid = rec.id
        old = self.agents.get(aid)
        st = AgentState(rec, device, lock=lock)
        reset: SpeedRecord | None = None
        if old is not None:  # same board, new registration: keep what it runs and its links
            st.plan, st.links = old.plan, old.links
            st.unsaved_links, st.last_acted = old.unsaved_links, old.last_acted
            st.tails = old.tails  # the workers' tail factors do not depend on the board's profile
            if old.record.profile == rec.profile:  # the same benchmark: its slowdown factor still holds
                st.speed, st.wire, st.overhead = old.speed, old.wire, old.overhead  # and what was measured beside
                st.apply_speed(force=True)
            elif old.speed.samples:  # re-profiled: measured against the new profile from scratch
                reset = SpeedRecord(1.0, 0, rec.last_seen)
                self.behind.pending.speeds.pop(aid, None)
        if old is not None and reset is None and _stored_as(old, rec):
            st.written = old.written  # stored as it is (a re-attach to a replica): only its heartbeat moves
            self.behind.touch(aid, rec.last_seen)
        else:
            st.written = self.behind.submit(lambda store: _put_agent(store, rec, reset))
        self.agents[aid] = st
        self.metrics.agents.set(len(self.agents))
        return st, old

    # -- measurements --------------------------------------------------------------------------

    def record_link(self, st: AgentState, worker: str, rtt: float, bandwidth: float, now: float) -> None:
        """A new estimate of the agent's link to ``worker`` (0: keep that figure), saved later."""
        old = self.measured_link(st, worker)  # measured figures only: an assumption is never stored
        st.links[worker] = LinkRecord(rtt or (old.rtt_seconds if old else 0.0),
                                      bandwidth or (old.bandwidth_bytes_per_second if old else 0.0), now)
        self.behind.put_link(st.record.id, worker, st.links[worker])  # written with the next flush
        self.behind.touch(st.record.id, st.record.last_seen)

    def save_links(self, st: AgentState) -> None:
        """Hand the agent's unsaved links, heartbeat and device speed to the write-behind buffer."""
        for wid in sorted(st.unsaved_links):
            if wid in st.links:
                self.behind.put_link(st.record.id, wid, st.links[wid])
        if st.unsaved_links:
            self.behind.touch(st.record.id, st.record.last_seen)
        st.unsaved_links.clear()
        if st.speed.unsaved:
            self.behind.put_speed(st.record.id, SpeedRecord(st.speed.factor, st.speed.samples, time.time()))
            st.speed.unsaved = False
        for wid, sp in st.tails.speeds.items():
            if sp.unsaved:
                self.behind.put_worker_speed(st.record.id, wid, SpeedRecord(sp.factor, sp.samples, sp.updated))
                sp.unsaved = False

    # -- plans ---------------------------------------------------------------------------------

    async def issue_plan(self, plan: pb.Plan) -> pb.Plan:
        """Store ``plan`` under the next version; returns it with that version once committed (the
        caller pushes it only then). With replicas, only while this replica holds the agent's lease
        (else planner.store.LeaseLost). The transaction runs on the store thread (a PostgreSQL commit
        took 0.8 ms p50, 29 ms p99 under load on the event loop), after any flush under way."""
        fence = self.fence
        plan_record: pb.Plan = await self.behind.write(lambda store: store.issue_plan(plan, fence))
        return plan_record

    def stored_plan(self, agent_id: str, version: int) -> PlanRecord | None:
        return self.store.plan(agent_id, version)

    def current_plan(self, agent_id: str) -> PlanRecord | None:
        """The agent's highest plan version that it did not refuse."""
        return self.store.current_plan(agent_id)

    async def set_plan_status(self, agent_id: str, version: int, status: str, message: str) -> bool:
        """Record an agent's applied/refused report, committed before this returns (on the store thread)."""
        done: bool = await self.behind.write(lambda store: store.set_plan_status(agent_id, version, status, message))
        return done
