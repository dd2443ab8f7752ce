"""Several planner replicas on one shared (PostgreSQL) store: who serves which agent.

Each agent is attached to one replica at a time, the holder of its row in the store's ``leases``
table (replica id, expiry on the database's clock). Agents reach the replicas through one address
(a Kubernetes Service); one agent session (one channel) stays on one replica.

* **RegisterAgent** takes the agent's lease whoever held it: an agent has one session at a time,
  so its registration here proves it left the other replica (that one learns it at its next
  renewal and ends the agent's WatchPlan stream). The agent's record, current plan, links, device
  speed and refusal are loaded from the store first, so the registration is a re-registration:
  the agent keeps its plan (the same version, when it is still the best) and is re-planned now.
* **Any other call** (WatchPlan, telemetry, plan status, queries) for an agent this replica does
  not hold takes it over only when its lease is free or lapsed (its replica died: no renewal for
  ``lease_seconds``), loading it the same way and re-planning it in the next periodic pass;
  while another replica holds it, FAILED_PRECONDITION tells the agent to register again.
* **Renewal**: every ``store_flush_seconds`` the write-behind thread renews this replica's
  heartbeat, one row that keeps every lease it holds alive (:mod:`planner.store_leases`; it renewed
  every lease row before: 10,000 row updates per second at 10,000 agents), and reads which agents
  another replica took; those are dropped here: their WatchPlan streams end with
  FAILED_PRECONDITION ("attached to another replica; register again"), their pending writes are
  discarded, and a plan is never issued for them again (every plan is written only under the
  lease, :meth:`planner.store.Store.issue_plan`).
* **Workers** register with one replica; the others read them from the store at each flush
  (a changed registration is parsed off the loop and re-plans its agents, as if it came here).
* A clean shutdown releases this replica's leases, so its agents re-attach elsewhere at once;
  a killed replica's leases lapse together, ``lease_seconds`` after its last heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from planner import requests, store_batch
from planner.broadcaster import Broadcaster
from planner.config import PlannerConfig
from planner.replanner import RePlanner
from planner.state import PlannerState, WorkerState
from planner.store import Store, WorkerRecord
from runtime.contracts.errors import PreconditionFailed
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

logger = logging.getLogger(__name__)

ATTACH_THREADS = 2  # threads (each with its own connection) for attachment batches and lease releases
ATTACH_BATCH = 512  # agents attached in one batch of statements (planner.store_batch)
MAX_TEXTS = 256  # profile texts by hash kept for attachments (board types; more: forgotten and read again)
MAX_LOST = 10_000  # agents remembered as taken over (their stream's end names it); the oldest are forgotten
FORGET_EVERY = 600  # renewals between two sweeps of dead replicas' heartbeat rows (planner.store_leases.forget_dead)
# and of orphaned profile texts (Store.prune_profiles)


def default_replica_id() -> str:
    """HOSTNAME-PID-RANDOM: unique per process (a pod's hostname is its name)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class _Ask:
    """One call's attachment, waiting for its batch."""

    agent_id: str
    take: bool
    here: bool  # held here when it asked
    done: asyncio.Future[tuple[str, float, tuple[Any, ...] | None]]  # -> (holder before, its seconds left, the agent's rows or None)


@dataclass
class Renewal:
    """What the store thread found at one flush (applied on the event loop)."""

    taken: set[str]  # agents another replica took from this one since the last renewal
    held: set[str] | None  # every agent whose lease this replica holds; None: not read (its heartbeat had not lapsed)
    seq: int  # attachments counted when the renewal began: later ones are not judged by it
    workers: dict[str, WorkerRecord] = field(default_factory=dict)  # registrations changed by other replicas
    gone: set[str] = field(default_factory=set)  # workers another replica removed


class Replica:
    """This planner as one of several on a shared store (see the module docstring)."""

    def __init__(self, config: PlannerConfig, state: PlannerState, replanner: RePlanner,
                 broadcaster: Broadcaster) -> None:
        self.id = config.replica_id or default_replica_id()
        self.seconds = config.lease_seconds
        self.state = state
        self.replanner = replanner
        self.broadcaster = broadcaster
        self.lost: dict[str, str] = {}  # agent id -> why its stream ended (another replica took it)
        self.takeovers = 0  # agents taken over from another replica (lapsed or re-registered here)
        self._seq = 0  # counts attachments
        self._attached: dict[str, int] = {}  # agent id -> the attachment count when it attached
        # attachments read the lease and the agent's rows on threads with connections of their own
        self._pool = ThreadPoolExecutor(ATTACH_THREADS, thread_name_prefix="planner-attach")
        self._local = threading.local()
        self._stores: list[Store] = []
        self._queue: list[_Ask] = []  # attachments waiting for the next batch
        self._drainer: asyncio.Task[None] | None = None
        self._done: asyncio.Future[None] | None = None
        self._texts: dict[str, str] = {}  # profile hash -> text (pool threads only)
        self.batches = 0  # attachment batches run
        self.renewals = 0  # heartbeats sent
        state.fence = (self.id, self.seconds)
        state.store.start_replica(self.id, self.seconds)  # a previous life of this id held nothing it holds now
        logger.info("planner replica %s: agents attach under %.1f s leases in %s", self.id, self.seconds,
                    state.store.path)

    # -- attaching (event loop) ------------------------------------------------------------------

    async def attach(self, agent_id: str, take: bool) -> None:
        """Make sure this replica holds ``agent_id`` (see the module docstring); ``take``: a registration.
        The lease and the agent's rows are read off the event loop, together with those of every other
        agent attaching meanwhile (:meth:`_drain`: one batch of statements for many agents)."""
        here = agent_id in self.state.agents
        if here and not take:
            return
        loop = asyncio.get_running_loop()
        ask = _Ask(agent_id, take, here, loop.create_future())
        self._queue.append(ask)
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain(), name="planner-attach")
        holder, left, rows = await ask.done
        if holder and holder != self.id and left > 0 and not take:
            raise PreconditionFailed(f"agent {agent_id!r} is attached to planner replica {holder} (lease for "
                                     f"{left:.1f} s more); register again to attach it here")
        self._seq += 1
        self._attached[agent_id] = self._seq
        self.lost.pop(agent_id, None)
        if agent_id in self.state.agents and (holder == self.id or not here):
            return  # a re-registration here, or a call of the same batch attached it already
        if rows is None:  # a first registration (or an unknown agent: its call answers NOT_FOUND)
            if not take:
                await loop.run_in_executor(self._pool, lambda: self._store().release_leases(self.id, [agent_id]))
                self._attached.pop(agent_id, None)
            return
        self._adopt(agent_id, holder, left, rows, take)

    def _adopt(self, agent_id: str, holder: str, left: float, rows: tuple[Any, ...], take: bool) -> None:
        """Hold the agent as read. Taken by a call other than a registration: decided in the next periodic
        pass (woken now). Taken by its registration: that decides it in a moment, so it is neither marked
        nor does it wake the pass (5,000 agents re-attaching woke it 5,000 times, each pass scanning
        every agent, and decided most of them twice; 23 % of the survivor's samples)."""
        st = self.state.adopt(*rows)
        st.written = self._stored  # its row is stored as read: a registration that changes nothing writes nothing
        self.takeovers += 1
        self.state.behind.metrics.takeovers.inc()
        if take:
            st.dirty = False
        else:
            self.replanner.wake()
        logger.info("agent %s attached to replica %s%s with plan v%d", agent_id, self.id,
                    f" (from {holder}, lease {'lapsed' if left <= 0 else 'taken by its registration'})" if holder else "",
                    st.plan.version if st.plan else 0)

    @property
    def _stored(self) -> asyncio.Future[None]:
        """A finished future: what an adopted agent's ``written`` says (its registration is in the store)."""
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
            self._done.set_result(None)
        return self._done

    async def _drain(self) -> None:
        """Attach the queued agents, up to ``ATTACH_BATCH`` per batch of statements, one batch at a time
        (the next one gathers while this one runs). A batch that fails (PostgreSQL aborted it: a
        deadlock with another replica's renewal) runs once more; then its calls fail with the error."""
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, self._queue = self._queue[:ATTACH_BATCH], self._queue[ATTACH_BATCH:]
            asks: dict[str, bool] = {}
            for a in batch:
                asks[a.agent_id] = asks.get(a.agent_id, False) or a.take
            here = {a.agent_id for a in batch if a.here and a.agent_id in self.state.agents}
            found = None
            for attempt in (0, 1):
                try:
                    found = await loop.run_in_executor(self._pool, self._acquire, asks, here)
                    break
                except Exception as e:
                    if attempt:
                        for a in batch:
                            if not a.done.done():
                                a.done.set_exception(e)
            if found is None:
                continue
            self.batches += 1
            orphans: list[str] = []
            for a in batch:
                if not a.done.done():
                    a.done.set_result(found[a.agent_id])
                elif a.agent_id not in self.state.agents and not any(b.agent_id == a.agent_id and not b.done.cancelled()
                                                                      for b in batch):
                    orphans.append(a.agent_id)  # its call was cancelled: give back a lease nobody here serves
            if orphans:
                await loop.run_in_executor(self._pool, functools.partial(self._release, orphans))

    def _release(self, agent_ids: list[str]) -> None:
        """(pool thread) Give back the leases of ``agent_ids``."""
        self._store().release_leases(self.id, agent_ids)

    def _store(self) -> Store:
        """This pool thread's own connection."""
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = Store(self.state.store.backend.clone())
            self._stores.append(store)
        return store

    def _acquire(self, asks: dict[str, bool], here: set[str]) -> dict[str, tuple[str, float, tuple[Any, ...] | None]]:
        """(pool thread) Take each lease if free, lapsed, ours or taken (a registration); then the rows of
        the agents taken that are not held here already: (record, current plan, links, device speed),
        None when not stored."""
        store = self._store()
        leases = store_batch.acquire_leases(store, asks, self.id, self.seconds)
        out: dict[str, tuple[str, float, tuple[Any, ...] | None]] = {}
        read = []
        for aid, (holder, left) in leases.items():
            out[aid] = (holder, left, None)
            if not ((holder and holder != self.id and left > 0 and not asks[aid]) or (holder == self.id and aid in here)):
                read.append(aid)
        if len(self._texts) > MAX_TEXTS:
            self._texts.clear()
        for aid, rows in store_batch.attach_rows(store, read, self._texts).items():
            out[aid] = (*out[aid][:2], rows)
        return out

    async def detach_unknown(self, agent_id: str) -> None:
        """Give up the lease of an agent this replica does not hold (its first registration was refused)."""
        if agent_id not in self.state.agents:
            self._attached.pop(agent_id, None)
            await asyncio.get_running_loop().run_in_executor(
                self._pool, lambda: self._store().release_leases(self.id, [agent_id]))

    def check_stream_end(self, agent_id: str) -> None:
        """At the end of a WatchPlan stream: FAILED_PRECONDITION if it ended because another replica took the agent."""
        why = self.lost.pop(agent_id, None)
        if why is not None:
            raise PreconditionFailed(why)

    # -- renewal (store thread, then event loop) -------------------------------------------------

    def renewal(self) -> Callable[[Store], Renewal]:
        """What the write-behind thread runs after a flush: renew this replica's heartbeat (the agents taken
        from it meanwhile come back) and read the worker registrations other replicas changed (against
        the registrations held now)."""
        seq, known, me, seconds = self._seq, {w: s.record.last_seen for w, s in self.state.workers.items()}, self.id, \
            self.seconds
        self.renewals += 1
        sweep = self.renewals % FORGET_EVERY == 0

        def run(store: Store) -> Renewal:
            out = Renewal(*store.heartbeat(me, seconds), seq)
            if sweep:
                store.forget_dead_replicas()
                store.prune_profiles()  # orphaned profile texts, a bounded pass (planner.store PRUNE_PROFILES)
            times = store.worker_times()
            out.gone = set(known) - set(times)
            for wid, t in times.items():
                if known.get(wid) != t:
                    out.workers.update(store.workers(wid))
            return out

        return run

    async def apply(self, r: Renewal | None) -> None:
        """Drop the agents another replica took; take in the workers other replicas changed."""
        if r is None:  # the flush failed: the leases were not renewed; try again next interval
            return
        gone = [a for a in r.taken if a in self.state.agents]
        if r.held is not None:
            logger.warning("planner replica %s: its heartbeat had lapsed; %d of its %d agents are held by another "
                           "replica now", self.id, len(set(self.state.agents) - r.held), len(self.state.agents))
            gone += [a for a in self.state.agents if a not in r.held]
        for aid in [a for a in dict.fromkeys(gone) if self._attached.get(a, 0) <= r.seq]:
            self.drop(aid, f"agent {aid!r} is attached to another planner replica now (its lease was taken); "
                           "register again")
        for wid in r.gone:
            old = self.state.workers.pop(wid, None)
            if old is not None:
                self.state.generation += 1
                self.state.metrics.workers.set(len(self.state.workers))
                self.replanner.worker_registered({}, old)
        for rec in r.workers.values():
            await self._worker_changed(rec)

    def drop(self, agent_id: str, why: str) -> None:
        """Stop serving ``agent_id`` here: forget it, end its WatchPlan streams with ``why``."""
        self.state.agents.pop(agent_id, None)
        self._attached.pop(agent_id, None)
        self.state.metrics.agents.set(len(self.state.agents))
        self.state.behind.forget(agent_id)
        self.replanner.hysteresis.reset(agent_id)
        self.lost[agent_id] = why
        self.state.behind.metrics.leases_lost.inc()
        while len(self.lost) > MAX_LOST:
            del self.lost[next(iter(self.lost))]
        for w in self.broadcaster.watchers(agent_id):
            w.closed = True
            w.event.set()
        logger.info("agent %s left replica %s: another replica took its lease", agent_id, self.id)

    async def _worker_changed(self, rec: WorkerRecord) -> None:
        """A worker registration another replica stored: hold it as if it had come here."""
        old = self.state.workers.get(rec.id)
        if old is not None and old.record.profiles == rec.profiles:
            if _same(old.record, rec):  # a periodic re-registration: only its time moved
                old.record.last_seen = rec.last_seen
                return
            parsed = old.profiles
        else:  # parsing and checking profiles runs off the event loop
            parsed = await asyncio.to_thread(requests.parse_worker_profiles, rec.id, list(rec.profiles.values()),
                                             self.state.profiles)
        self.state.generation += 1
        self.state.workers[rec.id] = WorkerState(rec, parsed, self.state.generation)
        self.state.metrics.workers.set(len(self.state.workers))
        logger.info("worker %s at %s (%s), registered with another replica", rec.id, rec.address, rec.tier)
        self.replanner.worker_registered(parsed, old)

    async def close(self) -> None:
        """Release every lease this replica holds (its agents may attach elsewhere at once); close the
        attachment threads' connections."""
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        for a in self._queue:
            a.done.cancel()
        self._queue = []
        self.state.store.release_leases(self.id)
        stores, self._stores = self._stores, []
        self._pool.shutdown(wait=True)
        for store in stores:
            store.close()  # psycopg: a connection may be closed from another thread once unused
        self._pool = ThreadPoolExecutor(ATTACH_THREADS, thread_name_prefix="planner-attach")
        self._local = threading.local()


