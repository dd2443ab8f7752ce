"""Telemetry that needs a decision: coalesced per agent, bounded, shed when full (issue 15).

A telemetry report is checked and recorded where it arrives (the link estimate, in memory: cheap).
When it could change the agent's plan (:meth:`planner.replanner.RePlanner.telemetry`), the agent is
queued here for a decision. The queue holds each agent once: a newer report for an agent already
queued (or being decided) is coalesced into that decision (the latest estimate wins, the decision
reads it; an agent whose decision is running is decided once more after it). A few drain tasks
take agents in arrival order and decide them, yielding to the event loop between decisions, so
health checks and plan pushes are never stuck behind a burst of telemetry. While registrations wait
their turn (a replica's agents re-attaching here: each registration decides its agent), a queued
decision waits for them, at most ``YIELD_SECONDS`` from its first report.

Overload is shed, not queued: with ``telemetry_max_pending`` agents queued, a report from an agent
not queued is refused at once (RESOURCE_EXHAUSTED, trailing metadata ``retry-after-ms``: how long
the queue needs to drain at the measured decision rate), and a report sent (``sent_unix``) longer
than ``telemetry_max_age_seconds`` ago is dropped unread: a planner never acts on a minute-old
link. Both are counted (``edgesplit_planner_telemetry_shed_total{reason}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from planner.metrics import PlannerMetrics
from planner.state import AgentState
from runtime.contracts.errors import Overloaded

logger = logging.getLogger(__name__)

RETRY_AFTER_HEADER = "retry-after-ms"
MIN_RETRY_MS, MAX_RETRY_MS = 100, 30_000
DRAINERS = 4  # decisions in flight at once (searches share one executor thread; cache hits need none)
YIELD_SECONDS = 2.0  # while registrations wait their turn, a queued decision waits at most this long for them
YIELD_STEP_SECONDS = 0.05  # ... looking again this often


@dataclass(eq=False)
class Entry:
    st: AgentState
    since: float  # monotonic time the first report of this decision arrived
    running: bool = False
    again: bool = False  # a report came while it was being decided: decide once more


class Shed(Overloaded):
    """A report refused because the queue is full; ``retry_after_ms`` goes out as trailing metadata."""

    def __init__(self, message: str, retry_after_ms: int):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class Intake:
    """The agents waiting for a telemetry-caused decision (see the module docstring)."""

    def __init__(self, max_pending: int, max_age_seconds: float, metrics: PlannerMetrics,
                 decide: Callable[[AgentState], Awaitable[None]], clock: Callable[[], float] = time.monotonic) -> None:
        self.max_pending = max_pending
        self.max_age = max_age_seconds
        self.metrics = metrics
        self.decide = decide
        self.clock = clock
        self.entries: dict[str, Entry] = {}
        self._queue: deque[str] = deque()  # agent ids waiting (not running), oldest first
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._decision_seconds = 0.001  # smoothed seconds per decision (for retry-after)
        self.yield_to: Callable[[], bool] = lambda: False  # registrations are waiting their turn (set by the servicer)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, agent_id: str) -> bool:
        return agent_id in self.entries

    # -- what comes in -------------------------------------------------------------------------

    def stale(self, sent_unix: float, now: float | None = None) -> bool:
        """Whether a report sent at ``sent_unix`` is too old to act on (counted, then dropped)."""
        if not self.max_age or sent_unix <= 0:
            return False
        age = (time.time() if now is None else now) - sent_unix
        if age <= self.max_age:
            return False
        self.metrics.telemetry_shed.labels("stale").inc()
        logger.debug("telemetry sent %.1f s ago dropped (telemetry_max_age_seconds %.0f)", age, self.max_age)
        return True

    def retry_after_ms(self) -> int:
        """How long the queue needs to drain at the measured decision rate (bounded)."""
        ms = 1e3 * len(self.entries) * self._decision_seconds / DRAINERS
        return int(min(MAX_RETRY_MS, max(MIN_RETRY_MS, ms)))

    def admit(self, agent_id: str) -> None:
        """Room for a report from ``agent_id``: one already queued always has it (coalesced); else
        :class:`Shed` when ``max_pending`` agents are queued."""
        if agent_id in self.entries or len(self.entries) < self.max_pending:
            return
        self.metrics.telemetry_shed.labels("full").inc()
        ms = self.retry_after_ms()
        raise Shed(f"the planner has {len(self.entries)} agents' telemetry waiting for a decision (its "
                   f"telemetry_max_pending); report again in {ms} ms (trailing metadata {RETRY_AFTER_HEADER})", ms)

    def coalesce(self, st: AgentState, again: bool) -> None:
        """A report for an agent already queued: its queued decision reads the latest estimate; one
        being decided is decided once more after it when ``again`` (a decision is due: the re-planner's
        rate limit allows it), else the periodic pass takes the change."""
        e = self.entries[st.record.id]
        self.metrics.telemetry_coalesced.inc()
        e.st = st  # a re-registration meanwhile: decide the state that holds now
        e.again = e.again or (again and e.running)

    def offer(self, st: AgentState) -> None:
        """Queue a decision for ``st`` (coalesced into the one queued or running)."""
        aid = st.record.id
        if aid in self.entries:
            self.coalesce(st, again=True)
            return
        self.entries[aid] = Entry(st, self.clock())
        self._queue.append(aid)
        self.metrics.telemetry_pending.set(len(self.entries))
        self._ready.set()

    # -- draining ------------------------------------------------------------------------------

    def start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._drain(), name=f"planner-intake-{i}") for i in range(DRAINERS)]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    async def _drain(self) -> None:
        while True:
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            if self.yield_to() and self.clock() - self.entries[self._queue[0]].since < YIELD_SECONDS:
                await asyncio.sleep(YIELD_STEP_SECONDS)  # registrations waiting their turn go first (bounded)
                continue
            aid = self._queue.popleft()
            e = self.entries[aid]
            e.running = True
            t0 = time.perf_counter()
            try:
                await self.decide(e.st)
            except Exception:
                logger.exception("agent %s: decision on telemetry failed", aid)
            finally:
                e.running = False
            self._decision_seconds += 0.1 * (time.perf_counter() - t0 - self._decision_seconds)
            self.metrics.decision_latency_seconds.observe(self.clock() - e.since)
            if e.again:
                e.again, e.since = False, self.clock()
                self._queue.append(aid)
            else:
                del self.entries[aid]
            self.metrics.telemetry_pending.set(len(self.entries))
            await asyncio.sleep(0)  # one decision at a time: health checks and plan pushes go between


class Gate:
    """Registrations in progress at once (issue 15: health and plan pushes keep priority during a ramp).

    At most ``running`` registrations do their work (profile lookup, ranking, plan write) at once;
    up to ``waiting`` more wait their turn in arrival order; beyond that a registration is refused at
    once with RESOURCE_EXHAUSTED and ``retry-after-ms`` (how long the waiting ones need at the measured
    rate). A loop turn then holds the steps of a few registrations, not of every one in flight.
    """

    def __init__(self, running: int, waiting: int, what: str = "registrations", again: str = "register again") -> None:
        self.running, self.waiting = running, waiting
        self.what, self.again = what, again  # for the refusal's message
        self._slots = asyncio.Semaphore(running)
        self._queued = 0
        self._seconds = 0.005  # smoothed seconds one registration holds its slot

    @property
    def backlog(self) -> int:
        """Registrations waiting for a slot now."""
        return max(0, self._queued - self.running)

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if self._queued >= self.running + self.waiting:
            ms = int(min(MAX_RETRY_MS, max(MIN_RETRY_MS, 1e3 * self._queued * self._seconds / self.running)))
            raise Shed(f"the planner has {self._queued} {self.what} in progress or waiting; {self.again} in "
                       f"{ms} ms (trailing metadata {RETRY_AFTER_HEADER})", ms)
        self._queued += 1
        try:
            async with self._slots:
                t0 = time.monotonic()
                try:
                    yield
                finally:
                    self._seconds += 0.05 * (time.monotonic() - t0 - self._seconds)
        finally:
            self._queued -= 1
