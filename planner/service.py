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

The store: plans and registrations are written before the RPC is answered; link estimates,
heartbeats and device speeds go through :class:`planner.writebehind.WriteBehind`, flushed every
``store_flush_seconds`` and on :meth:`PlannerService.close`. On a shared (PostgreSQL) store this
planner is one of several replicas (:class:`planner.replicas.Replica`): every agent RPC first makes
sure the agent is attached here (its lease), and the flush renews the leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import grpc

from planner import requests
from planner.broadcaster import Broadcaster
from planner.config import PlannerConfig
from planner.hysteresis import Hysteresis
from planner.metrics import PlannerMetrics
from planner.owners import lease_of
from planner.replanner import RePlanner
from planner.replicas import Replica, stored_agents
from planner.servicer import PlannerServicer
from planner.state import AgentState, PlannerState, WorkerState
from planner.store import Store
from runtime.daemon.auth import current_identity
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

__all__ = ["AgentState", "PlannerService", "WorkerState"]

logger = logging.getLogger(__name__)

SLOW_REGISTRATION_SECONDS = 5.0  # a registration answered this late (or cancelled) is logged, the first SLOW_LOGGED
SLOW_LOGGED = 20


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
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False  # a flag besides cancel(): wait_for may lose a cancellation on Python 3.11
        self.slow_registrations = 0  # with replicas: registrations answered SLOW_REGISTRATION_SECONDS late, or cancelled
        state.load()
        self.replica = Replica(config, state, replanner, broadcaster) if store.backend.shared else None

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
        self._closing = False
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="planner-store-flush")

    async def _flush_loop(self) -> None:
        """Write the buffered links, heartbeats and speeds every ``store_flush_seconds`` (sooner when a
        telemetry ack waits for them); renew leases."""
        while not self._closing:
            await self.state.behind.wait_due(self.config.store_flush_seconds)
            if not self._closing:
                await self.flush()

    async def flush(self) -> None:
        """One write-behind flush now (and, with replicas, the lease renewal after it)."""
        try:
            renewal = await self.state.behind.flush(self.replica.renewal() if self.replica else None)
            if self.replica is not None:
                await self.replica.apply(renewal)
        except Exception:
            logger.exception("planner store flush failed; retrying in %.1fs", self.config.store_flush_seconds)

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
        self._closing = True
        for task in (self._sweeper, self._flusher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.replanner.stop()
        for st in self.state.agents.values():
            self.state.save_links(st)
        self.broadcaster.close()
        self.replanner.shutdown()
        try:
            await self.state.behind.close()  # the last links and heartbeats
        finally:
            if self.replica is not None:
                await self.replica.close()  # this replica's agents may attach elsewhere at once

    # -- with replicas: each agent RPC first attaches the agent here (planner.replicas) -------------

    async def RegisterAgent(self, request: pb.RegisterAgentRequest, context: grpc.aio.ServicerContext) -> pb.RegisterAgentReply:
        if self.replica is not None:
            aid = requests.check_id(request.agent_id, "agent_id")
            # the caller's right to the id first (as the servicer checks it): no lease moves for a stranger
            self.owners.claim("agent", aid, current_identity(), lease_of(context))
            t0 = time.monotonic()
            attached, how = t0, "answered"
            try:
                await self.replica.attach(aid, take=True)
                attached = time.monotonic()
                try:
                    return await super().RegisterAgent(request, context)
                except BaseException:
                    await self.replica.detach_unknown(aid)  # a refused first registration holds no lease
                    raise
            except asyncio.CancelledError:
                how = "cancelled"
                self._unclaim("agent", aid, self.state.agents)
                raise
            except BaseException:
                self._unclaim("agent", aid, self.state.agents)  # its attachment failed: no binding kept
                raise
            finally:
                self._slow(aid, how, t0, attached)
        return await super().RegisterAgent(request, context)

    def _slow(self, agent_id: str, how: str, t0: float, attached: float) -> None:
        """Log (the first few) registrations that took SLOW_REGISTRATION_SECONDS or more here, or were cancelled."""
        now = time.monotonic()
        if how != "cancelled" and now - t0 < SLOW_REGISTRATION_SECONDS:
            return
        self.slow_registrations += 1
        if self.slow_registrations <= SLOW_LOGGED:
            logger.warning("registration of agent %s %s after %.2f s here (its lease and rows: %.2f s; registrations "
                           "waiting their turn now: %d)", agent_id, how, now - t0,
                           (attached if attached > t0 else now) - t0, self.registrations.backlog)

    async def _attach(self, agent_id: str, context: grpc.aio.ServicerContext, owned: bool = True) -> None:
        """With replicas: attach ``agent_id`` here (its lease and rows from the store), after the caller's right
        to the id (``owned``: as the servicer checks it, for QueryPlan only when authenticated): a call naming
        another agent moves no lease and loads nothing."""
        if self.replica is None:
            return
        requests.check_id(agent_id, "agent_id")
        if owned:
            self._owned("agent", agent_id, context)
        await self.replica.attach(agent_id, take=False)

    async def _attached(self, messages: AsyncIterator[pb.Telemetry],
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Telemetry]:
        """``messages``, each after its agent is attached here (:meth:`_attach`)."""
        async for t in messages:
            await self._attach(t.agent_id, context)
            yield t

    async def WatchPlan(self, request: pb.WatchPlanRequest, context: grpc.aio.ServicerContext) -> AsyncGenerator[pb.Plan, None]:
        await self._attach(request.agent_id, context)
        async with contextlib.aclosing(super().WatchPlan(request, context)) as plans:
            async for plan in plans:
                yield plan
        if self.replica is not None:
            self.replica.check_stream_end(request.agent_id)  # FAILED_PRECONDITION: another replica took it

    async def ReportTelemetry(self, request_iterator: AsyncIterator[pb.Telemetry], context: grpc.aio.ServicerContext) -> pb.TelemetryAck:
        if self.replica is not None:
            request_iterator = self._attached(request_iterator, context)
        ack = await super().ReportTelemetry(request_iterator, context)
        await self.state.behind.barrier()  # acknowledged means stored: the samples it counts are committed
        return ack

    async def ReportPlanStatus(self, request: pb.PlanStatus, context: grpc.aio.ServicerContext) -> pb.PlanStatusAck:
        await self._attach(request.agent_id, context)
        return await super().ReportPlanStatus(request, context)

    async def QueryPlan(self, request: pb.PlanQuery, context: grpc.aio.ServicerContext) -> pb.PlanQueryReply:
        await self._attach(request.agent_id, context, owned=current_identity().authenticated)
        return await super().QueryPlan(request, context)

    async def ListAgents(self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext) -> pb.ListAgentsReply:
        reply = await super().ListAgents(request, context)
        if self.replica is None:
            return reply
        held = set(self.state.agents)
        others = await self.state.behind.read(lambda store: stored_agents(store, held))  # off the event loop
        merged = sorted([*reply.agents, *others], key=lambda a: a.agent_id)
        return pb.ListAgentsReply(agents=merged)

    async def ListProbeTargets(self, request: pb.ProbeTargetsRequest,
                               context: grpc.aio.ServicerContext) -> pb.ProbeTargetsReply:
        await self._attach(request.agent_id, context)
        return await super().ListProbeTargets(request, context)