def stored_agents(store: Store, skip: set[str]) -> list[pb.AgentInfo]:
    """The agents other replicas hold (or none does), as the store has them: ListAgents answers for the
    whole fleet whichever replica is asked (their link figures as of the holder's last flush)."""
    plans, links = store.current_plans(), store.links()
    now = time.time()
    out = []
    for aid, rec in sorted(store.agents().items()):
        if aid in skip:
            continue
        info = pb.AgentInfo(agent_id=aid, model_id=rec.model, refused_version=rec.refused_version,
                            refused_message=rec.refused_message, telemetry_age_seconds=-1.0)
        plan = plans[aid].plan if aid in plans else None
        if plan is not None:
            info.plan.CopyFrom(plan)
        mine = links.get(aid, {})
        lk = mine.get(plan.worker_id) if plan is not None and plan.worker_id else None
        if lk is not None:
            info.bandwidth_bytes_per_second, info.rtt_seconds = lk.bandwidth_bytes_per_second, lk.rtt_seconds
        if mine:
            info.telemetry_age_seconds = max(0.0, now - max(x.updated_unix for x in mine.values()))
        out.append(info)
    return out


def _same(a: WorkerRecord, b: WorkerRecord) -> bool:
    return (a.address, a.tier, a.tl_ids, a.next_tiers) == (b.address, b.tier, b.tl_ids, b.next_tiers)
