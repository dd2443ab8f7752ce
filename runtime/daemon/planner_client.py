"""One client of the planner's gRPC API, for the agent's planner link, the worker's registration and the CLI.

:class:`PlannerClient` owns its channel (the transport's options, a bounded connect), puts a
deadline on every call and raises the ``runtime.contracts.errors`` family instead of
``grpc.RpcError``. The two long-lived streams (``WatchPlan``, ``ReportTelemetry``) have the
``stream_seconds`` deadline, after which the caller reopens them.

    async with PlannerClient(PlannerClientOptions("planner:50070")) as planner:
        reply = await planner.call("QueryPlan", request)

From synchronous code (the CLI): ``call_planner(address, "QueryPlan", request, timeout)``.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from runtime.contracts.errors import Unavailable, from_rpc_error, from_status
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as ppb_grpc
from runtime.wire.transport import TransportOptions

# This process's lease (planner.owners): sent with every planner call, it proves to a planner
# without authentication that a re-registration or report comes from the process that first
# registered the id. Never logged; a restarted process gets a new one.
LEASE = (("edgesplit-lease", secrets.token_urlsafe(32)),)


@dataclass(frozen=True)
class PlannerClientOptions:
    """Where the planner is and how long each thing may take."""

    address: str  # HOST:PORT of the planner
    transport: TransportOptions = field(default_factory=TransportOptions)  # message size and keep-alive limits (control channel)
    connect_timeout: float = 5.0  # seconds to wait for the channel to become ready in connect()
    rpc_timeout: float = 5.0  # deadline of each unary call (and of each write and the ack on a telemetry stream)
    stream_seconds: float = 300.0  # deadline of each WatchPlan / ReportTelemetry stream, then it is reopened


class PlannerClient:
    """A channel to the planner; every call has a deadline and raises EdgesplitError on failure."""

    def __init__(self, options: PlannerClientOptions):
        self.options = options
        self._channel: grpc.aio.Channel | None = None
        self._stub: ppb_grpc.PlannerStub | None = None

    @property
    def address(self) -> str:
        return self.options.address

    @property
    def stub(self) -> ppb_grpc.PlannerStub:
        """The raw stub (opens the channel without waiting for it)."""
        if self._stub is None:
            # short keep-alive: a silent partition closes the connection within 1.8 s (runtime.wire.transport)
            self._channel = self.options.transport.control_channel(self.options.address)
            self._stub = ppb_grpc.PlannerStub(self._channel)  # type: ignore[no-untyped-call]  # generated, unannotated
        return self._stub

    async def connect(self) -> PlannerClient:
        """Open the channel and wait (``connect_timeout``) until it is ready. Raises Unavailable."""
        self.stub  # noqa: B018 - opens the channel
        assert self._channel is not None
        try:
            await asyncio.wait_for(self._channel.channel_ready(), self.options.connect_timeout)
        except asyncio.TimeoutError:
            raise Unavailable(f"planner {self.options.address} unreachable (no connection within "
                              f"{self.options.connect_timeout:g}s)") from None
        return self

    async def watch_connection(self, on_lost: Callable[[str], None]) -> None:
        """Call ``on_lost(new state)`` each time the connection to the planner leaves READY (keep-alive
        closes a silently partitioned one within keepalive_time + control_keepalive_timeout, 1.8 s by
        default); runs until cancelled. Costs no RPC: the pings are HTTP/2 frames."""
        self.stub  # noqa: B018 - opens the channel
        channel = self._channel
        assert channel is not None
        ready = grpc.ChannelConnectivity.READY
        state = channel.get_state(try_to_connect=False)
        while True:
            await channel.wait_for_state_change(state)
            new = channel.get_state(try_to_connect=False)
            if state == ready and new != ready:
                on_lost(new.name)
            state = new

    async def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close(grace=None)

    async def __aenter__(self) -> PlannerClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- unary calls -----------------------------------------------------------------------

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """Call the unary RPC ``method`` (e.g. ``"QueryPlan"``) with a deadline (default ``rpc_timeout``)."""
        try:
            return await getattr(self.stub, method)(request, timeout=timeout or self.options.rpc_timeout,
                                                    metadata=LEASE)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def register_agent(self, request: ppb.RegisterAgentRequest) -> ppb.RegisterAgentReply:
        reply: ppb.RegisterAgentReply = await self.call("RegisterAgent", request)
        return reply

    async def register_worker(self, request: ppb.RegisterWorkerRequest) -> ppb.RegisterWorkerReply:
        reply: ppb.RegisterWorkerReply = await self.call("RegisterWorker", request)
        return reply

    async def report_plan_status(self, status: ppb.PlanStatus) -> ppb.PlanStatusAck:
        reply: ppb.PlanStatusAck = await self.call("ReportPlanStatus", status)
        return reply

    async def query_plan(self, query: ppb.PlanQuery) -> ppb.PlanQueryReply:
        reply: ppb.PlanQueryReply = await self.call("QueryPlan", query)
        return reply

    async def list_agents(self) -> ppb.ListAgentsReply:
        reply: ppb.ListAgentsReply = await self.call("ListAgents", ppb.ListAgentsRequest())
        return reply

    # -- streams ---------------------------------------------------------------------------

    async def watch_plan(self, request: ppb.WatchPlanRequest) -> AsyncIterator[ppb.Plan]:
        """The plans the planner pushes, until the stream ends. Raises EdgesplitError when it fails,
        DeadlineExceeded when it reaches ``stream_seconds`` (reopen it then)."""
        call = self.stub.WatchPlan(request, timeout=self.options.stream_seconds, metadata=LEASE)
        try:
            async for plan in call:
                yield plan
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    def telemetry_stream(self) -> TelemetryStream:
        """A ReportTelemetry stream, open for ``stream_seconds`` (plus the time for its ack)."""
        return TelemetryStream(self.stub.ReportTelemetry(
            timeout=self.options.stream_seconds + 2 * self.options.rpc_timeout, metadata=LEASE), self.options.rpc_timeout)


class TelemetryStream:
    """One client stream of telemetry messages: each write and the final ack are bounded by ``rpc_timeout``.

    A planner that sheds load ends the stream RESOURCE_EXHAUSTED (Overloaded) with trailing metadata
    ``retry-after-ms``; :attr:`retry_after` then holds those seconds (capped at MAX_RETRY_AFTER_SECONDS)."""

    def __init__(self, call: Any, rpc_timeout: float):
        self._call = call
        self._timeout = rpc_timeout
        self.retry_after = 0.0  # seconds the planner asked to wait before reporting again (0: none)

    async def write(self, message: ppb.Telemetry) -> None:
        try:
            await asyncio.wait_for(self._call.write(message), self._timeout)
        except (grpc.RpcError, asyncio.InvalidStateError) as e:
            # a write after the planner ended the call raises InvalidStateError, or INTERNAL "Internal error
            # from Core" (grpc/grpc#36066): the call's own status says why it ended
            raise (await self._ended() if self._call.done() else self._mapped(e)) from None

    async def finish(self) -> ppb.TelemetryAck:
        """Half-close and wait for the ack."""
        try:
            await asyncio.wait_for(self._call.done_writing(), self._timeout)
            return await asyncio.wait_for(self._call, self._timeout)
        except (grpc.RpcError, asyncio.InvalidStateError) as e:
            raise (await self._ended() if self._call.done() else self._mapped(e)) from None

    def _mapped(self, e: Exception) -> Exception:
        if not isinstance(e, grpc.RpcError):
            return Unavailable(f"telemetry stream failed: {type(e).__name__}: {e}")
        trailing = e.trailing_metadata() if hasattr(e, "trailing_metadata") else ()
        self.retry_after = retry_after_seconds(e.code(), trailing)
        return from_rpc_error(e)

    async def _ended(self) -> Exception:
        code, details = await self._call.code(), await self._call.details()
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self.retry_after = retry_after_seconds(code, await self._call.trailing_metadata())
        return from_status(code, details or code.name)

    def cancel(self) -> None:
        self._call.cancel()


RETRY_AFTER_HEADER = "retry-after-ms"  # trailing metadata of a shed call (planner.intake)
MAX_RETRY_AFTER_SECONDS = 60.0  # a longer (or unreadable) retry-after is taken as this


def retry_after_seconds(code: grpc.StatusCode, trailing: Any) -> float:
    """Seconds a shed call (RESOURCE_EXHAUSTED) asked to wait (``retry-after-ms`` in its trailing
    metadata), capped at MAX_RETRY_AFTER_SECONDS; 0.0 for any other status or when it asked nothing."""
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return 0.0
    for key, value in trailing or ():
        if key == RETRY_AFTER_HEADER:
            try:
                ms = float(value if isinstance(value, str) else value.decode())
            except ValueError:
                return MAX_RETRY_AFTER_SECONDS
            return min(max(ms, 0.0) / 1e3, MAX_RETRY_AFTER_SECONDS) if ms == ms else MAX_RETRY_AFTER_SECONDS
    return 0.0


def call_planner(address: str, method: str, request: Any, timeout: float,
                 transport: TransportOptions | None = None) -> Any:
    """One unary call from synchronous code (the CLI): connect, call with ``timeout``, close.
    Raises EdgesplitError."""

    async def once() -> Any:
        options = PlannerClientOptions(address, transport or TransportOptions(), connect_timeout=timeout,
                                       rpc_timeout=timeout)
        client = PlannerClient(options)
        try:
            return await client.call(method, request)
        finally:
            await client.close()

    return asyncio.run(once())
