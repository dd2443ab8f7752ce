"""Server interceptors shared by every daemon.

:class:`ErrorStatusInterceptor` is the one place a raised exception becomes a gRPC status
(:func:`runtime.contracts.errors.to_status`): servicers simply raise. An EdgesplitError answers
with its own code and message; anything else is a bug, logged with its traceback and answered
INTERNAL ``internal error: Type: message`` (never the UNKNOWN grpc would send). It wraps unary
handlers and the failure of stream handlers; per-frame statuses inside a stream stay the
servicer's business. A status the servicer set itself with ``context.abort`` passes through.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from runtime.contracts.errors import EdgesplitError, to_status

logger = logging.getLogger(__name__)

# Called with (full method name, status code name) for each exception mapped to a status.
ErrorHook = Callable[[str, str], None]


class ErrorStatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by handlers to their status; ``on_error`` counts them (metrics)."""

    def __init__(self, on_error: ErrorHook | None = None):
        self._on_error = on_error

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _wrap_handler(handler, handler_call_details.method, self._abort)

    async def _abort(self, method: str, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        code, message = to_status(exc)
        if not isinstance(exc, EdgesplitError):
            logger.error("%s failed", method, exc_info=exc)
        else:
            logger.debug("%s: %s %s", method, code.name, message)
        if self._on_error is not None:
            self._on_error(method, code.name)
        await context.abort(code, message)


_Abort = Callable[[str, grpc.aio.ServicerContext, Exception], Awaitable[None]]


_HANDLER_KINDS = (("unary_unary", grpc.unary_unary_rpc_method_handler),
                  ("unary_stream", grpc.unary_stream_rpc_method_handler),
                  ("stream_unary", grpc.stream_unary_rpc_method_handler),
                  ("stream_stream", grpc.stream_stream_rpc_method_handler))


def rewrap_handler(handler: grpc.RpcMethodHandler,
                   wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> grpc.RpcMethodHandler:
    """The same method handler (kind, (de)serializers) with its behaviour replaced by ``wrap(behaviour)``;
    the handler itself when ``wrap`` returns the behaviour unchanged. Every interceptor here uses it."""
    for attr, make in _HANDLER_KINDS:
        behaviour = getattr(handler, attr)
        if behaviour is None:
            continue
        wrapped = wrap(behaviour)
        if wrapped is behaviour:
            return handler
        return make(wrapped, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
    return handler


def _wrap_handler(handler: grpc.RpcMethodHandler, method: str, abort: _Abort) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped by :func:`_guard` (sync behaviours are left as they are)."""
    return rewrap_handler(handler, lambda behaviour: _guard(behaviour, method, abort))


def _guard(behaviour: Callable[..., Any], method: str, abort: _Abort) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behaviour):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in behaviour(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                await abort(method, context, e)

        return stream
    if inspect.iscoroutinefunction(behaviour):
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behaviour(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                await abort(method, context, e)

        return call
    return behaviour


def end_call(context: Any, task: Any, code: grpc.StatusCode, message: str) -> None:
    """End a running call from outside its handler: its status is sent from a task of its own (it goes out
    behind any results still queued for the client) and the handler's task is cancelled at once, so the
    call's state is freed now. Used for stalled streams (runtime.worker.backpressure) and revoked callers."""
    if context is not None:
        ending = asyncio.ensure_future(context.abort(code, message))
        ending.add_done_callback(_retrieve)
    if task is not None:
        task.cancel()


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # abort() ends by raising AbortError (or fails once the client left): expected
