"""Tracing with OpenTelemetry and W3C trace context: one frame is one trace across agent and workers.

Off by default (``trace_exporter = "none"``) and then free: no OpenTelemetry import, no interceptor,
and each frame hook below is one ``is None`` test (besides the frame's log ids, which the hooks set
whether tracing is on or not: runtime.daemon.logcontext). On (:func:`configure`), a process has:

* **per frame** (the agent's and the workers' frame hooks): ``agent.frame`` with children
  ``agent.board_queue``, ``agent.head``, ``agent.tl_encode``, ``agent.encode``, ``agent.send``,
  ``agent.wait``, ``agent.local_tail``/``agent.refine``; on each worker ``worker.frame`` (a child of
  the sender's span) with ``worker.receive`` (first message to reassembled frame), ``worker.queue``,
  ``worker.decode``, ``worker.tail``, and for a chained frame ``worker.forward.encode`` and
  ``worker.forward`` (the next worker's ``worker.frame`` is its child). Many frames share one
  stream, so a frame's context travels in ``FrameHeader.trace_context`` (``traceparent`` and
  ``tracestate``), not in the stream's metadata. Stage spans are laid out from the stage times
  the frame already measures (the compute runs in executor threads); send, wait and forward
  are timed as they happen.
* **per RPC** (:class:`TracingServerInterceptor`, installed by the daemon scaffold; the client
  interceptor in every channel): unary calls (RegisterAgent, RegisterWorker, Prepare, Probe, ...)
  get a CLIENT span on the caller and a SERVER span on the daemon, joined by ``traceparent`` /
  ``tracestate`` in the gRPC metadata. A client stream (ReportTelemetry) gets one span per message
  received, covering the handler's work on it (the planner's telemetry decision); a server stream
  (WatchPlan) one span per message sent (the plan push). Frame streams get none (see above).

Sampling: ``trace_sample_ratio`` of the traces that start here (an agent's frames); a span with a
remote parent follows the parent's decision (ParentBased), so a trace is whole or absent.
Exporters: ``otlp`` (gRPC to a collector, ``trace_endpoint`` or the ``OTEL_EXPORTER_OTLP_*``
variables), ``console`` (JSON on stderr), ``file`` (one JSON span per line appended to
``trace_endpoint``). Spans are exported in batches (``OTEL_BSP_*`` variables) and flushed at exit.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

from runtime.contracts.config import field
from runtime.contracts.errors import InvalidInput
from runtime.daemon.logcontext import log_scope
from runtime.daemon.tracing_rpc import TracingServerInterceptor, client_interceptors

logger = logging.getLogger(__name__)

EXPORTERS = ("none", "otlp", "console", "file")
MAX_TRACEPARENT_CHARS = 128  # a version-00 traceparent is 55; longer ones (future versions) up to this are read
MAX_TRACESTATE_CHARS = 512  # the W3C recommendation for what a vendor must propagate
CONTEXT_KEYS = ("traceparent", "tracestate")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
_NULL: AbstractContextManager[None] = nullcontext()


@dataclass(frozen=True)
class TracingSettings:
    """The tracing fields every daemon's configuration inherits (TOML, EDGESPLIT_<SECTION>_*, flags)."""

    trace_exporter: str = field("none", "where spans go: none (off, no cost), otlp (a collector over gRPC), "
                                        "console (stderr) or file (JSON lines at --trace-endpoint)")
    trace_endpoint: str = field("", "otlp: collector URL, e.g. http://collector:4317 (default: "
                                    "$OTEL_EXPORTER_OTLP_ENDPOINT or localhost:4317); file: the path to append to")
    trace_sample_ratio: float = field(1.0, "share of the traces started here that are recorded (0..1); "
                                           "spans with a remote parent follow its decision")


@dataclass
class _State:
    provider: Any  # opentelemetry.sdk.trace.TracerProvider
    tracer: Any
    trace: Any  # the opentelemetry.trace module
    propagator: Any  # TraceContextTextMapPropagator
    interceptors: list[Any]  # this process's client interceptors (in runtime.wire.security.CLIENT_INTERCEPTORS)


