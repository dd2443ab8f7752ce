"""The daemon scaffold: one gRPC aio server setup for the worker, the planner and the agent's local API.

:class:`Daemon` creates the server with the transport's channel options and the server
interceptors (the given ones, then the error-to-status mapping), lets the daemon add its
servicers, binds (returning the real port; tests bind ``127.0.0.1:0``), serves the standard
health service (``""`` and every named service) and server reflection, starts the Prometheus
endpoint, and drains: health NOT_SERVING, the daemon's own quiesce step, then a bounded stop.
:func:`stop_on_signals` turns SIGTERM/SIGINT into an event for the daemon's main loop.

Usage::

    daemon = Daemon(DaemonOptions(listen="127.0.0.1:0", services=(SERVICE_NAME,), ...))
    await daemon.start(lambda server: add_FooServicer_to_server(servicer, server))
    ...
    await stop_on_signals().wait()
    await daemon.drain(grace, quiesce=servicer.wait_idle)
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Gauge

from runtime.daemon.auth import AuthInterceptor, AuthPolicy
from runtime.daemon.interceptors import ErrorHook, ErrorStatusInterceptor
from runtime.daemon.listen import NO_REUSEPORT, bind_failed, check_listen
from runtime.daemon.metrics_http import MetricsEndpoint
from runtime.daemon.sdnotify import notify, start_watchdog, stop_watchdog
from runtime.daemon.tracing import server_interceptor
from runtime.wire.reloading import reload_credentials
from runtime.wire.security import check_bind, server_credentials
from runtime.wire.transport import TransportOptions

logger = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class DaemonOptions:
    """What a daemon's gRPC server looks like; everything else is the daemon's own."""

    listen: str  # HOST:PORT (port 0 picks a free one) or unix:PATH to bind
    services: tuple[str, ...] = ()  # full names of the served services: health entries and reflection
    transport: TransportOptions = field(default_factory=TransportOptions)  # message size and keep-alive limits
    interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()  # run first, in order (authentication goes here)
    on_error: ErrorHook | None = None  # told (method, code name) of each exception mapped to a status
    reflection: bool = True  # serve grpc.reflection.v1alpha for the services, health and reflection itself
    metrics: CollectorRegistry | None = None  # Prometheus registry to expose; None: no endpoint
    metrics_host: str = "127.0.0.1"  # interface of the /metrics endpoint
    metrics_port: int = -1  # port of the /metrics endpoint: 0 picks one, below 0 turns it off
    auth_policy: AuthPolicy | None = None  # method name -> roles allowed to call it (runtime.daemon.auth)
    frames: bool = False  # its clients stream frames (the worker): keep-alive waits the frame channels' backstop
    server_args: tuple[tuple[str, int], ...] = ()  # more gRPC core server arguments (the planner's call backlog)


# Called with the grace seconds; returns once the daemon's work in flight is done (or the time is up).
Quiesce = Callable[[float], Awaitable[object]]


class Daemon:
    """One gRPC aio server with health, reflection, error mapping, metrics and graceful drain."""

    def __init__(self, options: DaemonOptions):
        self.options = options
        self.health = health.aio.HealthServicer()
        # authentication first: a refused call never reaches another interceptor or a handler
        self.auth = AuthInterceptor(options.transport.security, options.auth_policy, options.metrics)
        # then spans (only when tracing is on: runtime.daemon.tracing.configure ran before this daemon)
        traced = server_interceptor()
        self.server = grpc.aio.server(
            options=[*options.transport.server_options(frames=options.frames), *options.server_args, NO_REUSEPORT],
            interceptors=[self.auth, *([traced] if traced else []), *options.interceptors,
                          ErrorStatusInterceptor(options.on_error)])
        self.insecure_bind = Gauge("edgesplit_insecure_bind", "1 when serving a network address without TLS "
                                   "(--insecure)", registry=options.metrics)
        self.port = 0  # the bound port, after start()
        self.metrics_endpoint: MetricsEndpoint | None = None
        self._watchdog: asyncio.Task[None] | None = None  # systemd WatchdogSec keep-alives (runtime.daemon.sdnotify)

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_endpoint.port if self.metrics_endpoint else None

    @property
    def address(self) -> str:
        """Where clients reach the server: ``HOST:PORT`` with the real port, or the ``unix:`` path."""
        listen = self.options.listen
        return listen if listen.startswith("unix:") else f"{listen.rsplit(':', 1)[0]}:{self.port}"

    def bind(self, add_servicers: Callable[[grpc.aio.Server], object]) -> int:
        """Add the daemon's servicers, health and reflection, and bind; returns the bound port."""
        add_servicers(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.options.reflection:
            reflection.enable_server_reflection((*self.options.services, HEALTH_SERVICE, reflection.SERVICE_NAME),
                                                self.server)
        check_listen(self.options.listen)
        security = self.options.transport.security
        self.insecure_bind.set(1 if check_bind(self.options.listen, security) else 0)
        credentials = server_credentials(security)
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(self.options.listen)
            else:
                self.port = self.server.add_secure_port(self.options.listen, credentials)
        except RuntimeError as e:  # grpc's "Failed to bind to address"
            raise OSError(bind_failed(self.options.listen, str(e))) from None
        if self.port == 0:
            raise OSError(bind_failed(self.options.listen, "gRPC bound no port"))
        return self.port

    async def start(self, add_servicers: Callable[[grpc.aio.Server], object] | None = None) -> None:
        """Bind (unless :meth:`bind` ran), start the server and the metrics endpoint, then SERVING."""
        if add_servicers is not None:
            self.bind(add_servicers)
        await self.server.start()
        opts = self.options
        if opts.metrics is not None and opts.metrics_port >= 0:
            self.metrics_endpoint = MetricsEndpoint(opts.metrics, opts.metrics_host, opts.metrics_port)
        await self.set_health(SERVING)
        notify("READY=1")  # under systemd Type=notify: started only now, after the preload and the bind
        self._watchdog = start_watchdog()

    async def set_health(self, status: int) -> None:
        """Set the overall (``""``) and every named service's health."""
        for name in ("", *self.options.services):
            await self.health.set(name, status)

    def metrics_text(self) -> str:
        """``http://HOST:PORT/metrics`` or ``off``, for the start-up log line."""
        port = self.metrics_port
        return f"http://{self.options.metrics_host}:{port}/metrics" if port is not None else "off"

    def announce(self, banner: str, port_file: str = "") -> None:
        """Print the banner and the metrics URL (on stdout, for supervisors), write ``port_file``."""
        print(banner, flush=True)
        if self.metrics_port is not None:
            print(f"metrics on {self.metrics_text()}", flush=True)
        if port_file:
            with open(port_file, "w") as f:
                f.write(f"{self.port}\n")

    async def drain(self, grace: float, quiesce: Quiesce | None = None, stop_grace: float | None = None) -> None:
        """Health NOT_SERVING, then ``quiesce(grace)``, then stop the server (RPCs still running get
        ``stop_grace`` seconds, default ``grace``), then close the metrics endpoint."""
        notify("STOPPING=1")
        await self.set_health(NOT_SERVING)
        try:
            if quiesce is not None:
                await quiesce(grace)
        finally:
            await self.server.stop(grace if stop_grace is None else stop_grace)
            self.auth.close()
            if self.metrics_endpoint is not None:
                self.metrics_endpoint.close()
                self.metrics_endpoint = None
            await stop_watchdog(self._watchdog)
            self._watchdog = None


def stop_on_signals(signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> asyncio.Event:
    """An event set by SIGTERM/SIGINT (installed now, on the running loop); SIGHUP makes server and client
    credentials re-read from their files (runtime.wire.reloading) instead of ending the process."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    reload_on_sighup()
    return stop


def reload_on_sighup() -> None:
    """SIGHUP re-reads server and client credentials from their files (installed now, on the running loop)."""
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_credentials)


class DaemonHandle:
    """What a running daemon (worker, planner) shows of its Daemon: the bound port, the grpc server,
    the health servicer and the metrics port. Subclasses are dataclasses with a ``daemon`` field."""

    daemon: Daemon

    @property
    def port(self) -> int:
        return self.daemon.port

    @property
    def server(self) -> grpc.aio.Server:
        return self.daemon.server

    @property
    def health(self) -> health.aio.HealthServicer:
        return self.daemon.health

    @property
    def metrics_port(self) -> int | None:
        return self.daemon.metrics_port
