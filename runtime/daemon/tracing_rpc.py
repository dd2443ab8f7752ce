"""The RPC side of tracing (runtime.daemon.tracing): W3C trace context in gRPC metadata.

:class:`TracingServerInterceptor` (the daemon scaffold installs it after authentication, only when
tracing is on) gives a unary call a SERVER span whose parent is the caller's ``traceparent``;
a client-streaming call one span per message received (from its arrival until the handler asks
for the next: the handler's work on it); a server-streaming call one span per message sent (from
the handler's yield until the message is written). Bidirectional streams (frames) get none: each
frame carries its own context in its header. Health and reflection calls are never traced.

The client interceptors (one object per call kind: grpc.aio sorts them by type) put the current
context into the metadata of every call, and time unary calls as CLIENT spans.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from runtime.daemon.interceptors import rewrap_handler

UNTRACED_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes and tools: never spans

StateGetter = Callable[[], Any]  # the tracing state, or None when off
Extract = Callable[[Any, Any], Any]  # (state, metadata pairs) -> parent context or None
Fail = Callable[[Any, Any, str], None]  # (state, span, message): mark the span failed


def _rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _status_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode | None:
    try:
        return context.code()
    except Exception:  # older grpc: no code() on the aio context
        return None


class TracingServerInterceptor(grpc.aio.ServerInterceptor):
    """Spans for a daemon's RPCs, parented by the caller's context in the metadata."""

    def __init__(self, state: StateGetter, extract: Extract, fail: Fail):
        self._state = state
        self._extract = extract
        self._fail = fail

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        state = self._state()
        method = details.method
        if handler is None or state is None or method.startswith(UNTRACED_METHODS) or (
                handler.request_streaming and handler.response_streaming):
            return handler
        parent = self._extract(state, details.invocation_metadata or ())
        attrs = _rpc_attributes(method)
        name = method.lstrip("/")
        if handler.request_streaming:
            return rewrap_handler(handler, lambda b: self._per_message_in(b, state, name, parent, attrs))
        if handler.response_streaming:
            return rewrap_handler(handler, lambda b: self._per_message_out(b, state, name, parent, attrs))
        return rewrap_handler(handler, lambda b: self._unary(b, state, name, parent, attrs))

    def _unary(self, behaviour: Callable[..., Any], state: Any, name: str, parent: Any,
               attrs: dict[str, str]) -> Callable[..., Any]:
        if not inspect.iscoroutinefunction(behaviour):
            return behaviour
        fail = self._fail

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with state.tracer.start_as_current_span(name, context=parent, kind=state.trace.SpanKind.SERVER,
                                                    attributes=attrs, record_exception=False,
                                                    set_status_on_exception=False) as span:
                try:
                    return await behaviour(request, context)
                except grpc.aio.AbortError:
                    code = _status_code(context)
                    if code is not None:
                        span.set_attribute("rpc.grpc.status_code", code.value[0])
                    fail(state, span, code.name if code is not None else "aborted")
                    raise
                except Exception as e:
                    fail(state, span, f"{type(e).__name__}: {e}")
                    raise

        return call

    def _per_message_in(self, behaviour: Callable[..., Any], state: Any, name: str, parent: Any,
                        attrs: dict[str, str]) -> Callable[..., Any]:
        if not inspect.iscoroutinefunction(behaviour):
            return behaviour

        async def timed(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            span = None
            try:
                async for msg in requests:
                    if span is not None:
                        span.end()
                    span = state.tracer.start_span(f"{name} message", context=parent,
                                                   kind=state.trace.SpanKind.SERVER, attributes=attrs)
                    yield msg
            finally:
                if span is not None:
                    span.end()

        async def call(request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await behaviour(timed(request_iterator), context)

        return call

    def _per_message_out(self, behaviour: Callable[..., Any], state: Any, name: str, parent: Any,
                         attrs: dict[str, str]) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behaviour):
            return behaviour

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for item in behaviour(request, context):
                span = state.tracer.start_span(f"{name} send", context=parent, kind=state.trace.SpanKind.SERVER,
                                               attributes=attrs)
                try:
                    yield item
                finally:
                    span.end()

        return stream


def _with_context(state: Any, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    """``details`` with the current context's traceparent/tracestate added to its metadata."""
    carrier: dict[str, str] = {}
    state.propagator.inject(carrier)
    if not carrier:
        return details
    metadata = [(k, v) for k, v in (details.metadata or ()) if k not in carrier]
    metadata.extend(carrier.items())
    return details._replace(metadata=grpc.aio.Metadata(*metadata))


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, state: StateGetter, fail: Fail):
        self._state, self._fail = state, fail

    async def intercept_unary_unary(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        state = self._state()
        if state is None:
            return await continuation(details, request)
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        with state.tracer.start_as_current_span(method.lstrip("/"), kind=state.trace.SpanKind.CLIENT,
                                                attributes=_rpc_attributes(method), record_exception=False,
                                                set_status_on_exception=False) as span:
            call = await continuation(_with_context(state, details), request)
            try:
                await call
            except grpc.aio.AioRpcError as e:
                span.set_attribute("rpc.grpc.status_code", e.code().value[0])
                self._fail(state, span, e.code().name)
            return call


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, state: StateGetter):
        self._state = state

    async def intercept_unary_stream(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        state = self._state()
        return await continuation(details if state is None else _with_context(state, details), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, state: StateGetter):
        self._state = state

    async def intercept_stream_unary(self, continuation: Any, details: grpc.aio.ClientCallDetails,
                                     request_iterator: Any) -> Any:
        state = self._state()
        return await continuation(details if state is None else _with_context(state, details), request_iterator)


def client_interceptors(state: StateGetter, fail: Fail) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors for runtime.wire.security.CLIENT_INTERCEPTORS (frame streams get none)."""
    return [_UnaryUnary(state, fail), _UnaryStream(state), _StreamUnary(state)]
