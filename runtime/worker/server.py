"""Edge worker daemon: gRPC server with health, reflection, metrics and graceful drain."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import torch

from runtime.daemon.planner_client import PlannerClientOptions
from runtime.daemon.server import Daemon, DaemonHandle, DaemonOptions, stop_on_signals
from runtime.proto.edgesplit.v1 import inference_pb2, tiles_pb2_grpc
from runtime.wire.security import AGENT, WORKER
from runtime.worker.config import WorkerConfig
from runtime.worker.metrics import WorkerMetrics
from runtime.worker.registration import RPC_TIMEOUT_SECONDS, PlannerRegistration, advertised_address, load_profiles
from runtime.worker.service import InferenceService, add_inference_servicer
from runtime.worker.tiles import SERVICE_NAME as TILES_SERVICE
from runtime.worker.tiles import TilesService

logger = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
# who may call what (runtime.daemon.auth; enforced when the worker authenticates, i.e. mTLS or tokens):
# agents send frames, workers forward chained frames; operators may do anything
AUTH_POLICY = {name: frozenset({AGENT, WORKER}) for name in ("Prepare", "Infer", "InferStream", "InferTile")}
AUTH_POLICY["Probe"] = frozenset({AGENT})  # bandwidth probes: agents measuring their link
# halo exchange: a worker reads a neighbour's kept tile; an agent its own frame's kept tiles back after a failed exchange
# (both need the frame's halo_token; an authenticated agent may name only its own agent_id)
AUTH_POLICY["FetchRegion"] = frozenset({AGENT, WORKER})


@dataclass
class WorkerServer(DaemonHandle):
    daemon: Daemon
    service: InferenceService
    registration: PlannerRegistration | None = None
    tiles: TilesService | None = None  # its channels to halo neighbours are closed on drain

    async def drain_and_stop(self, grace: float) -> None:
        """NOT_SERVING, refuse new frames, let admitted frames finish (up to ``grace``), stop."""
        logger.info("draining: health NOT_SERVING, waiting up to %.1fs for frames in flight", grace)
        await self.daemon.drain(grace, self._quiesce, stop_grace=min(1.0, grace))
        await self.service.next.close()
        if self.tiles is not None:
            await self.tiles.peers.close()
        self.service.executor.shutdown(wait=False, cancel_futures=True)
        logger.info("worker stopped")

    async def _quiesce(self, grace: float) -> None:
        self.service.draining = True
        if self.registration is not None:
            await self.registration.close()
        if not await self.service.wait_idle(grace):
            logger.warning("frames still in flight after %.1fs; stopping anyway", grace)
        self.service.end_streams()


async def serve(config: WorkerConfig) -> WorkerServer:
    """Start a worker; returns once it is SERVING. Tests bind ``127.0.0.1:0`` and read ``.port``."""
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    metrics = WorkerMetrics()
    service = InferenceService(config, metrics)
    daemon = Daemon(DaemonOptions(
        listen=config.listen, services=(SERVICE_NAME, TILES_SERVICE), transport=config.transport(),
        on_error=lambda _method, code: metrics.errors.labels(code).inc(),
        metrics=metrics.registry, metrics_host=config.metrics_host, metrics_port=config.metrics_port,
        auth_policy=AUTH_POLICY, frames=True))
    tiles = TilesService(service)  # RFS/DPFP: tiles of fused blocks, on the same admission and executor

    def add_servicers(server) -> None:
        add_inference_servicer(service, server)  # InferStream's frames read without copies (wire.framewire)
        tiles_pb2_grpc.add_TilesServicer_to_server(tiles, server)

    daemon.bind(add_servicers)
    docs = load_profiles(config.profiles, config.tier) if config.planner else []
    await service.tails.load_tls(config.tls)
    for item in config.preload:
        model, _, split = item.partition("@")
        if split:
            await service.tails.get(model, split)
        else:
            await service.tails.model(model)
    await daemon.start()
    ws = WorkerServer(daemon, service, tiles=tiles)
    if config.planner:
        ws.registration = PlannerRegistration(
            PlannerClientOptions(config.planner, config.transport(), rpc_timeout=RPC_TIMEOUT_SECONDS), config.worker_id or socket.gethostname(),
            advertised_address(config.listen, daemon.port, config.advertise),
            config.tier, docs, sorted(service.tails.tls), config.planner_refresh_seconds, config.next_tiers)
        ws.registration.died = lambda reason: metrics.stream_deaths.labels("planner", reason).inc()
        ws.registration.start()
    logger.info("worker serving on port %d (metrics %s)", daemon.port, daemon.metrics_text())
    return ws


async def run_worker(config: WorkerConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    ws = await serve(config)
    host = config.listen.rsplit(":", 1)[0]
    ws.daemon.announce(f"edgesplit worker listening on {host}:{ws.port}", config.port_file)
    await stop_on_signals().wait()
    await ws.drain_and_stop(config.grace_seconds)
