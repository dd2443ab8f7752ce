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
            auth_policy=AUTH_POLICY))
        daemon.bind(lambda server: planner_pb2_grpc.add_PlannerServicer_to_server(service, server))
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
