"""The planner's database: what must survive a restart, and what replicas share.

Tables: ``workers`` (address, tier, TL ids, one profile document per model, the next tiers it
forwards to), ``agents`` (model, digest, the SHA-256 of its device profile, allowed workers, TL ids,
constraints, the last refusal), ``profiles`` (each device profile text once, by its SHA-256: agents
of one board type share one row; a text no agent names any more is deleted: :meth:`Store.put_agent`,
:meth:`Store.prune_profiles`), ``links`` (the last link estimate per agent and worker), ``device_speed`` (per
agent, the smoothed device slowdown factor from its compute telemetry, :mod:`planner.compute`),
``plans`` (every plan ever issued, as serialized ``Plan`` protos; an agent's current plan is its
highest version that it did not refuse), ``counters`` (the global plan version, which only
increases, restarts included), ``leases``, ``replicas`` and ``handovers`` (which planner replica an
agent is attached to, each replica's heartbeat, agents taken from a live replica:
:mod:`planner.store_leases`). A chained plan's route (``Plan.end_split``, ``next_hops``) is part of
the stored proto, so it survives a restart as it is.

One schema on two engines (:mod:`planner.store_sql`): an SQLite file (the embedded default) or
PostgreSQL (``--store postgresql://...``, shared by replicas). Schemas 1 (before workers reported
next tiers) and 2 (a profile text per agent) are migrated in place when a planner opens the store
(PostgreSQL: under the schema lock, in one transaction); a newer schema is refused with a clear
error, so a planner of an older edgesplit refuses a migrated store (upgrade every replica). ``device_speed``,
``leases``, ``replicas`` and ``handovers`` are tables of their own, created where missing, so they need no
migration (and a planner without them ignores them; replicas of one store must all keep leases the same
way, :mod:`planner.store_leases`).

Every method here is one transaction, written before it returns. Links, heartbeats and device
speeds are batched by :mod:`planner.writebehind` and reach :meth:`Store.write_batch` once per
interval; plans and registrations are written at once (the README says which writes survive a crash).
A Store's connection belongs to one thread at a time.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from planner import store_leases
from planner.store_profiles import profile_hash
from planner.store_sql import Backend, Merge, StoreError, open_backend
from runtime.contracts.errors import PreconditionFailed
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

__all__ = ["APPLIED", "ISSUED", "REFUSED", "AgentRecord", "Batch", "LeaseLost", "LinkRecord", "PlanRecord",
           "SpeedRecord", "Store", "StoreError", "WorkerRecord", "profile_hash"]

# Plans kept per agent in the plan history (the newest; and always its newest not refused, the plan it runs):
# each issued plan is a row, and an agent refusing every plan pushed, or flapping, grew them without end.
MAX_PLAN_HISTORY = 64
SCHEMA_VERSION = 3  # 2: workers.next_tiers; 3: device profiles stored once by content hash (agents.profile holds it)

# Tables of their own (device_speed, worker_speed, leases) are created where missing and need no new version: a
# planner that does not know them ignores them. {real} and {blob}: the engine's words (planner.store_sql).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY, address TEXT NOT NULL, tier TEXT NOT NULL, tl_ids TEXT NOT NULL,
    profiles TEXT NOT NULL, registered {real} NOT NULL, last_seen {real} NOT NULL,
    next_tiers TEXT NOT NULL DEFAULT '[]');
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, digest TEXT NOT NULL, profile TEXT NOT NULL,
    workers TEXT NOT NULL, tl_ids TEXT NOT NULL, constraints TEXT NOT NULL,
    registered {real} NOT NULL, last_seen {real} NOT NULL,
    refused_version BIGINT NOT NULL DEFAULT 0, refused_message TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS links (
    agent_id TEXT NOT NULL, worker_id TEXT NOT NULL, rtt_seconds {real} NOT NULL,
    bandwidth_bytes_per_second {real} NOT NULL, updated_unix {real} NOT NULL,
    PRIMARY KEY (agent_id, worker_id));
CREATE TABLE IF NOT EXISTS device_speed (
    agent_id TEXT PRIMARY KEY, slowdown {real} NOT NULL, samples BIGINT NOT NULL, updated_unix {real} NOT NULL);
CREATE TABLE IF NOT EXISTS worker_speed (
    agent_id TEXT NOT NULL, worker_id TEXT NOT NULL, slowdown {real} NOT NULL, samples BIGINT NOT NULL,
    updated_unix {real} NOT NULL, PRIMARY KEY (agent_id, worker_id));
CREATE TABLE IF NOT EXISTS plans (
    agent_id TEXT NOT NULL, version BIGINT NOT NULL, plan {blob} NOT NULL, reason TEXT NOT NULL,
    created {real} NOT NULL, status TEXT NOT NULL DEFAULT 'issued',
    PRIMARY KEY (agent_id, version));
CREATE TABLE IF NOT EXISTS leases (
    agent_id TEXT PRIMARY KEY, replica TEXT NOT NULL, expires_unix {real} NOT NULL);
CREATE TABLE IF NOT EXISTS profiles (hash TEXT PRIMARY KEY, text TEXT NOT NULL);
"""
# an agent's row: + "DO NOTHING" (its first) or + _UPDATE_AGENT (``registered``, its first time, is kept)
_PUT_AGENT = ("INSERT INTO agents (id, model, digest, profile, workers, tl_ids, constraints, registered, last_seen, "
              "refused_version, refused_message) VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) ")
