"""Prometheus exposition over HTTP for one registry (shared by every daemon)."""

from __future__ import annotations

import logging
import platform
from importlib import metadata

import grpc
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Gauge,
    start_http_server,
)
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# Histogram buckets for per-frame stages (agent and worker alike): sub-millisecond resolution, a
# boundary at a 100 ms per-frame latency target, and the multi-second deadlines of slow links.
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Label values of every "by gRPC status code" counter, created at start so rate() sees a 0 before the
# first error (a counter series that appears at 1 never makes rate() > 0). Bounded: the 16 codes.
ERROR_CODES = tuple(c.name for c in grpc.StatusCode if c is not grpc.StatusCode.OK)

# The packages whose versions edgesplit_build_info reports (read from metadata: nothing is imported)
_BUILD_PACKAGES = {"version": "edgesplit", "grpcio": "grpcio", "protobuf": "protobuf", "torch": "torch"}


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def add_standard_metrics(registry: CollectorRegistry) -> None:
    """What operators expect on every /metrics: process_* (CPU, memory, file descriptors, start time),
    python_info, python_gc_*, and edgesplit_build_info (value 1, versions as labels). Once per registry."""
    if getattr(registry, "_edgesplit_standard", False):
        return
    collectors: tuple[Collector, ...] = (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR)
    for collector in collectors:
        registry.register(collector)
    info = Gauge("edgesplit_build_info", "Versions of edgesplit and its runtime (value 1)",
                 [*_BUILD_PACKAGES, "python"], registry=registry)
    info.labels(*(_package_version(p) for p in _BUILD_PACKAGES.values()), platform.python_version()).set(1)
    registry._edgesplit_standard = True  # type: ignore[attr-defined]


class MetricsEndpoint:
    """Serves ``registry`` at ``http://host:port/metrics`` from a daemon thread; port 0 picks one."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        add_standard_metrics(registry)
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
