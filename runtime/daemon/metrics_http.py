"""Prometheus exposition over HTTP for one registry (shared by every daemon)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, start_http_server

logger = logging.getLogger(__name__)

# Histogram buckets for per-frame stages (agent and worker alike): sub-millisecond resolution, a
# boundary at a 100 ms per-frame latency target, and the multi-second deadlines of slow links.
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class MetricsEndpoint:
    """Serves ``registry`` at ``http://host:port/metrics`` from a daemon thread; port 0 picks one."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
