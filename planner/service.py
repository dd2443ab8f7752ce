"""The Planner gRPC service, assembled: registry, re-planner, broadcaster and the RPC edge.

:class:`PlannerService` is what :mod:`planner.server` serves; it wires

* :class:`planner.state.PlannerState`: the workers and agents, their links, the store;
* :class:`planner.replanner.RePlanner`: telemetry and registrations -> decisions (hysteresis,
  device compute, refusals), the periodic pass, the search executor and its bounded cache;
* :class:`planner.broadcaster.Broadcaster`: the WatchPlan streams;
* :class:`planner.servicer.PlannerServicer`: the RPCs (check, delegate, reply), which it is.

Chained plans (device -> edge -> cloud): an edge worker registers its ``--next-tier`` allowlist
(``RegisterWorkerRequest.next_tiers``), and each decision also ranks every (edge, cloud) pair in
which the edge forwards to the cloud worker's registered address (:func:`planner.decide.chains`),
with the configured worker-to-worker link (``worker_link_*``: agents measure only their own link).
A chained plan carries its route (``Plan.end_split``, ``next_hops``); its key includes the route,
so hysteresis, refusals and versions treat it like any other plan.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from planner.broadcaster import Broadcaster
from planner.config import PlannerConfig
from planner.hysteresis import Hysteresis
from planner.metrics import PlannerMetrics
from planner.replanner import RePlanner
from planner.servicer import PlannerServicer
from planner.state import AgentState, PlannerState, WorkerState
from planner.store import Store

__all__ = ["AgentState", "PlannerService", "WorkerState"]


class PlannerService(PlannerServicer):
    def __init__(self, config: PlannerConfig, store: Store, metrics: PlannerMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        metrics = metrics or PlannerMetrics()
        state = PlannerState(config, store, metrics)
        broadcaster = Broadcaster(metrics)
        replanner = RePlanner(config, state, broadcaster, metrics, clock)
        super().__init__(state, replanner, broadcaster, metrics)
        self.config = config
        self.store = store
        self.clock = clock
        self._sweeper: asyncio.Task[None] | None = None
        state.load()

    @property
    def agents(self) -> dict[str, AgentState]:
        return self.state.agents

    @property
    def workers(self) -> dict[str, WorkerState]:
        return self.state.workers

    @property
    def hysteresis(self) -> Hysteresis:
        return self.replanner.hysteresis

    def start(self) -> None:
        """Start the periodic re-planning (on the running loop)."""
        self.replanner.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Drop lapsed worker registrations (planner.owners) a few times per TTL."""
        period = min(5.0, self.config.registration_ttl_seconds / 4)
        while True:
            await asyncio.sleep(period)
            self.expire()

    async def tick(self) -> None:
        """One periodic pass now."""
        await self.replanner.tick()

    async def close(self) -> None:
        """Stop re-planning and end every WatchPlan stream (agents reconnect to the next planner)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.replanner.stop()
        for st in self.state.agents.values():
            self.state.save_links(st)
        self.broadcaster.close()
        self.replanner.shutdown()