_UPDATE_AGENT = "DO UPDATE SET " + ", ".join(f"{c}=excluded.{c}" for c in (
    "model", "digest", "profile", "workers", "tl_ids", "constraints", "last_seen", "refused_version", "refused_message"))
PRUNE_PROFILES = 256  # orphaned profile texts deleted per pass (at open, and each replica's periodic sweep)

ISSUED, APPLIED, REFUSED = "issued", "applied", "refused"


@dataclass
class WorkerRecord:
    id: str
    address: str
    tier: str
    tl_ids: tuple[str, ...]
    profiles: dict[str, str]  # model -> profile JSON text (validated before it was stored)
    registered: float = 0.0
    last_seen: float = 0.0
    next_tiers: tuple[str, ...] = ()  # addresses it forwards chained frames to (its --next-tier)


@dataclass
class AgentRecord:
    id: str
    model: str
    digest: str
    profile: str  # device profile JSON text
    workers: tuple[str, ...]
    tl_ids: tuple[str, ...]
    constraints: pb.Constraints = field(default_factory=pb.Constraints)
    registered: float = 0.0
    last_seen: float = 0.0
    refused_version: int = 0
    refused_message: str = ""
    _hashed: tuple[str, str] | None = field(default=None, init=False, repr=False, compare=False)  # (profile, its hash)

    def profile_sha256(self) -> str:
        """The key ``profile`` is stored under (:func:`profile_hash`), hashed once per text this record holds."""
        held = self._hashed
        if held is None or held[0] is not self.profile:  # set with another text since: that one's hash
            held = self._hashed = (self.profile, profile_hash(self.profile))
        return held[1]

    def hold_profile(self, text: str, sha256: str) -> None:
        """``profile`` := ``text``, whose SHA-256 (hex) the caller has already (a ProfileCache key): not hashed again."""
        self.profile, self._hashed = text, (text, sha256)


@dataclass
class LinkRecord:
    rtt_seconds: float
    bandwidth_bytes_per_second: float
    updated_unix: float


@dataclass
class SpeedRecord:
    slowdown: float  # measured / profiled device compute, smoothed (1.0 = as profiled)
    samples: int
    updated_unix: float


@dataclass
class PlanRecord:
    plan: pb.Plan
    status: str


@dataclass
class Batch:
    """What the write-behind layer (planner.writebehind) gathered over one interval: the latest of each."""

    links: dict[tuple[str, str], LinkRecord] = field(default_factory=dict)  # (agent, worker) -> estimate
    seen: dict[str, float] = field(default_factory=dict)  # agent -> last_seen (heartbeat)
    speeds: dict[str, SpeedRecord] = field(default_factory=dict)  # agent -> device slowdown
    # (agent, worker) -> the worker's tail slowdown as that agent measures it (planner.compute.WorkerSpeeds)
    worker_speeds: dict[tuple[str, str], SpeedRecord] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.links) + len(self.seen) + len(self.speeds) + len(self.worker_speeds)


