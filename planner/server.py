"""Planner daemon: gRPC server with health, reflection, metrics, a persistent store and graceful drain."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from planner.config import PlannerConfig
from planner.metrics import PlannerMetrics
from planner.service import PlannerService
from planner.store import Store
from runtime.daemon.server import Daemon, DaemonHandle, DaemonOptions, stop_on_signals
from runtime.proto.edgesplit.v1 import planner_pb2, planner_pb2_grpc
from runtime.wire.security import AGENT, WORKER

logger = logging.getLogger(__name__)

SERVICE_NAME = planner_pb2.DESCRIPTOR.services_by_name["Planner"].full_name
# who may call what (runtime.daemon.auth; enforced when the planner authenticates: mTLS or tokens).
# Operators may call everything; ListAgents is theirs alone.
AUTH_POLICY = {"RegisterWorker": frozenset({WORKER}), "RegisterAgent": frozenset({AGENT}),
               "ReportTelemetry": frozenset({AGENT}), "WatchPlan": frozenset({AGENT}),
               "ReportPlanStatus": frozenset({AGENT}), "QueryPlan": frozenset({AGENT}), "ListProbeTargets": frozenset({AGENT}),
               "ListAgents": frozenset()}
# gRPC core's backlog of calls the server has not taken yet (its Python loop takes one at a time). Past
# grpc.server.max_pending_requests (default 1,000) core rejects new calls at random, all of them past the
# hard limit (default 3,000), and the caller sees CANCELLED "CANCELLED" with no retry-after: when a
# replica died, 78-268 of its agents' re-registrations on the survivor ended so, and each such agent
# lost another 4-8 s (its back-off, a try on the dead address). A survivor takes three calls per agent
# of the dead replica at once (registration, plan stream, telemetry stream): 15,000 for 5,000 agents.
# A waiting call holds about 7 KB (41 MB for 6,000 measured), so the hard limit bounds it to ~210 MB;
# the planner's own gate then sheds registrations with RESOURCE_EXHAUSTED and a retry-after.
PENDING_CALLS = 20_000  # calls waiting in gRPC core before it rejects new ones at random
PENDING_CALLS_MAX = 30_000  # ... and all of them
SERVER_ARGS = (("grpc.server.max_pending_requests", PENDING_CALLS),
               ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS_MAX))


@dataclass
class PlannerServer(DaemonHandle):
    daemon: Daemon
    service: PlannerService

    async def drain_and_stop(self, grace: float) -> None:
        """NOT_SERVING, end the WatchPlan streams, let unary calls finish (up to ``grace``), stop."""
        logger.info("draining: health NOT_SERVING, stopping within %.1fs", grace)
        try:
            await self.daemon.drain(grace, lambda _grace: self.service.close())
        finally:
            self.service.store.close()
        logger.info("planner stopped")


async def serve(config: PlannerConfig) -> PlannerServer:
    """Start a planner on its store (``config.store``, else the SQLite file ``config.db``); returns once
    it is SERVING. Tests bind ``127.0.0.1:0``."""
    metrics = PlannerMetrics()
    store = Store(config.store_location())
    try:
        service = PlannerService(config, store, metrics)
        daemon = Daemon(DaemonOptions(
            listen=config.listen, services=(SERVICE_NAME,), transport=config.transport(),
            on_error=lambda _method, code: metrics.errors.labels(code).inc(),
            metrics=metrics.registry, metrics_host=config.metrics_host, metrics_port=config.metrics_port,
            auth_policy=AUTH_POLICY, server_args=SERVER_ARGS))
        daemon.bind(lambda server: planner_pb2_grpc.add_PlannerServicer_to_server(  # type: ignore[no-untyped-call]
            service, server))  # generated, unannotated
        await daemon.start()
    except BaseException:
        store.close()
        raise
    service.start()
    logger.info("planner serving on port %d with %s (metrics %s)", daemon.port, store.path, daemon.metrics_text())
    return PlannerServer(daemon, service)


async def run_planner(config: PlannerConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    ps = await serve(config)
    host = config.listen.rsplit(":", 1)[0]
    ps.daemon.announce(f"edgesplit planner listening on {host}:{ps.port} (database {ps.service.store.path})",
                       config.port_file)
    await stop_on_signals().wait()
    await ps.drain_and_stop(config.grace_seconds)
