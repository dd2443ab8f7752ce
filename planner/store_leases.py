"""Which planner replica holds which agent: leases kept alive by one heartbeat row per replica.

Tables (created where missing, :mod:`planner.store`):

* ``leases (agent_id, replica, expires_unix)``: the agent's holder, one row per agent, so one replica
  at a time. ``expires_unix`` is set when the replica takes the agent (now + the lease seconds) and
  not renewed after that.
* ``replicas (id, expires_unix)``: each replica's heartbeat, renewed at every write-behind flush
  (:meth:`planner.replicas.Replica.renewal`): one row, whatever the number of agents it holds.
  Renewing every lease row of a replica at every flush cost PostgreSQL 26 ms of CPU per second per
  10,000 agents (planner/results/replicas.md); the heartbeat costs about 0.5 ms.
* ``handovers (replica, agent_id)``: an agent taken from a *live* replica (by the agent's own
  registration elsewhere), until that replica reads it at its next heartbeat and drops the agent.

A lease has time left while its row's own expiry or its holder's heartbeat is in the future
(:func:`acquire`), so a dead replica's leases all lapse together, ``lease_seconds`` after its last
heartbeat. A replica learns which of its agents another one took:

* taken from it while it was live: from ``handovers`` at its next heartbeat;
* taken after its heartbeat lapsed (a replica stalled past ``lease_seconds``, cut off from the
  database): such a take is not logged, but the replica's next heartbeat finds its own row lapsed
  (or gone) and reads every lease it still holds instead (:func:`heartbeat`).

The two orders are kept apart by row locks: a take reads the holder's heartbeat ``FOR SHARE`` in
the take's transaction, and the heartbeat locks its row ``FOR UPDATE`` before it reads it, so a
heartbeat that finds its row lapsed reads the leases after every take that saw it lapsed.
A plan is still written only while its agent's lease row names the replica
(:meth:`planner.store.Store.issue_plan`): the fence does not depend on any of this.

Every replica of one store must keep leases this way: a planner from before the heartbeat renews its
lease rows (they stay alive by their own expiry), but its takes write no handover, so a newer replica
would not learn of them until its next lapse. Upgrade the replicas together, as for a schema migration.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from planner.store_sql import Backend

CHUNK = 500  # ids per statement (SQLite allows 32,766 parameters, PostgreSQL 65,535; an upsert row takes 3)
FORGET_SECONDS = 3600.0  # a replica whose heartbeat lapsed this long ago is forgotten (its row and handovers)

SCHEMA = """
CREATE TABLE IF NOT EXISTS replicas (id TEXT PRIMARY KEY, expires_unix {real} NOT NULL);
CREATE TABLE IF NOT EXISTS handovers (replica TEXT NOT NULL, agent_id TEXT NOT NULL, PRIMARY KEY (replica, agent_id));
"""


def chunks(ids: Sequence[str], size: int = CHUNK) -> Iterable[Sequence[str]]:
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


def marks(n: int) -> str:
    return ",".join("?" * n)


def beats(b: Backend, replicas: Iterable[str]) -> dict[str, float]:
    """Seconds each replica's heartbeat has left (negative: lapsed; absent: no heartbeat row), its row
    locked against a heartbeat until the caller's transaction ends (PostgreSQL)."""
    ids = sorted(set(replicas))
    if not ids:
        return {}
    return {r: float(left) for r, left in b.execute(
        f"SELECT id, expires_unix - {b.now_sql} FROM replicas WHERE id IN ({marks(len(ids))}) ORDER BY id{b.share_sql}",
        tuple(ids))}


def acquire(b: Backend, asks: dict[str, bool], replica: str, seconds: float,
            size: int = CHUNK) -> dict[str, tuple[str, float]]:
    """Per agent of ``asks`` (agent id -> take: a registration), in one transaction: its lease is held by
    ``replica`` if it was free, lapsed, its own or taken. Returns agent id -> (the holder before, seconds
    its lease had left: the later of its row's expiry and the holder's heartbeat). A lease taken from
    another live replica is logged in ``handovers`` for it; ``replica``'s own handovers of these agents
    are cleared (it holds them again)."""
    ids = sorted(asks)
    before: dict[str, tuple[str, float]] = {}
    with b.transaction():
        for part in chunks(ids, size):
            for aid, holder, left in b.execute(
                    f"SELECT agent_id, replica, expires_unix - {b.now_sql} FROM leases WHERE agent_id IN "
                    f"({marks(len(part))}) ORDER BY agent_id{b.lock_sql}", tuple(part)):
                before[aid] = (holder, float(left))
        hb = beats(b, {h for h, _ in before.values() if h != replica})
        before = {a: (h, max(left, hb.get(h, left))) for a, (h, left) in before.items()}
        grab = [a for a in ids if _free(before.get(a, ("", 0.0)), replica, asks[a])]
        for part in chunks(grab, size):
            values = ",".join([f"(?, ?, {b.now_sql} + ?)"] * len(part))
            b.execute(f"INSERT INTO leases (agent_id, replica, expires_unix) VALUES {values} ON CONFLICT (agent_id) "
                      "DO UPDATE SET replica=excluded.replica, expires_unix=excluded.expires_unix",
                      tuple(x for a in part for x in (a, replica, seconds)))
            b.execute(f"DELETE FROM handovers WHERE replica = ? AND agent_id IN ({marks(len(part))})", (replica, *part))
        taken = sorted((before[a][0], a) for a in grab if a in before and before[a][0] not in ("", replica)
                       and before[a][1] > 0)
        if taken:
            b.executemany("INSERT INTO handovers (replica, agent_id) VALUES (?, ?) ON CONFLICT (replica, agent_id) "
                          "DO NOTHING", taken)
    return {a: before.get(a, ("", 0.0)) for a in ids}


