"""Many agents attaching to a replica at once, in a few statements (planner.replicas).

When a replica dies its agents register again on the survivors, thousands within a few seconds.
Taking each one's lease and reading its rows one by one was about eight PostgreSQL round trips per
agent (BEGIN, SELECT ... FOR UPDATE, INSERT, COMMIT, then its record with its 85 KB profile text,
its current plan, links and device speed). Here a batch of agents costs one lease transaction (one
locking SELECT and one multi-row upsert) and one SELECT per table, whatever the batch's size; a
device profile's text is read only for hashes the caller does not hold already (agents of one
board type share one, stored once by SHA-256: :mod:`planner.store`).

Rows are locked in agent-id order (``ORDER BY agent_id FOR UPDATE``), so two batches that share
agents wait for each other instead of deadlocking; a holder's heartbeat row is read ``FOR SHARE``
after them (:mod:`planner.store_leases`). Should PostgreSQL still abort a batch as a deadlock, the
caller runs it again (:func:`planner.replicas.Replica`).

Statements use ``IN (?, ...)`` lists of at most :data:`CHUNK` ids, which both engines accept.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import json_format

from planner import store_leases
from planner.store import REFUSED, AgentRecord, LinkRecord, PlanRecord, SpeedRecord, Store
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

CHUNK = 500  # ids per statement (SQLite allows 32,766 parameters, PostgreSQL 65,535; an upsert row takes 3)

Rows = tuple[AgentRecord, PlanRecord | None, dict[str, LinkRecord], SpeedRecord | None]


def _chunks(ids: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(ids), CHUNK):
        yield ids[i:i + CHUNK]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def acquire_leases(store: Store, asks: dict[str, bool], replica: str, seconds: float) -> dict[str, tuple[str, float]]:
    """Per agent of ``asks`` (agent id -> take), as :meth:`Store.acquire_lease` does for one, in one
    transaction (:func:`planner.store_leases.acquire`): its lease is held by ``replica`` if it was free,
    lapsed, its own or taken (``take``: a registration). Returns agent id -> (the holder before, seconds
    it had left)."""
    return store_leases.acquire(store.backend, asks, replica, seconds, CHUNK)


def attach_rows(store: Store, ids: Sequence[str], texts: dict[str, str]) -> dict[str, Rows]:
    """Each stored agent of ``ids``: (record, current plan, links, device speed); absent: not stored.
    ``texts``: profile hash -> text already held (updated with the ones read here)."""
    b = store.backend
    ids = sorted(set(ids))
    agents: dict[str, tuple[Any, ...]] = {}
    for part in _chunks(ids):
        for r in b.execute("SELECT id, model, digest, profile, workers, tl_ids, constraints, registered, last_seen, "
                           f"refused_version, refused_message FROM agents WHERE id IN ({_marks(len(part))})", tuple(part)):
            agents[r[0]] = r
    need = sorted({r[3] for r in agents.values()} - set(texts))
    for part in _chunks(need):
        for h, text in b.execute(f"SELECT hash, text FROM profiles WHERE hash IN ({_marks(len(part))})", tuple(part)):
            texts[h] = text
    found = sorted(agents)
    plans, links, speeds = _plans(store, found), _links(store, found), _speeds(store, found)
    out: dict[str, Rows] = {}
    for aid, r in agents.items():
        if r[3] not in texts:  # a row without its profile (never written so): as if not stored
            continue
        rec = AgentRecord(r[0], r[1], r[2], texts[r[3]], tuple(json.loads(r[4])), tuple(json.loads(r[5])),
                          json_format.Parse(r[6], pb.Constraints()), r[7], r[8], r[9], r[10])
        rec.hold_profile(texts[r[3]], r[3])  # the row's key: not hashed again
        out[aid] = (rec, plans.get(aid), links.get(aid, {}), speeds.get(aid))
    return out


def _plans(store: Store, ids: Sequence[str]) -> dict[str, PlanRecord]:
    """Per agent, the highest plan version it did not refuse (:meth:`Store.current_plan`)."""
    out: dict[str, PlanRecord] = {}
    for part in _chunks(ids):
        rows = store.backend.execute(
            "SELECT p.agent_id, p.plan, p.status FROM plans p JOIN (SELECT agent_id, MAX(version) AS v FROM plans "
            f"WHERE status != ? AND agent_id IN ({_marks(len(part))}) GROUP BY agent_id) m "
            "ON p.agent_id = m.agent_id AND p.version = m.v", (REFUSED, *part))
        for aid, blob, status in rows:
            out[aid] = PlanRecord(pb.Plan.FromString(bytes(blob)), status)
    return out


def _links(store: Store, ids: Sequence[str]) -> dict[str, dict[str, LinkRecord]]:
    out: dict[str, dict[str, LinkRecord]] = {}
    for part in _chunks(ids):
        for a, w, rtt, bw, t in store.backend.execute(
                "SELECT agent_id, worker_id, rtt_seconds, bandwidth_bytes_per_second, updated_unix FROM links "
                f"WHERE agent_id IN ({_marks(len(part))})", tuple(part)):
            out.setdefault(a, {})[w] = LinkRecord(rtt, bw, t)
    return out


def _speeds(store: Store, ids: Sequence[str]) -> dict[str, SpeedRecord]:
    out: dict[str, SpeedRecord] = {}
    for part in _chunks(ids):
        for a, f, n, t in store.backend.execute(
                "SELECT agent_id, slowdown, samples, updated_unix FROM device_speed "
                f"WHERE agent_id IN ({_marks(len(part))})", tuple(part)):
            out[a] = SpeedRecord(f, n, t)
    return out