_state: _State | None = None
_atexit_registered = False


def enabled() -> bool:
    return _state is not None


def check_settings(settings: TracingSettings) -> None:
    """InvalidInput with the fix for a bad exporter name, ratio or missing file path."""
    if settings.trace_exporter not in EXPORTERS:
        raise InvalidInput(f"trace_exporter = {settings.trace_exporter!r}: choose one of {', '.join(EXPORTERS)}")
    if not 0.0 <= settings.trace_sample_ratio <= 1.0:
        raise InvalidInput(f"trace_sample_ratio = {settings.trace_sample_ratio!r}: give a share between 0 and 1")
    if settings.trace_exporter == "file":
        if not settings.trace_endpoint:
            raise InvalidInput("trace_exporter 'file' needs --trace-endpoint PATH (the JSON-lines file to append to)")
        folder = os.path.dirname(os.path.abspath(settings.trace_endpoint))
        if not os.path.isdir(folder):
            raise InvalidInput(f"--trace-endpoint {settings.trace_endpoint}: folder {folder} does not exist")


def _make_exporter(settings: TracingSettings) -> Any:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    if settings.trace_exporter == "console":
        return ConsoleSpanExporter(out=sys.stderr)
    if settings.trace_exporter == "file":
        out = open(settings.trace_endpoint, "a", buffering=1)  # noqa: SIM115 (line-buffered; open until the process exits)
        return ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=settings.trace_endpoint or None)


def configure(settings: TracingSettings, service: str, exporter: Any = None) -> bool:
    """Turn tracing on for this process as ``service`` (e.g. ``edgesplit-worker``), or off for
    ``none``. ``exporter``: a SpanExporter to use instead of the settings' (tests: in-memory; spans
    are then exported as each ends). Channels opened before this call keep no interceptor."""
    global _state, _atexit_registered
    check_settings(settings)
    shutdown()
    if settings.trace_exporter == "none" and exporter is None:
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from runtime.wire.security import CLIENT_INTERCEPTORS

    attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service}
    provider = TracerProvider(resource=Resource.create(attrs),
                              sampler=ParentBased(TraceIdRatioBased(settings.trace_sample_ratio)))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        provider.add_span_processor(BatchSpanProcessor(_make_exporter(settings)))
    interceptors = client_interceptors(lambda: _state, _fail)
    CLIENT_INTERCEPTORS.extend(interceptors)
    _state = _State(provider, provider.get_tracer("edgesplit"), trace, TraceContextTextMapPropagator(), interceptors)
    if not _atexit_registered:
        atexit.register(shutdown)
        _atexit_registered = True
    logger.info("tracing on: %s spans of %s, sample ratio %g", settings.trace_exporter if exporter is None
                else type(exporter).__name__, service, settings.trace_sample_ratio)
    return True


def shutdown() -> None:
    """Flush and stop (at exit, or before :func:`configure` again); tracing is off afterwards."""
    global _state
    state, _state = _state, None
    if state is None:
        return
    from runtime.wire.security import CLIENT_INTERCEPTORS

    CLIENT_INTERCEPTORS[:] = [i for i in CLIENT_INTERCEPTORS if all(i is not own for own in state.interceptors)]
    state.provider.shutdown()


# -- context in frame headers and metadata --------------------------------------------------------


def _carrier(pairs: Any) -> dict[str, str]:
    """traceparent/tracestate from ``pairs`` (a map or (key, value) items), within their limits."""
    items = pairs.items() if hasattr(pairs, "items") else pairs
    out: dict[str, str] = {}
    for key, value in items:
        if key in CONTEXT_KEYS and isinstance(value, str):
            limit = MAX_TRACEPARENT_CHARS if key == "traceparent" else MAX_TRACESTATE_CHARS
            if len(value) <= limit:
                out[key] = value
    return out if "traceparent" in out else {}


