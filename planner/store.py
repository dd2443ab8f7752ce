"""The planner's embedded database (stdlib ``sqlite3``, WAL): what must survive a restart.

Tables: ``workers`` (address, tier, TL ids, one profile document per model, the next tiers it
forwards to), ``agents`` (model,
digest, device profile, allowed workers, TL ids, constraints, the last refusal), ``links`` (the
last link estimate per agent and worker), ``device_speed`` (per agent, the smoothed device
slowdown factor from its compute telemetry, :mod:`planner.compute`), ``plans`` (every plan ever issued, as serialized
``Plan`` protos; an agent's current plan is its highest version that it did not refuse) and
``counters`` (the global plan version, which only increases, restarts included). A chained
plan's route (``Plan.end_split``, ``next_hops``) is part of the stored proto, so it survives a
restart as it is. Schema 1 (before workers reported next tiers) is migrated in place;
``device_speed`` is a table of its own, created where missing, so it needs no migration (and a
planner without it ignores it). Every write is
one transaction. The connection belongs to the thread that opened it (the planner's event loop).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import json_format

from runtime.contracts.errors import EdgesplitError
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

SCHEMA_VERSION = 2  # 2: workers.next_tiers

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY, address TEXT NOT NULL, tier TEXT NOT NULL, tl_ids TEXT NOT NULL,
    profiles TEXT NOT NULL, registered REAL NOT NULL, last_seen REAL NOT NULL,
    next_tiers TEXT NOT NULL DEFAULT '[]');
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, digest TEXT NOT NULL, profile TEXT NOT NULL,
    workers TEXT NOT NULL, tl_ids TEXT NOT NULL, constraints TEXT NOT NULL,
    registered REAL NOT NULL, last_seen REAL NOT NULL,
    refused_version INTEGER NOT NULL DEFAULT 0, refused_message TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS links (
    agent_id TEXT NOT NULL, worker_id TEXT NOT NULL, rtt_seconds REAL NOT NULL,
    bandwidth_bytes_per_second REAL NOT NULL, updated_unix REAL NOT NULL,
    PRIMARY KEY (agent_id, worker_id));
CREATE TABLE IF NOT EXISTS device_speed (
    agent_id TEXT PRIMARY KEY, slowdown REAL NOT NULL, samples INTEGER NOT NULL, updated_unix REAL NOT NULL);
CREATE TABLE IF NOT EXISTS plans (
    agent_id TEXT NOT NULL, version INTEGER NOT NULL, plan BLOB NOT NULL, reason TEXT NOT NULL,
    created REAL NOT NULL, status TEXT NOT NULL DEFAULT 'issued',
    PRIMARY KEY (agent_id, version));
"""

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


class StoreError(EdgesplitError):
    """The database file cannot be used (newer schema, not a planner database, unreadable)."""


