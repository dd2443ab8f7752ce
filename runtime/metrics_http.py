"""Prometheus exposition over HTTP for one registry (shared by every daemon)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, start_http_server

logger = logging.getLogger(__name__)


class MetricsEndpoint:
    """Serves ``registry`` at ``http://host:port/metrics`` from a daemon thread; port 0 picks one."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
