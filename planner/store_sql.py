"""The two database engines the planner's store runs on, behind one small interface.

:class:`Backend` is what :class:`planner.store.Store` speaks: ``execute`` (rows out),
``executemany``, ``transaction`` (one atomic block), ``clone`` (a second connection, for the
write-behind thread) and ``close``. Statements are written once, with ``?`` placeholders and SQL
both engines accept (``INSERT ... ON CONFLICT ... DO UPDATE``, ``RETURNING``); the PostgreSQL
backend turns ``?`` into ``%s``. The schema's few engine-specific words come from
:attr:`Backend.types` (``{real}``, ``{blob}``), and :attr:`Backend.now_sql` is the database's own
clock, so leases between replicas on different machines compare against one clock.

* :class:`SqliteBackend`: the embedded default, a file (stdlib ``sqlite3``, WAL). One process.
* :class:`PostgresBackend`: ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DB`` (psycopg 3). Shared by
  several planner replicas (:attr:`Backend.shared`: leases are on).

:func:`open_backend` picks one from ``--store``: ``postgresql://...`` (or ``postgres://``),
``sqlite:///PATH`` or a plain path.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import re
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from runtime.contracts.errors import EdgesplitError, Unavailable

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 10  # a PostgreSQL server that does not answer the connection within this is unreachable
SQLITE_BUSY_SECONDS = 5.0
BULK_ROWS = 64  # from this many rows PostgreSQL merges through COPY (below: executemany)  # a second connection (the write-behind thread) waits this long for the other's write


class StoreError(EdgesplitError):
    """The database cannot be used (newer schema, not a planner database, unreadable, bad URL)."""


class Backend(abc.ABC):
    """One connection to the planner's database (see the module docstring)."""

    name = ""
    shared = False  # several planner processes may use it at once (leases are on)
    types: ClassVar[dict[str, str]] = {}  # schema placeholders -> this engine's type names
    now_sql = ""  # an SQL expression: the database's clock, seconds since the epoch
    lock_sql = ""  # appended to a SELECT that reads a row it will update in the same transaction
    share_sql = ""  # appended to a SELECT whose rows must not change until the transaction ends
    connection: Any = None  # the driver's connection (tests look inside the SQLite one)

    @abc.abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; the returned cursor gives ``fetchone``/``fetchall``/iteration/``rowcount``."""
        ...

    @abc.abstractmethod
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        ...

    @abc.abstractmethod
    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        """One atomic block: committed when it ends, rolled back when it raises."""
        ...

    def merge_many(self, merge: Merge, rows: Sequence[Sequence[Any]]) -> None:
        """Many rows through ``merge`` (an upsert): ``executemany`` of its statement here; PostgreSQL
        copies them into a temporary table and merges it in one statement (4x faster at 10,000 rows,
        and most of the work is the server's, not Python's under the GIL)."""
        self.executemany(merge.statement, merge.rows(rows))

    @abc.abstractmethod
    def clone(self) -> Backend:
        """A second connection to the same database (for another thread)."""
        ...

    @abc.abstractmethod
    def close(self) -> None:
        ...

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the database is, for logs (no password)."""
        ...


@dataclass(frozen=True)
class Merge:
    """An upsert of many rows: ``statement`` (``?`` per column) for any engine; for a bulk path, the
    temporary table's columns (``name TYPE, ...``) and the statement that merges it (``{src}``: its name)."""

    name: str  # the temporary table's name
    statement: str
    columns: str
    merge: str
    params: tuple[int, ...] = ()  # the statement's parameters as indices into a row (default: the row as it is)

    def rows(self, rows: Sequence[Sequence[Any]]) -> Sequence[Sequence[Any]]:
        return [tuple(r[i] for i in self.params) for r in rows] if self.params else rows


class SqliteBackend(Backend):
    name = "sqlite"
    types: ClassVar[dict[str, str]] = {"real": "REAL", "blob": "BLOB"}
    now_sql = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, path: str):
        self.path = path
        try:
            self.connection = sqlite3.connect(path, isolation_level=None, timeout=SQLITE_BUSY_SECONDS)
            self.connection.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a committed transaction survives a killed process (it is in the WAL file);
            # after a power loss the last ones before a checkpoint may be rolled back, never corrupted
            self.connection.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot use {path} as the planner database: {e}") from None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.connection.execute(sql, params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.connection.executemany(sql, rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        self.connection.execute("BEGIN IMMEDIATE")  # the write lock now: no upgrade deadlock between connections
        try:
            yield self
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    def clone(self) -> SqliteBackend:
        # the clone is used from one other thread only, never at the same time as this one's owner
        return SqliteBackend(self.path)

    def close(self) -> None:
        self.connection.close()

    def describe(self) -> str:
        return self.path


