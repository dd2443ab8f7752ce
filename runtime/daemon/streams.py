"""Long-lived streams a daemon keeps open, per caller and in all (planner ReportTelemetry and WatchPlan, the
worker's InferStream): each is a gRPC call, a handler task and the daemon's own state for it.

A stream is counted under a key, its caller: the authenticated identity that opened it (:func:`caller_key`;
the planner's WatchPlan counts by the agent id it watches). A key holds at most ``per_caller`` streams: a
newer one ends its oldest RESOURCE_EXHAUSTED instead of being refused, so a caller that reconnects while its
old connection is still half-open (the usual oldest) is never locked out. A stream with no key (a caller
whose role is not capped, or any caller of a server without authentication, which binds loopback only)
counts only towards ``total``: beyond it a new stream is refused at once, RESOURCE_EXHAUSTED, whoever asks.
``on_shed`` is told ``"oldest_ended"`` or ``"total_refused"`` (a metric's label).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Iterator
from typing import Any

import grpc

from runtime.contracts.errors import Overloaded
from runtime.daemon.auth import Identity
from runtime.daemon.interceptors import end_call

OLDEST_ENDED = "oldest_ended"  # a caller's newer stream ended its oldest
TOTAL_REFUSED = "total_refused"  # the daemon held ``total`` streams: a new one was refused
SHED_REASONS = (OLDEST_ENDED, TOTAL_REFUSED)

# Ends one held stream; given the message that says why (the status is RESOURCE_EXHAUSTED).
Ender = Callable[[str], None]


def caller_key(identity: Identity, roles: Collection[str]) -> str | None:
    """The key an authenticated caller of one of ``roles`` is counted under ("cert:agent/a1"); None for any
    other caller (unauthenticated, or a role counted in the total only)."""
    if identity.authenticated and identity.role in roles:
        return f"{identity.via}:{identity.role}/{identity.id}"
    return None


def ender(context: Any, task: asyncio.Task[Any] | None) -> Ender:
    """Ends a running call from outside its handler (RESOURCE_EXHAUSTED, runtime.daemon.interceptors.end_call)."""
    return lambda message: end_call(context, task, grpc.StatusCode.RESOURCE_EXHAUSTED, message)


class StreamSlots:
    """Streams open per caller and in all (see the module docstring).

    ``what`` names the stream in messages ("InferStream"); ``roles``: the authenticated roles capped per
    caller by :meth:`hold` (others count in the total only); ``where`` names the daemon ("this worker");
    ``per_caller_hint`` / ``total_hint`` say which setting holds the limit and what to do.
    """

    def __init__(self, what: str, per_caller: int, total: int | None, *, roles: Collection[str] = (),
                 where: str = "this daemon", per_caller_hint: str = "", total_hint: str = "open one again later",
                 on_shed: Callable[[str], None] | None = None) -> None:
        if per_caller < 1 or (total is not None and total < 1):
            raise ValueError(f"{what} stream limits must be >= 1, got per caller {per_caller}, total {total}")
        self.what, self.per_caller, self.total, self.where = what, per_caller, total, where
        self.roles = frozenset(roles)
        self.per_caller_hint, self.total_hint, self.on_shed = per_caller_hint, total_hint, on_shed
        self.open = 0  # streams open now, every caller
        self.ended = 0  # streams ended for a newer one of the same caller
        self.refused = 0  # streams refused because ``total`` were open
        self._by_key: dict[str, dict[object, Ender]] = {}  # key -> its streams (token -> ender), oldest first

    def held(self, key: str) -> int:
        """Streams open under ``key`` now."""
        return len(self._by_key.get(key, ()))

    @contextlib.contextmanager
    def hold(self, identity: Identity, context: Any) -> Iterator[None]:
        """One stream of the RPC running in this task open while the block runs: counted under
        :func:`caller_key` (``roles``), ended through its ``context`` if a newer one needs its place."""
        with self.hold_key(caller_key(identity, self.roles), ender(context, asyncio.current_task()), identity):
            yield

    @contextlib.contextmanager
    def hold_key(self, key: str | None, end: Ender, who: object = "") -> Iterator[None]:
        """One stream under ``key`` (None: the total only) open while the block runs; ``end`` ends it if a
        newer stream of the same key needs its place; ``who`` names the caller in that message."""
        if self.total is not None and self.open >= self.total:
            self.refused += 1
            self._shed(TOTAL_REFUSED)
            raise Overloaded(f"{self.where} has {self.open} {self.what} streams open, its limit; {self.total_hint}")
        mine = self._by_key.setdefault(key, {}) if key is not None else None
        token = object()
        if mine is not None:
            while len(mine) >= self.per_caller:  # the caller's oldest ends
                old = next(iter(mine))
                old_end = mine.pop(old)
                self.ended += 1
                self._shed(OLDEST_ENDED)
                old_end(f"{who or key} opened another {self.what} stream: at most {self.per_caller} {self.what} "
                        f"streams are kept per caller, the oldest ends{self.per_caller_hint}")
            mine[token] = end
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1
            if key is not None and mine is not None:
                mine.pop(token, None)
                if not mine and self._by_key.get(key) is mine:
                    del self._by_key[key]

    def _shed(self, reason: str) -> None:
        if self.on_shed is not None:
            self.on_shed(reason)
