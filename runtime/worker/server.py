"""Edge worker daemon: gRPC server with health, reflection, metrics and graceful drain."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from runtime.daemon.metrics_http import MetricsEndpoint
from runtime.proto.edgesplit.v1 import inference_pb2, inference_pb2_grpc
from runtime.worker.config import WorkerConfig
from runtime.worker.metrics import WorkerMetrics
from runtime.worker.registration import PlannerRegistration, advertised_address, load_profiles
from runtime.worker.service import InferenceService

logger = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


@dataclass
class WorkerServer:
    server: grpc.aio.Server
    port: int
    service: InferenceService
    health: health.aio.HealthServicer
    metrics_endpoint: MetricsEndpoint | None
    registration: PlannerRegistration | None = None

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_endpoint.port if self.metrics_endpoint else None

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def drain_and_stop(self, grace: float) -> None:
        """NOT_SERVING, refuse new frames, let admitted frames finish (up to ``grace``), stop."""
        logger.info("draining: health NOT_SERVING, waiting up to %.1fs for frames in flight", grace)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.service.draining = True
        if self.registration is not None:
            await self.registration.close()
        if not await self.service.wait_idle(grace):
            logger.warning("frames still in flight after %.1fs; stopping anyway", grace)
        await self.server.stop(min(1.0, grace))
        await self.service.next.close()
        self.service.executor.shutdown(wait=False, cancel_futures=True)
        if self.metrics_endpoint:
            self.metrics_endpoint.close()
        logger.info("worker stopped")


async def serve(config: WorkerConfig) -> WorkerServer:
    """Start a worker; returns once it is SERVING. Tests bind ``127.0.0.1:0`` and read ``.port``."""
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    metrics = WorkerMetrics()
    service = InferenceService(config, metrics)
    server = grpc.aio.server(options=config.transport().server_options())
    inference_pb2_grpc.add_InferenceServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    docs = load_profiles(config.profiles, config.tier) if config.planner else []
    port = server.add_insecure_port(config.listen)
    if port == 0:
        raise OSError(f"could not bind {config.listen}")
    await service.tails.load_tls(config.tls)
    for item in config.preload:
        model, _, split = item.partition("@")
        if split:
            await service.tails.get(model, split)
        else:
            await service.tails.model(model)
    await server.start()
    endpoint = None
    if config.metrics_port >= 0:
        endpoint = MetricsEndpoint(metrics.registry, config.metrics_host, config.metrics_port)
    ws = WorkerServer(server, port, service, health_servicer, endpoint)
    await ws._set_health(health_pb2.HealthCheckResponse.SERVING)
    if config.planner:
        ws.registration = PlannerRegistration(
            config.planner, config.worker_id or socket.gethostname(), advertised_address(config.listen, port, config.advertise),
            config.tier, docs, sorted(service.tails.tls), config.planner_refresh_seconds, config.next_tiers)
        ws.registration.start()
    logger.info(
        "worker serving on port %d (metrics %s)", port, f"http://{config.metrics_host}:{endpoint.port}/metrics" if endpoint else "off"
    )
    return ws


async def run_worker(config: WorkerConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    ws = await serve(config)
    host = config.listen.rsplit(":", 1)[0]
    print(f"edgesplit worker listening on {host}:{ws.port}", flush=True)
    if ws.metrics_port is not None:
        print(f"metrics on http://{config.metrics_host}:{ws.metrics_port}/metrics", flush=True)
    if config.port_file:
        with open(config.port_file, "w") as f:
            f.write(f"{ws.port}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await ws.drain_and_stop(config.grace_seconds)