def _free(lease: tuple[str, float], replica: str, take: bool) -> bool:
    holder, left = lease
    return take or not holder or holder == replica or left <= 0


def heartbeat(b: Backend, replica: str, seconds: float) -> tuple[set[str], set[str] | None]:
    """Renew ``replica``'s heartbeat for ``seconds``. Returns (the agents taken from it since its last
    heartbeat, every agent whose lease it holds or None): the second only when its heartbeat had lapsed
    or was missing, when takes were not logged (see the module docstring)."""
    with b.transaction():
        row = b.execute(f"SELECT expires_unix - {b.now_sql} FROM replicas WHERE id = ?{b.lock_sql}",
                        (replica,)).fetchone()
        b.execute(f"INSERT INTO replicas (id, expires_unix) VALUES (?, {b.now_sql} + ?) ON CONFLICT (id) "
                  "DO UPDATE SET expires_unix=excluded.expires_unix", (replica, seconds))
        taken = {r[0] for r in b.execute("DELETE FROM handovers WHERE replica = ? RETURNING agent_id", (replica,))}
        held = None
        if row is None or float(row[0]) <= 0:
            held = {r[0] for r in b.execute("SELECT agent_id FROM leases WHERE replica = ?", (replica,))}
    return taken, held


def forget_dead(b: Backend) -> int:
    """Remove the heartbeat rows and handovers of replicas whose heartbeat lapsed ``FORGET_SECONDS`` ago
    (a replica that comes back after that finds its row missing and reads its leases again). Returns
    the replicas forgotten."""
    with b.transaction():
        gone = [r[0] for r in b.execute(f"DELETE FROM replicas WHERE expires_unix < {b.now_sql} - ? RETURNING id",
                                        (FORGET_SECONDS,))]
        for part in chunks(gone):
            b.execute(f"DELETE FROM handovers WHERE replica IN ({marks(len(part))})", tuple(part))
    return len(gone)


def start(b: Backend, replica: str, seconds: float) -> None:
    """A replica starting under ``replica`` (a new id per process): it holds nothing yet; its heartbeat begins."""
    with b.transaction():
        b.execute("DELETE FROM leases WHERE replica = ?", (replica,))
        b.execute("DELETE FROM handovers WHERE replica = ?", (replica,))
        b.execute(f"INSERT INTO replicas (id, expires_unix) VALUES (?, {b.now_sql} + ?) ON CONFLICT (id) "
                  "DO UPDATE SET expires_unix=excluded.expires_unix", (replica, seconds))


def release(b: Backend, replica: str, agent_ids: list[str] | None = None) -> None:
    """Give up ``replica``'s leases (all: a clean shutdown, its heartbeat row too; or those of
    ``agent_ids``): another replica may take them at once."""
    with b.transaction():
        if agent_ids is None:
            b.execute("DELETE FROM leases WHERE replica = ?", (replica,))
            b.execute("DELETE FROM handovers WHERE replica = ?", (replica,))
            b.execute("DELETE FROM replicas WHERE id = ?", (replica,))
        else:
            b.executemany("DELETE FROM leases WHERE replica = ? AND agent_id = ?", [(replica, a) for a in agent_ids])


def leases(b: Backend) -> dict[str, tuple[str, float]]:
    """agent id -> (replica, seconds left: the later of its row's expiry and the holder's heartbeat;
    negative: lapsed)."""
    rows = list(b.execute(f"SELECT agent_id, replica, expires_unix - {b.now_sql} FROM leases"))
    hb = {r: float(left) for r, left in b.execute(f"SELECT id, expires_unix - {b.now_sql} FROM replicas")}
    return {a: (r, max(float(left), hb.get(r, float(left)))) for a, r, left in rows}
