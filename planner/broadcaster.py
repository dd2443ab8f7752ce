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
from runtime.contracts.errors import Overloaded
from runtime.daemon.streams import StreamSlots
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

# WatchPlan streams open at once for one agent id (an agent process needs one; a reconnect may briefly
# hold two). A newer one beyond this ends the oldest (RESOURCE_EXHAUSTED): a stream is a gRPC call, a
# task and a subscription here, and one agent must not grow them without bound. Counted by the daemon
# scaffold's StreamSlots (runtime.daemon.streams) under the agent id watched (an agent must be registered
# to watch, so their total is bounded by --max-agents x this).
MAX_WATCHERS_PER_AGENT = 4


@dataclass(eq=False)
class Watcher:
    event: asyncio.Event = field(default_factory=asyncio.Event)  # set when there is news
    latest: pb.Plan | None = None  # the newest plan for the agent
    closed: bool = False  # the planner is closing: end the stream
    evicted: str = ""  # why a newer stream of the same agent replaced it (MAX_WATCHERS_PER_AGENT); "" while not

    def evict(self, message: str) -> None:
        self.closed, self.evicted = True, message
        self.event.set()


class Broadcaster:
    """The WatchPlan subscriptions, per agent id."""

    def __init__(self, metrics: PlannerMetrics) -> None:
        self.metrics = metrics
        self._watchers: dict[str, dict[Watcher, None]] = {}  # agent id -> its streams, oldest first
        self.slots = StreamSlots("WatchPlan", MAX_WATCHERS_PER_AGENT, None, where="the planner",
                                 per_caller_hint="; run one agent process per agent_id",
                                 on_shed=metrics.on_stream_shed("WatchPlan"))

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
        with self.slots.hold_key(agent_id, lambda message: self._evict(agent_id, w, message), f"agent {agent_id!r}"):
            self._watchers.setdefault(agent_id, {})[w] = None
            self.metrics.watchers.inc()
            sent = known_version
            try:
                while True:
                    await w.event.wait()
                    w.event.clear()
                    if w.evicted:
                        raise Overloaded(w.evicted)
                    if w.closed:
                        return
                    plan = w.latest
                    if plan is not None and plan.version > sent:
                        sent = plan.version
                        yield plan
            finally:
                self._drop(agent_id, w)
                self.metrics.watchers.dec()

    def _evict(self, agent_id: str, w: Watcher, message: str) -> None:
        """A newer stream of ``agent_id`` takes ``w``'s place (StreamSlots): no more plans, its stream ends."""
        self._drop(agent_id, w)
        w.evict(message)

    def _drop(self, agent_id: str, w: Watcher) -> None:
        held = self._watchers.get(agent_id)
        if held is not None:
            held.pop(w, None)
            if not held:
                del self._watchers[agent_id]

    def close(self) -> None:
        """End every stream."""
        for subs in self._watchers.values():
            for w in subs:
                w.closed = True
                w.event.set()