class Store:
    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None)  # explicit BEGIN/COMMIT below
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, never corrupt
            with self._tx():
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    self.db.execute(stmt)
                row = self.db.execute("SELECT version FROM schema_version").fetchone()
                if row is None:
                    self.db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                elif row[0] == 1:  # additive: workers gained next_tiers (none known for those stored)
                    self.db.execute("ALTER TABLE workers ADD COLUMN next_tiers TEXT NOT NULL DEFAULT '[]'")
                    self.db.execute("UPDATE schema_version SET version=?", (SCHEMA_VERSION,))
                elif row[0] != SCHEMA_VERSION:
                    raise StoreError(f"{self.path}: planner database schema {row[0]} is not {SCHEMA_VERSION}; "
                                     "use the edgesplit version that wrote it, or start with a new --db file")
                self.db.execute("INSERT OR IGNORE INTO counters VALUES ('plan_version', 0)")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot use {self.path} as the planner database: {e}") from None

    def _tx(self):
        return _Transaction(self.db)

    def close(self) -> None:
        self.db.close()

    # -- workers -----------------------------------------------------------------------------

    def put_worker(self, w: WorkerRecord) -> None:
        with self._tx():
            self.db.execute(
                "INSERT INTO workers (id, address, tier, tl_ids, profiles, registered, last_seen, next_tiers) "
                "VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET address=excluded.address, "
                "tier=excluded.tier, tl_ids=excluded.tl_ids, profiles=excluded.profiles, last_seen=excluded.last_seen, "
                "next_tiers=excluded.next_tiers",
                (w.id, w.address, w.tier, json.dumps(list(w.tl_ids)), json.dumps(w.profiles), w.registered, w.last_seen,
                 json.dumps(list(w.next_tiers))))

    def delete_worker(self, worker_id: str) -> None:
        """Forget a worker whose registration lapsed or that left (planner.owners)."""
        with self._tx():
            self.db.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    def workers(self) -> dict[str, WorkerRecord]:
        rows = self.db.execute("SELECT id, address, tier, tl_ids, profiles, registered, last_seen, next_tiers FROM workers")
        return {r[0]: WorkerRecord(r[0], r[1], r[2], tuple(json.loads(r[3])), json.loads(r[4]), r[5], r[6],
                                   tuple(json.loads(r[7]))) for r in rows}

    # -- agents ------------------------------------------------------------------------------

    def put_agent(self, a: AgentRecord) -> None:
        with self._tx():
            self.db.execute(
                "INSERT INTO agents VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET model=excluded.model, "
                "digest=excluded.digest, profile=excluded.profile, workers=excluded.workers, tl_ids=excluded.tl_ids, "
                "constraints=excluded.constraints, last_seen=excluded.last_seen, "
                "refused_version=excluded.refused_version, refused_message=excluded.refused_message",
                (a.id, a.model, a.digest, a.profile, json.dumps(list(a.workers)), json.dumps(list(a.tl_ids)),
                 json_format.MessageToJson(a.constraints, indent=None), a.registered, a.last_seen,
                 a.refused_version, a.refused_message))

    def agents(self) -> dict[str, AgentRecord]:
        rows = self.db.execute("SELECT id, model, digest, profile, workers, tl_ids, constraints, registered, last_seen, "
                               "refused_version, refused_message FROM agents")
        out = {}
        for r in rows:
            out[r[0]] = AgentRecord(r[0], r[1], r[2], r[3], tuple(json.loads(r[4])), tuple(json.loads(r[5])),
                                    json_format.Parse(r[6], pb.Constraints()), r[7], r[8], r[9], r[10])
        return out

    def touch_agent(self, agent_id: str, last_seen: float) -> None:
        with self._tx():
            self.db.execute("UPDATE agents SET last_seen=? WHERE id=?", (last_seen, agent_id))

    # -- links -------------------------------------------------------------------------------

    def put_link(self, agent_id: str, worker_id: str, link: LinkRecord) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO links VALUES (?,?,?,?,?)",
                            (agent_id, worker_id, link.rtt_seconds, link.bandwidth_bytes_per_second, link.updated_unix))

    def links(self) -> dict[str, dict[str, LinkRecord]]:
        out: dict[str, dict[str, LinkRecord]] = {}
        for a, w, rtt, bw, t in self.db.execute("SELECT agent_id, worker_id, rtt_seconds, bandwidth_bytes_per_second, "
                                                "updated_unix FROM links"):
            out.setdefault(a, {})[w] = LinkRecord(rtt, bw, t)
        return out

    # -- device speed ------------------------------------------------------------------------

    def put_speed(self, agent_id: str, speed: SpeedRecord) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO device_speed VALUES (?,?,?,?)",
                            (agent_id, speed.slowdown, speed.samples, speed.updated_unix))

    def speeds(self) -> dict[str, SpeedRecord]:
        rows = self.db.execute("SELECT agent_id, slowdown, samples, updated_unix FROM device_speed")
        return {a: SpeedRecord(f, n, t) for a, f, n, t in rows}

    # -- plans -------------------------------------------------------------------------------

    def issue_plan(self, plan: pb.Plan) -> pb.Plan:
        """Give ``plan`` the next global version and record it, in one transaction; returns it."""
        out = pb.Plan()
        out.CopyFrom(plan)
        with self._tx():
            (version,) = self.db.execute(
                "UPDATE counters SET value = value + 1 WHERE name='plan_version' RETURNING value").fetchone()
            out.version = version
            if not out.created_unix:
                out.created_unix = time.time()
            self.db.execute("INSERT INTO plans VALUES (?,?,?,?,?,?)",
                            (out.agent_id, version, out.SerializeToString(), out.reason, out.created_unix, ISSUED))
        return out

    def last_version(self) -> int:
        return self.db.execute("SELECT value FROM counters WHERE name='plan_version'").fetchone()[0]

    def set_plan_status(self, agent_id: str, version: int, status: str, refused_message: str = "") -> bool:
        """Mark a plan applied or refused (a refusal is also recorded on the agent); False: no such plan."""
        with self._tx():
            cur = self.db.execute("UPDATE plans SET status=? WHERE agent_id=? AND version=?", (status, agent_id, version))
            if cur.rowcount == 0:
                return False
            if status == REFUSED:
                self.db.execute("UPDATE agents SET refused_version=?, refused_message=? WHERE id=?",
                                (version, refused_message, agent_id))
        return True

    def plan(self, agent_id: str, version: int) -> PlanRecord | None:
        row = self.db.execute("SELECT plan, status FROM plans WHERE agent_id=? AND version=?", (agent_id, version)).fetchone()
        return PlanRecord(pb.Plan.FromString(row[0]), row[1]) if row else None

    def current_plans(self) -> dict[str, PlanRecord]:
        """Per agent, the highest version it has not refused."""
        rows = self.db.execute(
            "SELECT p.agent_id, p.plan, p.status FROM plans p JOIN (SELECT agent_id, MAX(version) AS v FROM plans "
            "WHERE status != ? GROUP BY agent_id) m ON p.agent_id = m.agent_id AND p.version = m.v", (REFUSED,))
        return {a: PlanRecord(pb.Plan.FromString(blob), status) for a, blob, status in rows}

    def current_plan(self, agent_id: str) -> PlanRecord | None:
        row = self.db.execute("SELECT plan, status FROM plans WHERE agent_id=? AND status != ? ORDER BY version DESC "
                              "LIMIT 1", (agent_id, REFUSED)).fetchone()
        return PlanRecord(pb.Plan.FromString(row[0]), row[1]) if row else None

    def history(self, agent_id: str, limit: int = 100) -> list[PlanRecord]:
        """Newest first."""
        rows = self.db.execute("SELECT plan, status FROM plans WHERE agent_id=? ORDER BY version DESC LIMIT ?",
                               (agent_id, limit))
        return [PlanRecord(pb.Plan.FromString(blob), status) for blob, status in rows]


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` when the block raises."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
