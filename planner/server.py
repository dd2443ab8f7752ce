"""Planner daemon: gRPC server with health, reflection, metrics, a persistent store and graceful drain."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from planner.config import PlannerConfig
from planner.metrics import PlannerMetrics
from planner.service import PlannerService
from planner.store import Store
from runtime.daemon.metrics_http import MetricsEndpoint
from runtime.proto.edgesplit.v1 import planner_pb2, planner_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = planner_pb2.DESCRIPTOR.services_by_name["Planner"].full_name


@dataclass
class PlannerServer:
    server: grpc.aio.Server
    port: int
    service: PlannerService
    health: health.aio.HealthServicer
    metrics_endpoint: MetricsEndpoint | None

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_endpoint.port if self.metrics_endpoint else None

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def drain_and_stop(self, grace: float) -> None:
        """NOT_SERVING, end the WatchPlan streams, let unary calls finish (up to ``grace``), stop."""
        logger.info("draining: health NOT_SERVING, stopping within %.1fs", grace)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.service.close()
        await self.server.stop(grace)
        self.service.store.close()
        if self.metrics_endpoint:
            self.metrics_endpoint.close()
        logger.info("planner stopped")


async def serve(config: PlannerConfig) -> PlannerServer:
    """Start a planner on ``config.db``; returns once it is SERVING. Tests bind ``127.0.0.1:0``."""
    metrics = PlannerMetrics()
    store = Store(config.db)
    try:
        service = PlannerService(config, store, metrics)
        server = grpc.aio.server(options=config.transport().server_options())
        planner_pb2_grpc.add_PlannerServicer_to_server(service, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
        )
        port = server.add_insecure_port(config.listen)
        if port == 0:
            raise OSError(f"could not bind {config.listen}")
        await server.start()
    except BaseException:
        store.close()
        raise
    service.start()
    endpoint = None
    if config.metrics_port >= 0:
        endpoint = MetricsEndpoint(metrics.registry, config.metrics_host, config.metrics_port)
    ps = PlannerServer(server, port, service, health_servicer, endpoint)
    await ps._set_health(health_pb2.HealthCheckResponse.SERVING)
    logger.info("planner serving on port %d with %s (metrics %s)", port, config.db,
                f"http://{config.metrics_host}:{endpoint.port}/metrics" if endpoint else "off")
    return ps


async def run_planner(config: PlannerConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    ps = await serve(config)
    host = config.listen.rsplit(":", 1)[0]
    print(f"edgesplit planner listening on {host}:{ps.port} (database {config.db})", flush=True)
    if ps.metrics_port is not None:
        print(f"metrics on http://{config.metrics_host}:{ps.metrics_port}/metrics", flush=True)
    if config.port_file:
        with open(config.port_file, "w") as f:
            f.write(f"{ps.port}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await ps.drain_and_stop(config.grace_seconds)