class Store:
    """The planner's database (see the module docstring); ``where``: a path, a ``--store`` URL or a Backend."""

    def __init__(self, where: str | Path | Backend):
        self.backend = where if isinstance(where, Backend) else open_backend(str(where))
        self.path = self.backend.describe()  # for logs: never the password
        self.db = self.backend.connection  # the driver's connection (tests look inside SQLite's)
        try:
            self._create()
        except sqlite3.DatabaseError as e:
            self.backend.close()
            raise StoreError(f"cannot use {self.path} as the planner database: {e}") from None
        except BaseException:
            self.backend.close()
            raise

    def _create(self) -> None:
        b = self.backend
        with b.transaction():
            if b.shared:  # replicas starting together: one creates the schema, the others wait for it
                b.execute("SELECT pg_advisory_xact_lock(4242)")
            for stmt in filter(str.strip, (_SCHEMA + store_leases.SCHEMA).format(**b.types).split(";")):
                b.execute(stmt)
            row = b.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                b.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] in (1, 2):
                if row[0] == 1:  # additive: workers gained next_tiers (none known for those stored)
                    b.execute("ALTER TABLE workers ADD COLUMN next_tiers TEXT NOT NULL DEFAULT '[]'")
                self._hash_profiles()
                b.execute("UPDATE schema_version SET version=?", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise StoreError(f"{self.path}: planner database schema {row[0]} is not {SCHEMA_VERSION}; "
                                 "use the edgesplit version that wrote it, or start with a new --db file / --store database")
            b.execute("INSERT INTO counters (name, value) VALUES ('plan_version', 0) ON CONFLICT (name) DO NOTHING")
            b.execute("CREATE INDEX IF NOT EXISTS agents_profile ON agents (profile)")  # after 2 -> 3: hashes, not texts
        self.prune_profiles()

    def _hash_profiles(self) -> None:
        """Schema 2 -> 3 (in the opening transaction): each distinct device profile text moves to ``profiles``
        once, under its SHA-256; ``agents.profile`` keeps the hash (10,000 agents of 10 board types: 10 rows)."""
        b = self.backend
        texts = [r[0] for r in b.execute("SELECT DISTINCT profile FROM agents")]
        for text in texts:
            h = profile_hash(text)
            b.execute("INSERT INTO profiles (hash, text) VALUES (?,?) ON CONFLICT (hash) DO NOTHING", (h, text))
            b.execute("UPDATE agents SET profile=? WHERE profile=?", (h, text))

    def _tx(self) -> contextlib.AbstractContextManager[Any]:
        return self.backend.transaction()

    def close(self) -> None:
        self.backend.close()

    # -- workers -----------------------------------------------------------------------------

    def put_worker(self, w: WorkerRecord) -> None:
        with self._tx():
            self.backend.execute(
                "INSERT INTO workers (id, address, tier, tl_ids, profiles, registered, last_seen, next_tiers) "
                "VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET address=excluded.address, "
                "tier=excluded.tier, tl_ids=excluded.tl_ids, profiles=excluded.profiles, last_seen=excluded.last_seen, "
                "next_tiers=excluded.next_tiers",
                (w.id, w.address, w.tier, json.dumps(list(w.tl_ids)), json.dumps(w.profiles), w.registered, w.last_seen,
                 json.dumps(list(w.next_tiers))))

    def delete_worker(self, worker_id: str) -> None:
        """Forget a worker whose registration lapsed or that left (planner.owners)."""
        with self._tx():
            self.backend.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    def workers(self, worker_id: str | None = None) -> dict[str, WorkerRecord]:
        """Every worker, or only ``worker_id`` (an empty dict when it is not stored)."""
        sql = "SELECT id, address, tier, tl_ids, profiles, registered, last_seen, next_tiers FROM workers"
        rows = self.backend.execute(sql + " WHERE id = ?", (worker_id,)) if worker_id else self.backend.execute(sql)
        return {r[0]: WorkerRecord(r[0], r[1], r[2], tuple(json.loads(r[3])), json.loads(r[4]), r[5], r[6],
                                   tuple(json.loads(r[7]))) for r in rows}

    def worker_times(self) -> dict[str, float]:
        """worker id -> last registration (cheap: replicas compare it to see what another one changed)."""
        return dict(self.backend.execute("SELECT id, last_seen FROM workers"))

    # -- agents ------------------------------------------------------------------------------

    def put_agent(self, a: AgentRecord) -> None:
        """The agent's row; its profile text once per content (``profiles``), the row holds its hash; the text it
        named before is deleted afterwards if no agent names it. Replicas: the agent's row is read ``FOR UPDATE`` (a
        first row is inserted only if none is there, else read so): two registrations of one agent take turns, the
        second deletes the text the first wrote if orphaned; the profile row is read ``FOR SHARE`` (or written) first:
        a deletion (:meth:`drop_orphan_profiles`, ``FOR UPDATE`` first) waits and sees the agent's row, or ends first
        and the text is written again. SQLite has one writer at a time."""
        h, b = a.profile_sha256(), self.backend
        values = (a.id, a.model, a.digest, h, json.dumps(list(a.workers)), json.dumps(list(a.tl_ids)),
                  json_format.MessageToJson(a.constraints, indent=None), a.registered, a.last_seen,
                  a.refused_version, a.refused_message)
        with self._tx():  # one statement when the agent and its text are stored: both locked, the old hash read
            old, stored = b.execute(f"SELECT (SELECT profile FROM agents WHERE id=?{b.lock_sql}), "
                                    f"(SELECT hash FROM profiles WHERE hash=?{b.share_sql})", (a.id, h)).fetchone()
            if stored is None:
                b.execute("INSERT INTO profiles (hash, text) VALUES (?,?) ON CONFLICT (hash) DO UPDATE SET "
                          "hash=excluded.hash", (h, a.profile))  # DO UPDATE: the row is locked either way
            if old is None:  # its first row, unless another registration wrote one meanwhile: then read that locked
                if b.execute(_PUT_AGENT + "DO NOTHING", values).rowcount == 1:
                    return
                old = b.execute(f"SELECT profile FROM agents WHERE id=?{b.lock_sql}", (a.id,)).fetchone()[0]
            b.execute(_PUT_AGENT + _UPDATE_AGENT, values)
        if old != h:  # re-registered with another profile: its old text may be orphaned
            self.drop_orphan_profiles([old])

    def drop_orphan_profiles(self, hashes: list[str]) -> int:
        """Delete the profile texts of ``hashes`` that no agent names; returns how many went. Their rows are
        locked first (in hash order: no deadlock between two of these), so the check sees every agent row
        written under a share lock on them (:meth:`put_agent`)."""
        b, marks = self.backend, ",".join("?" * len(hashes))
        with self._tx():
            if b.lock_sql:
                b.execute(f"SELECT hash FROM profiles WHERE hash IN ({marks}) ORDER BY hash{b.lock_sql}", hashes)
            cur = b.execute(f"DELETE FROM profiles WHERE hash IN ({marks}) AND NOT EXISTS (SELECT 1 FROM agents "
                            "WHERE agents.profile = profiles.hash)", hashes)
            return int(cur.rowcount)

    def prune_profiles(self, limit: int = PRUNE_PROFILES) -> int:
        """One bounded pass over orphaned profile texts (left by a planner before they were deleted, or by a crash
        between an agent's new row and the deletion): at most ``limit`` deleted; returns how many."""
        found = [r[0] for r in self.backend.execute("SELECT hash FROM profiles p WHERE NOT EXISTS (SELECT 1 FROM agents "
                                                    "a WHERE a.profile = p.hash) ORDER BY hash LIMIT ?", (limit,))]
        return self.drop_orphan_profiles(found) if found else 0

    def agents(self, agent_id: str | None = None) -> dict[str, AgentRecord]:
        """Every agent, or only ``agent_id`` (an empty dict when it is not stored)."""
        sql = ("SELECT a.id, a.model, a.digest, p.text, a.workers, a.tl_ids, a.constraints, a.registered, a.last_seen, "
               "a.refused_version, a.refused_message, a.profile FROM agents a JOIN profiles p ON p.hash = a.profile")
        rows = self.backend.execute(sql + " WHERE a.id = ?", (agent_id,)) if agent_id else self.backend.execute(sql)
        out = {}
        for r in rows:
            out[r[0]] = rec = AgentRecord(r[0], r[1], r[2], r[3], tuple(json.loads(r[4])), tuple(json.loads(r[5])),
                                          json_format.Parse(r[6], pb.Constraints()), r[7], r[8], r[9], r[10])
            rec.hold_profile(r[3], r[11])  # the row's key: not hashed again
        return out

    def touch_agent(self, agent_id: str, last_seen: float) -> None:
        with self._tx():
            self.backend.execute("UPDATE agents SET last_seen=? WHERE id=?", (last_seen, agent_id))

    # -- links -------------------------------------------------------------------------------

    def put_link(self, agent_id: str, worker_id: str, link: LinkRecord) -> None:
        with self._tx():
            self.backend.execute(_PUT_LINK, (agent_id, worker_id, link.rtt_seconds, link.bandwidth_bytes_per_second,
                                             link.updated_unix))

    def links(self, agent_id: str | None = None) -> dict[str, dict[str, LinkRecord]]:
        sql = "SELECT agent_id, worker_id, rtt_seconds, bandwidth_bytes_per_second, updated_unix FROM links"
        rows = self.backend.execute(sql + " WHERE agent_id = ?", (agent_id,)) if agent_id else self.backend.execute(sql)
        out: dict[str, dict[str, LinkRecord]] = {}
        for a, w, rtt, bw, t in rows:
            out.setdefault(a, {})[w] = LinkRecord(rtt, bw, t)
        return out

    # -- device speed ------------------------------------------------------------------------

    def put_speed(self, agent_id: str, speed: SpeedRecord) -> None:
        with self._tx():
            self.backend.execute(_PUT_SPEED, (agent_id, speed.slowdown, speed.samples, speed.updated_unix))

    def speeds(self, agent_id: str | None = None) -> dict[str, SpeedRecord]:
        sql = "SELECT agent_id, slowdown, samples, updated_unix FROM device_speed"
        rows = self.backend.execute(sql + " WHERE agent_id = ?", (agent_id,)) if agent_id else self.backend.execute(sql)
        return {a: SpeedRecord(f, n, t) for a, f, n, t in rows}

    def worker_speeds(self, agent_id: str | None = None) -> dict[str, dict[str, SpeedRecord]]:
        """agent -> worker -> its tail slowdown as the agent measured it (written by the write-behind batch)."""
        sql = "SELECT agent_id, worker_id, slowdown, samples, updated_unix FROM worker_speed"
        rows = self.backend.execute(sql + " WHERE agent_id = ?", (agent_id,)) if agent_id else self.backend.execute(sql)
        out: dict[str, dict[str, SpeedRecord]] = {}
        for a, w, f, n, t in rows:
            out.setdefault(a, {})[w] = SpeedRecord(f, n, t)
        return out

    # -- the write-behind batch ----------------------------------------------------------------

    def write_batch(self, batch: Batch) -> None:
        """Links, heartbeats and device speeds of one interval, in one transaction (planner.writebehind)."""
        b = self.backend
        with self._tx():
            if batch.links:
                b.merge_many(_MERGE_LINKS, sorted((a, w, lk.rtt_seconds, lk.bandwidth_bytes_per_second, lk.updated_unix)
                                                  for (a, w), lk in batch.links.items()))
            if batch.seen:
                b.merge_many(_MERGE_SEEN, sorted((a, t) for a, t in batch.seen.items()))
            if batch.speeds:
                b.executemany(_PUT_SPEED, sorted((a, s.slowdown, s.samples, s.updated_unix)
                                                 for a, s in batch.speeds.items()))
            if batch.worker_speeds:
                b.executemany(_PUT_WORKER_SPEED, sorted((a, w, s.slowdown, s.samples, s.updated_unix)
                                                        for (a, w), s in batch.worker_speeds.items()))

    # -- plans -------------------------------------------------------------------------------

    def issue_plan(self, plan: pb.Plan, fence: tuple[str, float] | None = None) -> pb.Plan:
        """Give ``plan`` the next global version and record it, in one transaction; returns it.
        ``fence`` (replica id, lease seconds): only while that replica holds the agent's lease (renewed
        here), else LeaseLost and nothing is written."""
        out = pb.Plan()
        out.CopyFrom(plan)
        b = self.backend
        with self._tx():
            if fence is not None and not self.renew_leases(fence[0], fence[1], [plan.agent_id]):
                raise LeaseLost(f"agent {plan.agent_id!r} is attached to another planner replica now; "
                                "its next registration brings it back")
            (version,) = b.execute(
                "UPDATE counters SET value = value + 1 WHERE name='plan_version' RETURNING value").fetchone()
            out.version = version
            if not out.created_unix:
                out.created_unix = time.time()
            b.execute("INSERT INTO plans (agent_id, version, plan, reason, created, status) VALUES (?,?,?,?,?,?)",
                      (out.agent_id, version, out.SerializeToString(), out.reason, out.created_unix, ISSUED))
            b.execute(_PRUNE_PLANS, (out.agent_id, out.agent_id, MAX_PLAN_HISTORY - 1, out.agent_id, REFUSED, version))
        return out

    def last_version(self) -> int:
        return int(self.backend.execute("SELECT value FROM counters WHERE name='plan_version'").fetchone()[0])

    def set_plan_status(self, agent_id: str, version: int, status: str, refused_message: str = "") -> bool:
        """Mark a plan applied or refused (a refusal is also recorded on the agent); False: no such plan."""
        b = self.backend
        with self._tx():
            cur = b.execute("UPDATE plans SET status=? WHERE agent_id=? AND version=?", (status, agent_id, version))
            if cur.rowcount == 0:
                return False
            if status == REFUSED:
                b.execute("UPDATE agents SET refused_version=?, refused_message=? WHERE id=?",
                          (version, refused_message, agent_id))
        return True

    def plan(self, agent_id: str, version: int) -> PlanRecord | None:
        row = self.backend.execute("SELECT plan, status FROM plans WHERE agent_id=? AND version=?",
                                   (agent_id, version)).fetchone()
        return PlanRecord(pb.Plan.FromString(bytes(row[0])), row[1]) if row else None

    def current_plans(self) -> dict[str, PlanRecord]:
        """Per agent, the highest version it has not refused."""
        rows = self.backend.execute(
            "SELECT p.agent_id, p.plan, p.status FROM plans p JOIN (SELECT agent_id, MAX(version) AS v FROM plans "
            "WHERE status != ? GROUP BY agent_id) m ON p.agent_id = m.agent_id AND p.version = m.v", (REFUSED,))
        return {a: PlanRecord(pb.Plan.FromString(bytes(blob)), status) for a, blob, status in rows}

    def current_plan(self, agent_id: str) -> PlanRecord | None:
        row = self.backend.execute("SELECT plan, status FROM plans WHERE agent_id=? AND status != ? ORDER BY version "
                                   "DESC LIMIT 1", (agent_id, REFUSED)).fetchone()
        return PlanRecord(pb.Plan.FromString(bytes(row[0])), row[1]) if row else None

    def history(self, agent_id: str, limit: int = 100) -> list[PlanRecord]:
        """Newest first."""
        rows = self.backend.execute("SELECT plan, status FROM plans WHERE agent_id=? ORDER BY version DESC LIMIT ?",
                                    (agent_id, limit))
        return [PlanRecord(pb.Plan.FromString(bytes(blob)), status) for blob, status in rows]

    # -- leases (planner.leases: which replica an agent is attached to) -------------------------

    def acquire_lease(self, agent_id: str, replica: str, seconds: float, take: bool) -> tuple[str, float]:
        """Hold ``agent_id``'s lease for ``replica`` if it is free, lapsed, its own, or ``take``
        (:func:`planner.store_leases.acquire`). Returns (the holder before, seconds its lease had left);
        the holder before is ``replica`` or "" when the lease was free, and when it is another one with
        time left and not ``take``, nothing changed."""
        return store_leases.acquire(self.backend, {agent_id: take}, replica, seconds)[agent_id]

    def renew_leases(self, replica: str, seconds: float, agent_ids: list[str] | None = None) -> set[str]:
        """Extend the lease rows ``replica`` still holds (all, or those of ``agent_ids``); returns their agent
        ids. A replica's leases live by its heartbeat (:meth:`heartbeat`); this is the plan's fence (one row)."""
        b = self.backend
        sql = f"UPDATE leases SET expires_unix = {b.now_sql} + ? WHERE replica = ?"
        if agent_ids is None:
            rows = b.execute(sql + " RETURNING agent_id", (seconds, replica))
        else:
            marks = ",".join("?" * len(agent_ids))
            rows = b.execute(sql + f" AND agent_id IN ({marks}) RETURNING agent_id", (seconds, replica, *agent_ids))
        return {r[0] for r in rows}

    def heartbeat(self, replica: str, seconds: float) -> tuple[set[str], set[str] | None]:
        """Renew ``replica``'s heartbeat (every lease it holds lives by it); returns (agents taken from it
        since the last one, every agent it holds or None: only after its heartbeat had lapsed)."""
        return store_leases.heartbeat(self.backend, replica, seconds)

    def start_replica(self, replica: str, seconds: float) -> None:
        """``replica`` starts holding nothing; its heartbeat begins."""
        store_leases.start(self.backend, replica, seconds)

    def forget_dead_replicas(self) -> int:
        """Remove the heartbeat rows of replicas dead for long (:func:`planner.store_leases.forget_dead`)."""
        return store_leases.forget_dead(self.backend)

    def release_leases(self, replica: str, agent_ids: list[str] | None = None) -> None:
        """Give up ``replica``'s leases (all, with its heartbeat, or those of ``agent_ids``): another replica
        may take them at once."""
        store_leases.release(self.backend, replica, agent_ids)

    def leases(self) -> dict[str, tuple[str, float]]:
        """agent id -> (replica, seconds left; negative: lapsed)."""
        return store_leases.leases(self.backend)


# an agent's plans older than its MAX_PLAN_HISTORY newest (none when it has fewer: the subquery is NULL), but the
# newest not refused before the one just issued (the plan it runs if that one is refused; on the primary key's index)
_PRUNE_PLANS = ("DELETE FROM plans WHERE agent_id=? AND version < (SELECT version FROM plans WHERE agent_id=? ORDER BY "
                "version DESC LIMIT 1 OFFSET ?) AND version <> COALESCE((SELECT MAX(version) FROM plans WHERE agent_id=? "
                "AND status <> ? AND version < ?), 0)")
_PUT_LINK = ("INSERT INTO links (agent_id, worker_id, rtt_seconds, bandwidth_bytes_per_second, updated_unix) "
             "VALUES (?,?,?,?,?) ON CONFLICT (agent_id, worker_id) DO UPDATE SET rtt_seconds=excluded.rtt_seconds, "
             "bandwidth_bytes_per_second=excluded.bandwidth_bytes_per_second, updated_unix=excluded.updated_unix")
_MERGE_LINKS = Merge("links_in", _PUT_LINK, "agent_id TEXT, worker_id TEXT, rtt_seconds DOUBLE PRECISION, "
                     "bandwidth_bytes_per_second DOUBLE PRECISION, updated_unix DOUBLE PRECISION",
                     _PUT_LINK.split(" VALUES ")[0] + " SELECT * FROM {src} " + _PUT_LINK.split("(?,?,?,?,?) ")[1])
_MERGE_SEEN = Merge("seen_in", "UPDATE agents SET last_seen=? WHERE id=?", "id TEXT, last_seen DOUBLE PRECISION",
                    "UPDATE agents SET last_seen = s.last_seen FROM {src} s WHERE agents.id = s.id", params=(1, 0))
_PUT_SPEED = ("INSERT INTO device_speed (agent_id, slowdown, samples, updated_unix) VALUES (?,?,?,?) "
              "ON CONFLICT (agent_id) DO UPDATE SET slowdown=excluded.slowdown, samples=excluded.samples, "
              "updated_unix=excluded.updated_unix")
_PUT_WORKER_SPEED = ("INSERT INTO worker_speed (agent_id, worker_id, slowdown, samples, updated_unix) VALUES (?,?,?,?,?) "
                     "ON CONFLICT (agent_id, worker_id) DO UPDATE SET slowdown=excluded.slowdown, "
                     "samples=excluded.samples, updated_unix=excluded.updated_unix")


class LeaseLost(PreconditionFailed):
    """This replica no longer holds the agent's lease (another one took it): nothing was written."""
