"""Open client streams per caller at the planner (ReportTelemetry): a gRPC call and a handler task each.

A stream is opened before it says which agent it reports for (its first message may come much later:
an agent sends telemetry when its link moves, or at its heartbeat), so it is counted by the caller
that opened it: an authenticated agent (certificate or token) is one agent, and holds at most
``per_caller`` streams: a newer one ends its oldest RESOURCE_EXHAUSTED (a reconnecting agent's
half-open stream is the usual oldest, so the agent is never locked out). Other callers (operators,
anonymous callers of a loopback planner: a fleet simulator holds thousands of agents under one lease)
count only towards ``total``; beyond it a new stream is refused at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import grpc

from runtime.contracts.errors import Overloaded
from runtime.daemon.auth import Identity
from runtime.daemon.interceptors import end_call
from runtime.wire.security import AGENT

TELEMETRY_STREAMS_PER_AGENT = 4  # an authenticated agent's open ReportTelemetry streams
TELEMETRY_STREAMS_PER_AGENT_SLOT = 2  # ... and beyond those of every agent: total = max_agents x this + this many
TELEMETRY_STREAMS_SPARE = 1024  # ... (operators, tools, a loopback fleet)


class StreamSlots:
    """Streams open per caller (see the module docstring)."""

    def __init__(self, what: str, per_caller: int, total: int) -> None:
        self.what, self.per_caller, self.total = what, per_caller, total
        self.open = 0  # streams open now, every caller
        self.ended = 0  # streams ended for a newer one of the same caller
        self._by_caller: dict[str, dict[asyncio.Task[Any], Any]] = {}

    @staticmethod
    def caller(identity: Identity) -> str | None:
        """The key an authenticated agent's streams are counted under; None for other callers."""
        return f"{identity.via}:{identity.role}/{identity.id}" if identity.authenticated and identity.role == AGENT else None

    @contextlib.contextmanager
    def hold(self, identity: Identity, context: Any) -> Iterator[None]:
        """One stream of ``identity`` open while the block runs."""
        if self.open >= self.total:
            raise Overloaded(f"the planner has {self.open} {self.what} streams open, its limit; open one again later")
        key = self.caller(identity)
        task = asyncio.current_task()
        if key is None or task is None:  # counted in the total only
            self.open += 1
            try:
                yield
            finally:
                self.open -= 1
            return
        mine = self._by_caller.setdefault(key, {})
        while len(mine) >= self.per_caller:  # the caller's oldest ends
            old_task, old_context = next(iter(mine.items()))
            del mine[old_task]
            self.ended += 1
            end_call(old_context, old_task, grpc.StatusCode.RESOURCE_EXHAUSTED,
                     f"{identity} opened another {self.what} stream: at most {self.per_caller} {self.what} streams "
                     "are kept per agent, the oldest ends; run one agent process per identity")
        mine[task] = context
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1
            mine.pop(task, None)
            if not mine and self._by_caller.get(key) is mine:
                del self._by_caller[key]


def telemetry_slots(max_agents: int) -> StreamSlots:
    """The planner's ReportTelemetry streams: TELEMETRY_STREAMS_PER_AGENT per authenticated agent, and in all
    ``max_agents`` x TELEMETRY_STREAMS_PER_AGENT_SLOT + TELEMETRY_STREAMS_SPARE."""
    return StreamSlots("telemetry", TELEMETRY_STREAMS_PER_AGENT,
                       max_agents * TELEMETRY_STREAMS_PER_AGENT_SLOT + TELEMETRY_STREAMS_SPARE)