class PostgresBackend(Backend):
    name = "postgresql"
    shared = True
    types: ClassVar[dict[str, str]] = {"real": "DOUBLE PRECISION", "blob": "BYTEA"}  # PostgreSQL's REAL is 4 bytes: not enough for a time
    now_sql = "EXTRACT(EPOCH FROM clock_timestamp())::DOUBLE PRECISION"
    lock_sql = " FOR UPDATE"
    share_sql = " FOR SHARE"

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError:  # pragma: no cover - a dependency; only a trimmed install lacks it
            raise StoreError("--store postgresql://... needs the psycopg package: pip install 'psycopg[binary]'") from None
        self._psycopg = psycopg
        self.url = url
        self._sql: dict[str, str] = {}
        self._depth = 0  # open transactions: a lost connection is retried only outside one
        self.connection = self._connect()

    def _connect(self) -> Any:
        try:
            return self._psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS,
                                         application_name="edgesplit-planner")
        except self._psycopg.OperationalError as e:
            raise Unavailable(f"planner store {self.describe()} unreachable: {_first_line(e)}") from None
        except self._psycopg.ProgrammingError as e:  # a malformed URL
            raise StoreError(f"--store {self.describe()}: {_first_line(e)}") from None

    def _q(self, sql: str) -> str:
        q = self._sql.get(sql)
        if q is None:
            q = self._sql[sql] = sql.replace("?", "%s")
        return q

    def _live(self) -> Any:
        """The connection, opened again if the server closed it (a restart, a failover)."""
        if self.connection.closed:
            logger.warning("planner store %s: connection lost, reconnecting", self.describe())
            self.connection = self._connect()
        return self.connection

    def _retrying(self, run: Any) -> Any:
        """``run(connection)``; a connection the server closed (a restart, a failover, an idle
        timeout) is opened again and the statement run once more, outside a transaction only."""
        for attempt in (0, 1):
            try:
                return run(self._live())
            except self._psycopg.OperationalError as e:
                if attempt or self._depth or not self.connection.closed:
                    raise Unavailable(f"planner store {self.describe()}: {_first_line(e)}") from None
        return None  # pragma: no cover - the loop returns or raises

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        q = self._q(sql)
        return self._retrying(lambda c: c.execute(q, params))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        q = self._q(sql)

        def run(c: Any) -> None:
            with c.cursor() as cur:
                cur.executemany(q, rows)

        self._retrying(run)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        def begin(c: Any) -> Any:
            tx = c.transaction()
            tx.__enter__()  # BEGIN: retried once on a connection the server closed
            return tx

        tx = self._retrying(begin)
        self._depth += 1
        try:
            yield self
        except BaseException as exc:
            self._depth -= 1
            with contextlib.suppress(self._psycopg.OperationalError):  # the rollback of a lost connection
                tx.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._depth -= 1
        try:
            tx.__exit__(None, None, None)  # COMMIT
        except self._psycopg.OperationalError as e:
            raise Unavailable(f"planner store {self.describe()}: {_first_line(e)}") from None

    def merge_many(self, merge: Merge, rows: Sequence[Sequence[Any]]) -> None:
        if len(rows) < BULK_ROWS:
            self.executemany(merge.statement, merge.rows(rows))
            return
        c = self._live()
        try:
            c.execute(f"CREATE TEMP TABLE IF NOT EXISTS {merge.name} ({merge.columns}) ON COMMIT DELETE ROWS")
            with c.cursor() as cur, cur.copy(f"COPY {merge.name} FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            c.execute(merge.merge.format(src=merge.name))
        except self._psycopg.OperationalError as e:
            raise Unavailable(f"planner store {self.describe()}: {_first_line(e)}") from None

    def clone(self) -> PostgresBackend:
        return PostgresBackend(self.url)

    def close(self) -> None:
        self.connection.close()

    def describe(self) -> str:
        return redact(self.url)


def redact(url: str) -> str:
    """``url`` without its password (``postgresql://user:***@host/db``)."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def open_backend(store: str) -> Backend:
    """The backend ``store`` names: ``postgresql://...``, ``sqlite:///PATH`` or a plain path."""
    if store.startswith(("postgresql://", "postgres://")):
        return PostgresBackend(store)
    if store.startswith("sqlite://"):
        path = store[len("sqlite://"):]
        if not path.startswith("/"):
            raise StoreError(f"--store {store}: write sqlite:///RELATIVE/PATH or sqlite:////ABSOLUTE/PATH "
                             "(or just the path)")
        return SqliteBackend(path[1:] or ":memory:")
    if "://" in store:
        raise StoreError(f"--store {redact(store)}: unknown engine; use postgresql://USER@HOST:PORT/DB, "
                         "sqlite:///PATH or a plain file path")
    return SqliteBackend(store)