def inject_frame(header: Any) -> None:
    """Write the current span's context into ``header.trace_context`` (a FrameHeader about to be
    sent). Off: the header is left as it is (a forwarding worker passes the sender's context on)."""
    state = _state
    if state is None:
        return
    carrier: dict[str, str] = {}
    state.propagator.inject(carrier)
    header.trace_context.clear()
    header.trace_context.update(carrier)


def _extract(state: _State, pairs: Any) -> Any:
    carrier = _carrier(pairs)
    return state.propagator.extract(carrier) if carrier else None


_arrived: Any = None  # ContextVar[int]: when the first message of the frame being read arrived (ns)


def frame_arrived() -> None:
    """The first message of a frame arrived (a stream reader calls it); its ``worker.receive`` span starts here."""
    if _state is None:
        return
    global _arrived
    if _arrived is None:
        import contextvars

        _arrived = contextvars.ContextVar("edgesplit_frame_arrived", default=0)
    _arrived.set(time.time_ns())


def span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """A live child span of the current one for the ``with`` block (nothing when off)."""
    state = _state
    if state is None:
        return _NULL
    manager: AbstractContextManager[Any] = state.tracer.start_as_current_span(name, attributes=attributes)
    return manager


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the current span, for log lines; None when off or outside a span."""
    state = _state
    if state is None:
        return None
    ctx = state.trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def _child(state: _State, parent: Any, name: str, start_ns: int, seconds: float) -> int:
    """A finished child span of ``parent`` from ``start_ns`` lasting ``seconds``; returns its end (ns)."""
    end = start_ns + int(seconds * 1e9)
    ctx = state.trace.set_span_in_context(parent)
    state.tracer.start_span(name, context=ctx, start_time=start_ns).end(end_time=end)
    return end


def _fail(state: _State, span_: Any, message: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span_.set_status(Status(StatusCode.ERROR, message[:200]))


# -- frame hooks ---------------------------------------------------------------------------------


def worker_frame(fn: F) -> F:
    """Decorates the worker's ``process(self, req)``: log ids of the frame, and its ``worker.frame`` span."""

    @functools.wraps(fn)
    async def traced(self: Any, req: Any) -> Any:
        h = req.header
        with log_scope(frame=h.seq, plan=h.plan_version, agent=h.agent_id, model=h.model_id, split=h.split_id):
            state = _state
            if state is None:
                return await fn(self, req)
            return await _worker_span(state, fn, self, req)

    return traced  # type: ignore[return-value]


async def _worker_span(state: _State, fn: Callable[..., Awaitable[Any]], self: Any, req: Any) -> Any:
    h = req.header
    begun = time.time_ns()
    arrived = _arrived.get() if _arrived is not None else 0
    start = arrived if 0 < arrived <= begun else begun
    attrs = {"edgesplit.frame.seq": h.seq, "edgesplit.agent.id": h.agent_id, "edgesplit.plan.version": h.plan_version,
             "edgesplit.model": h.model_id, "edgesplit.split": h.split_id, "edgesplit.end_split": h.end_split,
             "edgesplit.wire_bytes": len(req.tensor.buffer)}
    frame_span = state.tracer.start_span("worker.frame", context=_extract(state, h.trace_context),
                                         kind=state.trace.SpanKind.SERVER, start_time=start, attributes=attrs)
    try:
        with state.trace.use_span(frame_span, record_exception=False, set_status_on_exception=False):
            result = await fn(self, req)
    except BaseException as e:
        _fail(state, frame_span, f"{type(e).__name__}: {e}")
        frame_span.end()
        raise
    end = time.time_ns()
    if not frame_span.is_recording():  # not sampled: no stage spans to lay out
        frame_span.end(end_time=end)
        return result
    if start < begun:
        _child(state, frame_span, "worker.receive", start, (begun - start) / 1e9)
    t = result.times
    at = end - int(t.forward_seconds * 1e9)  # stages laid out back from the end (forward, then the compute)
    if t.forward_seconds and result.hops:
        _child(state, frame_span, "worker.forward.encode", at, result.hops[0].encode_seconds)
    at -= int((t.queue_seconds + t.decode_seconds + t.tail_seconds) * 1e9)
    for name, seconds in (("worker.queue", t.queue_seconds), ("worker.decode", t.decode_seconds),
                          ("worker.tail", t.tail_seconds)):
        at = _child(state, frame_span, name, at, seconds)
    frame_span.end(end_time=end)
    return result


