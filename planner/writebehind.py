"""Write-behind for the planner's frequent, replaceable writes: link estimates, heartbeats, device speeds.

Telemetry changes an agent's link estimate up to several times a second; writing each one was
two transactions per message. :class:`WriteBehind` keeps the latest value of each (agent, worker)
link, each agent's last-seen time and device slowdown in memory (a newer value replaces the one
waiting) and writes them in one transaction every ``store_flush_seconds`` (default 1 s), on a
thread of its own with its own connection, so a slow commit never stalls the event loop. The
same thread runs the replica's lease renewal (:mod:`planner.replicas`) right after the batch.

What a crash (SIGKILL, power loss of the planner's host) loses: at most the last interval of
these values (plus a batch whose commit was under way), none of which was acknowledged: a
``TelemetryAck`` is sent only after :meth:`WriteBehind.barrier` (a flush brought forward) has
committed the samples it counts. The agent's next telemetry message carries its current
estimate again. Plans and registrations are never buffered here: they are
written before the RPC that makes them is answered (:mod:`planner.store`); plans and plan statuses
on the store thread (:meth:`WriteBehind.write`), awaited. A clean shutdown
flushes (:meth:`WriteBehind.close`). A batch that fails (the database unreachable) is kept, under
any newer values, and tried again at the next interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from planner.store import Batch, LinkRecord, SpeedRecord, Store
from planner.store_sql import SqliteBackend
from runtime.contracts.errors import Unavailable

logger = logging.getLogger(__name__)


@dataclass
class FlushStats:
    """The last flush, for logs, tests and the benchmark."""

    flushes: int = 0  # batches written (one transaction each)
    rows: int = 0  # rows in the last batch
    seconds: float = 0.0  # its write, on the store thread
    failures: int = 0  # batches that could not be written (kept for the next interval)


def _settle(fut: asyncio.Future[None] | None, failed: bool) -> None:
    if fut is None or fut.done():
        return
    if failed:
        fut.set_exception(Unavailable("the planner could not store this telemetry now; send it again"))
    else:
        fut.set_result(None)


def _retrieved(fut: asyncio.Future[Any]) -> None:
    """Mark a submitted write's failure as seen: the RPC that awaits it raises it; one whose RPC
    ended first is only logged."""
    if not fut.cancelled() and fut.exception() is not None:
        logger.debug("planner store: a submitted write failed: %s", fut.exception())


def _then_after(then: Callable[[Store], Any] | None, committed: Callable[[], Any]) -> Callable[[Store], Any]:
    """``then``, first telling ``committed`` (the batch before it is written: it runs only when it was)."""
    def run(store: Store) -> Any:
        committed()
        return then(store) if then is not None else None
    return run


class StoreMetrics:
    """The store's Prometheus series (on the planner's registry; none when it has none)."""

    def __init__(self, registry: CollectorRegistry | None):
        r = registry or CollectorRegistry()
        self.flush_seconds = Histogram("edgesplit_planner_store_flush_seconds",
                                       "Write-behind flushes: the batch's transaction, on the store thread",
                                       buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
                                       registry=r)
        self.flush_rows = Gauge("edgesplit_planner_store_flush_rows", "Rows in the last write-behind flush", registry=r)
        self.flush_failures = Counter("edgesplit_planner_store_flush_failures_total",
                                      "Write-behind batches not written (kept for the next flush)", registry=r)
        self.takeovers = Counter("edgesplit_planner_agent_takeovers_total",
                                 "Agents this replica took over from another one (or from a lapsed lease)", registry=r)
        self.leases_lost = Counter("edgesplit_planner_leases_lost_total",
                                   "Agents another replica took from this one", registry=r)


class WriteBehind:
    """The buffer and its store thread (see the module docstring)."""

    def __init__(self, store: Store, registry: CollectorRegistry | None = None):
        self.store = store
        self.metrics = StoreMetrics(registry)  # the event loop's store (immediate writes); the thread opens its own connection
        self.pending = Batch()
        self.stats = FlushStats()
        self._executor: ThreadPoolExecutor | None = None  # made at the first flush, again after close()
        self._thread_store: Store | None = None
        # an in-memory SQLite database exists once per connection: no second one, write on the loop
        b = store.backend
        self._same_connection = isinstance(b, SqliteBackend) and b.path in ("", ":memory:")
        self._due: asyncio.Event | None = None  # set: flush now (a barrier waits)
        self._next: asyncio.Future[None] | None = None  # resolved when the next flush has committed

    # -- the buffer (event loop) -----------------------------------------------------------------

    def put_link(self, agent_id: str, worker_id: str, link: LinkRecord) -> None:
        self.pending.links[(agent_id, worker_id)] = link

    def touch(self, agent_id: str, last_seen: float) -> None:
        self.pending.seen[agent_id] = last_seen

    def put_speed(self, agent_id: str, speed: SpeedRecord) -> None:
        self.pending.speeds[agent_id] = speed

    def put_worker_speed(self, agent_id: str, worker_id: str, speed: SpeedRecord) -> None:
        self.pending.worker_speeds[(agent_id, worker_id)] = speed

    def forget(self, agent_id: str) -> None:
        """Drop what waits for ``agent_id`` (another replica took it over: its values win)."""
        p = self.pending
        for key in [k for k in p.links if k[0] == agent_id]:
            del p.links[key]
        p.seen.pop(agent_id, None)
        p.speeds.pop(agent_id, None)
        for key in [k for k in p.worker_speeds if k[0] == agent_id]:
            del p.worker_speeds[key]

    # -- flushing --------------------------------------------------------------------------------

    def _event(self) -> asyncio.Event:
        if self._due is None:
            self._due = asyncio.Event()
        return self._due

    async def wait_due(self, seconds: float) -> None:
        """Until the next flush is due: ``seconds`` from now, or sooner when a barrier waits."""
        due = self._event()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(due.wait(), seconds)
        due.clear()

    async def barrier(self) -> None:
        """Return once everything buffered before this call is committed (the next flush, brought
        forward); Unavailable if that flush fails."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        fut = self._next
        self._event().set()
        await asyncio.shield(fut)

    async def flush(self, then: Callable[[Store], Any] | None = None) -> Any:
        """Write what waits in one transaction (off the loop), then run ``then(store)`` on the same thread;
        returns what ``then`` returned (None without it)."""
        batch, self.pending = self.pending, Batch()
        fut, self._next = self._next, None
        failures = self.stats.failures
        loop = asyncio.get_running_loop()
        try:
            if self._same_connection:
                result = self._write(self.store, batch, _then_after(then, lambda: _settle(fut, failed=False)))
            else:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="planner-store")
                # the barrier's waiters (telemetry acks) go once the batch is committed, not after ``then``
                # (a replica's lease renewal: one row per agent it holds, every flush)
                committed = _then_after(then, lambda: loop.call_soon_threadsafe(_settle, fut, False))
                result = await loop.run_in_executor(self._executor, self._on_thread, batch, committed)
        except BaseException:
            _settle(fut, failed=True)
            raise
        _settle(fut, failed=self.stats.failures > failures)
        return result

    def _on_thread(self, batch: Batch, then: Callable[[Store], Any] | None) -> Any:
        return self._write(self._own_store(), batch, then)

    def _own_store(self) -> Store:
        if self._thread_store is None:
            self._thread_store = Store(self.store.backend.clone())
        return self._thread_store

    async def read(self, fn: Callable[[Store], Any]) -> Any:
        """``fn(store)`` on the store thread (a long read that must not hold the event loop)."""
        if self._same_connection:
            return fn(self.store)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="planner-store")
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(self._own_store()))

    def submit(self, fn: Callable[[Store], Any]) -> asyncio.Future[Any]:
        """Queue ``fn(store)`` on the store thread now, in call order with every other store job (a
        plan written later commits after it), and return its future without waiting: a registration
        is held in memory at once and its RPC awaits the write before it answers. On the event loop,
        a write waited there for SQLite's lock while a flush committed (stalls of 0.4-0.5 s during
        a 10,000-agent registration ramp)."""
        loop = asyncio.get_running_loop()
        if self._same_connection:
            fut: asyncio.Future[Any] = loop.create_future()
            try:
                fut.set_result(fn(self.store))
            except Exception as e:  # the awaiting RPC raises it
                fut.set_exception(e)
            return fut
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="planner-store")
        done = asyncio.wrap_future(self._executor.submit(lambda: fn(self._own_store())), loop=loop)
        done.add_done_callback(_retrieved)
        return done

    async def write(self, fn: Callable[[Store], Any]) -> Any:
        """``fn(store)`` on the store thread (after a flush under way): an immediate write, a plan or a
        plan status, committed when this returns, without holding the event loop for the commit."""
        return await self.read(fn)

    def _write(self, store: Store, batch: Batch, then: Callable[[Store], Any] | None) -> Any:
        if batch:
            start = time.perf_counter()
            try:
                store.write_batch(batch)
            except Exception as e:
                self.stats.failures += 1
                self.metrics.flush_failures.inc()
                self._keep(batch)
                logger.warning("planner store: %d buffered rows not written (%s); retrying in the next interval",
                               len(batch), e)
                return None
            self.stats.flushes += 1
            self.stats.rows, self.stats.seconds = len(batch), time.perf_counter() - start
            self.metrics.flush_seconds.observe(self.stats.seconds)
            self.metrics.flush_rows.set(len(batch))
            logger.debug("planner store: %d rows in %.1f ms", len(batch), self.stats.seconds * 1e3)
        return then(store) if then is not None else None

    def _keep(self, batch: Batch) -> None:
        """Put a failed batch back under the values that arrived meanwhile (dict updates are atomic
        enough here: the loop only sets keys)."""
        for key, lk in batch.links.items():
            self.pending.links.setdefault(key, lk)
        for aid, t in batch.seen.items():
            self.pending.seen.setdefault(aid, t)
        for aid, s in batch.speeds.items():
            self.pending.speeds.setdefault(aid, s)
        for key, s in batch.worker_speeds.items():
            self.pending.worker_speeds.setdefault(key, s)

    async def close(self, then: Callable[[Store], Any] | None = None) -> None:
        """Flush what waits (clean shutdown), run ``then`` after it, and close the thread's connection."""
        try:
            await self.flush(then)
        finally:
            thread_store, self._thread_store = self._thread_store, None
            executor, self._executor = self._executor, None
            if executor is not None:
                if thread_store is not None:
                    await asyncio.get_running_loop().run_in_executor(executor, thread_store.close)
                executor.shutdown(wait=True)
