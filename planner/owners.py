"""Who owns which worker_id and agent_id at the planner: bindings, leases, expiry and quotas.

An id is bound to the caller that first registered it, and every later call about that id
(re-registration, telemetry, plan status, WatchPlan, QueryPlan) must come from the same owner;
anyone else is refused PERMISSION_DENIED, so a stranger can neither re-point a worker_id at
its own address nor speak for an agent.

* An authenticated caller (certificate or token, runtime.daemon.auth) is its identity: a worker
  may use only the worker_id its identity names, an agent only its agent_id. Operators may act for
  any id (and bind none).
* An anonymous caller (a loopback planner without authentication) owns an id through the lease
  secret it sends in ``edgesplit-lease`` metadata (runtime.daemon.planner_client sends one per
  process); the planner keeps only its SHA-256.

A binding lasts ``registration_ttl_seconds`` after the owner's last call about it (workers
re-register every 30 s, agents send telemetry); once it lapses the id is free again and an expired
worker is dropped (``PlannerServicer`` removes it, so no plan points at it). One owner holds at
most ``max_ids_per_identity`` ids.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from planner.state import PlannerState, WorkerState
from runtime.contracts.errors import Overloaded, PermissionDenied
from runtime.daemon.auth import Identity
from runtime.wire.security import AGENT, OPERATOR, WORKER

logger = logging.getLogger(__name__)

LEASE_HEADER = "edgesplit-lease"
MAX_LEASE_CHARS = 256  # a longer lease header is refused unread
KIND_ROLE = {"worker": WORKER, "agent": AGENT}


@dataclass
class Binding:
    owner: str  # "cert:ROLE/ID", "token:ROLE/ID" or "lease:SHA256" ("lease:" alone: no lease sent)
    expires: float  # monotonic time after which the id is free


def _shown(ident: str) -> str:
    """An id as a message shows it: calls reach the owner check before the id's own check, so cut it."""
    return ident if len(ident) <= 40 else ident[:40] + "..."


def lease_of(context: grpc.aio.ServicerContext | None) -> str:
    """The caller's lease header ("" when none)."""
    if context is None:
        return ""
    for key, value in context.invocation_metadata() or ():
        if key == LEASE_HEADER:
            text = value if isinstance(value, str) else value.decode(errors="replace")
            if len(text) > MAX_LEASE_CHARS:
                raise PermissionDenied(f"{LEASE_HEADER} longer than {MAX_LEASE_CHARS} characters")
            return text
    return ""


class Owners:
    """The bindings of worker and agent ids to their owners (see the module docstring)."""

    def __init__(self, ttl_seconds: float, max_ids_per_identity: int, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl_seconds
        self.max_ids = max_ids_per_identity
        self.clock = clock
        self.bindings: dict[tuple[str, str], Binding] = {}
        self._held: dict[str, set[tuple[str, str]]] = {}  # owner -> its bindings (lapsed ones until swept)
        self.refused = 0  # calls refused because another owner holds the id

    def _bind(self, key: tuple[str, str], owner: str, expires: float) -> None:
        old = self.bindings.get(key)
        if old is not None:
            self._unbind(key, old.owner)
        self.bindings[key] = Binding(owner, expires)
        self._held.setdefault(owner, set()).add(key)

    def _unbind(self, key: tuple[str, str], owner: str) -> None:
        keys = self._held.get(owner)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._held[owner]

    def held(self, owner: str, now: float) -> int:
        """Live bindings of ``owner``: O(its bindings), at most ``max_ids`` (+ lapsed ones), never O(all ids)."""
        return sum(1 for key in self._held.get(owner, ()) if self.bindings[key].expires > now)

    def _owner(self, kind: str, ident: str, identity: Identity, lease: str) -> str | None:
        """The owner key of this caller for ``kind`` ``ident``; None for an operator (acts for anyone)."""
        if identity.authenticated:
            if identity.role == OPERATOR:
                return None
            if identity.role != KIND_ROLE[kind] or identity.id != ident:
                self.refused += 1
                raise PermissionDenied(f"{identity} may act only for its own {identity.role} id {identity.id!r}, "
                                       f"not for {kind} {_shown(ident)!r}")
            return f"{identity.via}:{identity.role}/{identity.id}"
        return "lease:" + (hashlib.sha256(lease.encode()).hexdigest() if lease else "")

    def claim(self, kind: str, ident: str, identity: Identity, lease: str) -> None:
        """A registration of ``ident``: bind it to this caller, or refuse (PERMISSION_DENIED, RESOURCE_EXHAUSTED)."""
        owner = self._owner(kind, ident, identity, lease)
        now = self.clock()
        current = self.bindings.get((kind, ident))
        if current is not None and current.expires > now:
            if owner is not None and current.owner != owner:
                self.refused += 1
                raise PermissionDenied(f"{kind} id {_shown(ident)!r} is registered by another caller; pick another id, or "
                                       f"wait {current.expires - now:.0f}s for its registration to lapse")
            current.expires = now + self.ttl
            return
        if owner is None:
            owner = "operator"
        keys = self._held.get(owner, ())
        if len(keys) >= self.max_ids and (held := self.held(owner, now)) >= self.max_ids:
            raise Overloaded(f"this caller already holds {held} registrations, the planner's "
                             f"max_ids_per_identity limit")
        self._bind((kind, ident), owner, now + self.ttl)

    def check(self, kind: str, ident: str, identity: Identity, lease: str) -> None:
        """A call about ``ident`` other than its registration: only its owner (renews the binding)."""
        owner = self._owner(kind, ident, identity, lease)
        now = self.clock()
        current = self.bindings.get((kind, ident))
        if current is None or current.expires <= now:
            return  # unbound (registered before a planner restart): the RPC's own checks decide
        if owner is not None and current.owner != owner:
            self.refused += 1
            raise PermissionDenied(f"{kind} {_shown(ident)!r} belongs to another caller; a caller reports only for itself")
        current.expires = now + self.ttl

    def release(self, kind: str, ident: str) -> None:
        old = self.bindings.pop((kind, ident), None)
        if old is not None:
            self._unbind((kind, ident), old.owner)

    def expired(self, kind: str) -> list[str]:
        """Ids of ``kind`` whose binding lapsed (removed from the bindings)."""
        now = self.clock()
        gone = [key for key, b in self.bindings.items() if key[0] == kind and b.expires <= now]
        for key in gone:
            self._unbind(key, self.bindings.pop(key).owner)
        return [ident for _, ident in gone]


def expire_workers(state: PlannerState, ttl_seconds: float, now: float | None = None) -> list[WorkerState]:
    """Drop the workers (``PlannerState.workers``, store included) not registered again within
    ``ttl_seconds``; returns their states, so the re-planner moves their agents elsewhere."""
    now = time.time() if now is None else now
    gone = [wid for wid, w in state.workers.items() if now - w.record.last_seen > ttl_seconds]
    for wid in gone:
        logger.warning("worker %s expired: not registered again for %.0fs; no plan points at it any more", wid,
                       ttl_seconds)
    return [w for w in (remove_worker(state, wid) for wid in gone) if w is not None]


def remove_worker(state: PlannerState, worker_id: str) -> WorkerState | None:
    """Forget a worker (held and stored); its previous state, if it was registered."""
    old = state.workers.pop(worker_id, None)
    if old is not None:
        state.store.delete_worker(worker_id)
        state.generation += 1
        state.metrics.workers.set(len(state.workers))
    return old