AGENT_STAGES = ("board_queue", "head", "tl_encode", "encode", "board_return")  # before the send, in order (FrameResult.times)
AGENT_AFTER = ("local_tail", "refine")  # after the result or the fallback decision


def agent_frame(fn: F) -> F:
    """Decorates the agent's ``_infer(self, plan, seq, ...)``: the frame's log ids (seq, plan version,
    agent id) and, when on, its ``agent.frame`` span (a root: one frame, one trace), with the stages
    of the returned FrameResult's ``times`` as children."""

    @functools.wraps(fn)
    async def traced(self: Any, plan: Any, seq: int, *args: Any, **kwargs: Any) -> Any:
        with log_scope(frame=seq, plan=plan.version, agent=getattr(self, "agent_id", "")):
            state = _state
            if state is None:
                return await fn(self, plan, seq, *args, **kwargs)
            return await _agent_span(state, fn, self, (plan, seq, *args), kwargs)

    return traced  # type: ignore[return-value]


def parallel_frame(fn: F) -> F:
    """Decorates the parallel-stage agent's ``infer(self, seq, ...)`` (``self.version``: its plan): log ids
    and the ``agent.frame`` span, under which each tile's InferTile call is a CLIENT span (gRPC metadata)."""

    @functools.wraps(fn)
    async def traced(self: Any, seq: int, *args: Any, **kwargs: Any) -> Any:
        with log_scope(frame=seq, plan=getattr(self, "version", 0)):
            state = _state
            if state is None:
                return await fn(self, seq, *args, **kwargs)
            return await _agent_span(state, fn, self, (seq, *args), kwargs)

    return traced  # type: ignore[return-value]


async def _agent_span(state: _State, fn: Callable[..., Awaitable[Any]], self: Any, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Any:
    start = time.time_ns()
    frame_span = state.tracer.start_span("agent.frame", kind=state.trace.SpanKind.PRODUCER, start_time=start)
    try:
        with state.trace.use_span(frame_span, record_exception=False, set_status_on_exception=False):
            result = await fn(self, *args, **kwargs)
    except BaseException as e:
        _fail(state, frame_span, f"{type(e).__name__}: {e}")
        frame_span.end()
        raise
    end = time.time_ns()
    _agent_children(state, frame_span, result, start, end)
    frame_span.end(end_time=end)
    return result


def _agent_children(state: _State, frame_span: Any, result: Any, start: int, end: int) -> None:
    if not frame_span.is_recording():  # not sampled: no stage spans to lay out
        return
    times = result.times
    frame_span.set_attributes({"edgesplit.frame.seq": result.seq, "edgesplit.plan.version": result.plan_version,
                               "edgesplit.split": result.split, "edgesplit.codec": result.codec,
                               "edgesplit.where": result.where, "edgesplit.worker": result.worker or "",
                               "edgesplit.wire_bytes": result.wire_bytes})
    if result.fallback_reason:
        frame_span.set_attribute("edgesplit.fallback_reason", result.fallback_reason[:200])
    at = start
    for stage in AGENT_STAGES:
        if stage in times:
            at = _child(state, frame_span, f"agent.{stage}", at, times[stage])
    after = [s for s in AGENT_AFTER if s in times]
    at = end - int(sum(times[s] for s in after) * 1e9)
    for stage in after:
        at = _child(state, frame_span, f"agent.{stage}", at, times[stage])


def server_interceptor() -> TracingServerInterceptor | None:
    """The daemon scaffold's interceptor when tracing is on (spans per RPC); None when off."""
    return TracingServerInterceptor(lambda: _state, _extract, _fail) if _state is not None else None
