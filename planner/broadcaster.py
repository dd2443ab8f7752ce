"""Pushing plans to the agents that watch them: the WatchPlan long-lived streams.

Each WatchPlan call subscribes a :class:`Watcher` under its agent id; :meth:`Broadcaster.publish`
hands every watcher of that agent the new plan and wakes it, and the stream yields the plan if
it is newer than the last one it sent (a watcher woken twice before it runs sends the latest
once). Subscriptions are per agent id, so a re-registration of the same board keeps its streams.
:meth:`Broadcaster.close` ends every stream (agents reconnect to the next planner).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from planner.metrics import PlannerMetrics
from runtime.proto.edgesplit.v1 import planner_pb2 as pb


@dataclass(eq=False)
class Watcher:
    event: asyncio.Event = field(default_factory=asyncio.Event)  # set when there is news
    latest: pb.Plan | None = None  # the newest plan for the agent
    closed: bool = False  # the planner is closing: end the stream


class Broadcaster:
    """The WatchPlan subscriptions, per agent id."""

    def __init__(self, metrics: PlannerMetrics) -> None:
        self.metrics = metrics
        self._watchers: dict[str, set[Watcher]] = {}

    def watchers(self, agent_id: str) -> set[Watcher]:
        """The streams open for ``agent_id`` now (a copy)."""
        return set(self._watchers.get(agent_id, ()))

    def watching(self, agent_id: str) -> bool:
        """Whether a stream is open for ``agent_id`` (O(1), no copy)."""
        return agent_id in self._watchers

    def publish(self, agent_id: str, plan: pb.Plan) -> None:
        """Hand ``plan`` to every stream of ``agent_id`` and wake them."""
        for w in self._watchers.get(agent_id, ()):
            w.latest = plan
            w.event.set()

    async def watch(self, agent_id: str, current: pb.Plan | None, known_version: int) -> AsyncGenerator[pb.Plan, None]:
        """The plans of ``agent_id`` newer than ``known_version``, from ``current`` on, until :meth:`close`."""
        w = Watcher(latest=current)
        if current is not None:
            w.event.set()
        self._watchers.setdefault(agent_id, set()).add(w)
        self.metrics.watchers.inc()
        sent = known_version
        try:
            while True:
                await w.event.wait()
                w.event.clear()
                if w.closed:
                    return
                plan = w.latest
                if plan is not None and plan.version > sent:
                    sent = plan.version
                    yield plan
        finally:
            subs = self._watchers.get(agent_id)
            if subs is not None:
                subs.discard(w)
                if not subs:
                    del self._watchers[agent_id]
            self.metrics.watchers.dec()

    def close(self) -> None:
        """End every stream."""
        for subs in self._watchers.values():
            for w in subs:
                w.closed = True
                w.event.set()
