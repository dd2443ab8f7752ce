"""The Inference servicer: admission control, decode + tail in an executor or, for a lone frame, on the event
loop's thread (``inline_compute_seconds``); the tails themselves: runtime.worker.tailcache."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import torch

from runtime.contracts.errors import (
    CODE_NUMBERS,
    EdgesplitError,
    InvalidInput,
    Overloaded,
    PreconditionFailed,
    Unavailable,
)
from runtime.daemon.auth import check_acts_for_agent, current_identity
from runtime.daemon.streams import StreamSlots
from runtime.daemon.tracing import enabled as tracing_enabled
from runtime.daemon.tracing import span, worker_frame
from runtime.models.slicing import SplitPoint
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.proto.edgesplit.v1 import tensor_pb2
from runtime.wire.asyncutil import wait_set
from runtime.wire.budget import ByteBudget
from runtime.wire.chain import MAX_HOPS, check_route
from runtime.wire.codec import Codec, decode_tensor, encode_output, wire_bytes
from runtime.wire.framewire import parse_request
from runtime.wire.handoff import ComputeThreads, Then, submit
from runtime.wire.jpeg import INPUT_IMAGE_CODECS
from runtime.wire.security import AGENT, WORKER
from runtime.worker import probe
from runtime.worker.cancel import CancelledFrames
from runtime.worker.config import WorkerConfig
from runtime.worker.forward import NextTiers, Route
from runtime.worker.metrics import WorkerMetrics
from runtime.worker.streaming import StreamSession
from runtime.worker.tailcache import Tail, TailCache

logger = logging.getLogger(__name__)

P = TypeVar("P")  # run_admitted: what prepare() gives compute
R = TypeVar("R")  # run_admitted: what compute returns

MAX_ID_LEN = 256


def _check_header(h: pb.FrameHeader) -> None:
    check_acts_for_agent(h.agent_id)  # an agent sends (and cancels) frames for its own id only
    if not h.model_id:
        raise InvalidInput("header.model_id is empty; name a model (see 'edgesplit models')")
    if not h.split_id:
        raise InvalidInput("header.split_id is empty; name a split point (see 'edgesplit models MODEL')")
    for name in ("agent_id", "model_id", "split_id", "model_digest", "tl_id", "end_split"):
        if len(getattr(h, name)) > MAX_ID_LEN:
            raise InvalidInput(f"header.{name} is longer than {MAX_ID_LEN} characters")
    if len(h.next_hops) > MAX_HOPS:
        raise InvalidInput(f"header.next_hops names {len(h.next_hops)} hops; at most {MAX_HOPS} are allowed")
    for i, hop in enumerate(h.next_hops):
        for name in ("address", "end_split", "codec"):
            if len(getattr(hop, name)) > MAX_ID_LEN:
                raise InvalidInput(f"header.next_hops[{i}].{name} is longer than {MAX_ID_LEN} characters")


check_header = _check_header  # public: other servicers on the worker (runtime.worker.tiles) check headers alike


def _check_shape(tail: Tail, shape: list[int], dtype: str, max_batch: int) -> None:
    want = tail.input_shape
    if len(shape) != len(want) or list(shape[1:]) != list(want[1:]) or not 1 <= (shape[0] if shape else 0) <= max_batch:
        raise InvalidInput(
            f"tensor shape {list(shape)} does not fit split {tail.split.name!r} of {tail.model.name}: "
            f"expected [N, {', '.join(map(str, want[1:]))}] with 1 <= N <= {max_batch} (--max-batch)"
        )
    want_dtype = str(tail.split.dtype).replace("torch.", "")
    if dtype != want_dtype:
        raise InvalidInput(f"tensor dtype {dtype!r} does not fit split {tail.split.name!r}: expected {want_dtype!r}")


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, config: WorkerConfig, metrics: WorkerMetrics):
        self.config = config
        self.metrics = metrics
        # decode + tail (and model loads): dedicated threads, a frame's result posted straight to the loop
        self.executor = ComputeThreads(config.max_concurrency, "tail", on_shutdown=lambda: Unavailable(
            "worker is shutting down; send this frame to another worker or run it locally"))
        self.tails = TailCache(config, self.executor, metrics)
        self.next = NextTiers(config, metrics)  # worker chaining: where middle slices are forwarded
        self.cancelled = CancelledFrames(metrics)  # frames their sender gave up on (StreamRequest.cancel)
        self._admitted = 0  # queue slots taken: frames, weighted by their batch size
        self._weights: dict[int, int] = {}  # id(executor job) -> the slots its frame took
        self._waiting = 0  # admitted frames not yet started; changed from the loop and tail threads
        self._count_lock = threading.Lock()
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        self._stream_queues: set[asyncio.Queue] = set()  # each open InferStream's result queue (see end_streams)
        # open InferStreams per authenticated agent or worker and in all (runtime.daemon.streams); operators and
        # callers of a worker without authentication (loopback only) count in the total
        self.stream_slots = StreamSlots(
            "InferStream", config.max_streams_per_caller, config.max_streams, roles=(AGENT, WORKER), where="this worker",
            per_caller_hint=" (--max-streams-per-caller); run one agent process per identity",
            total_hint="send frames to another worker or run them locally, or raise --max-streams",
            on_shed=lambda reason: metrics.streams_shed.labels(reason).inc())
        self.unsent_results = 0  # results of all streams computed or queued and not yet sent (backpressure)
        # bytes in incomplete chunked frames, all streams together (runtime.wire.budget)
        self.reassembly = ByteBudget(config.max_reassembly_bytes, config.reassembly_timeout_seconds)

    # -- admission ---------------------------------------------------------------------------

    def _admit(self, weight: int = 1) -> None:
        """Take ``weight`` queue slots (a frame's batch size: a batch of 8 is 8 frames' work)."""
        if self.draining:
            raise Unavailable("worker is shutting down; send this frame to another worker or run it locally")
        limit = self.config.max_concurrency + self.config.max_queue
        if self._admitted + weight > limit:
            raise Overloaded(
                f"worker queue is full ({self._admitted} slots taken, one per batch element, limit {limit}); retry later, "
                "lower the agent's window or add workers"
            )
        self._admitted += weight
        self._idle.clear()

    def _release(self, weight: int = 1) -> None:
        self._admitted -= weight
        if self._admitted == 0:
            self._idle.set()

    async def run_admitted(self, prepare: Callable[[], Awaitable[P]], compute: Callable[[P], R]) -> R:
        """For other servicers on this worker (runtime.worker.tiles): take a queue slot, await ``prepare()``,
        run ``compute(prepared)`` on the executor; the slot is freed when the compute really ends."""
        self._admit()
        job = None
        try:
            prepared = await prepare()
            job = asyncio.get_running_loop().run_in_executor(self.executor, compute, prepared)
            job.add_done_callback(self._job_done)
            return await asyncio.shield(job)
        finally:
            if job is None:
                self._release()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait (bounded) until no admitted frame is left; False on timeout."""
        return await wait_set(self._idle, timeout)

    def end_streams(self) -> None:
        """End every open InferStream with status OK (the drain calls it once no frame is left), so the
        server's stop finds no call to cancel: agents see the stream end and reconnect or run locally."""
        for queue in self._stream_queues:
            queue.put_nowait(None)

    # -- one frame ---------------------------------------------------------------------------

    async def resolve(self, h: pb.FrameHeader) -> Tail:
        """The tail (or, with ``end_split``, the middle slice) a header names, after every check that
        does not need the tensor."""
        _check_header(h)
        tail = self._named(h)
        if tail is None:
            tail = await self.tails.get(h.model_id, h.split_id)
        end = self._route_end(h, tail)
        return tail if end is None else await self.tails.sliced(tail, end)

    def _named(self, h: pb.FrameHeader) -> Tail | None:
        """The TL's tail a header names (PreconditionFailed: not held, or another model's), or the tail already
        loaded for its model and split; None: not loaded yet (``tails.get`` loads it)."""
        if not h.tl_id:
            return self.tails.loaded(h.model_id, h.split_id)
        tail = self.tails.tls.get(h.tl_id)
        if tail is None:
            raise PreconditionFailed(
                f"frame was encoded with Transfer Layer {h.tl_id!r}, which this worker does not hold; "
                "start the worker with that TL artifact (--tl PATH) or send frames without a TL"
            )
        if h.model_id != tail.model.name or h.split_id not in (tail.split.name, str(tail.split.index)):
            raise PreconditionFailed(
                f"Transfer Layer {h.tl_id} belongs to {tail.model.name}@{tail.split.name}, but the frame "
                f"names {h.model_id}@{h.split_id}; use the TL trained for this model and split"
            )
        return tail

    @staticmethod
    def _route_end(h: pb.FrameHeader, tail: Tail) -> SplitPoint | None:
        """Where this worker's slice ends (None: the whole tail), after the weights' digest check."""
        if h.model_digest and h.model_digest != tail.model.digest:
            raise PreconditionFailed(
                f"model {h.model_id!r} weights differ: agent has {h.model_digest}, worker has {tail.model.digest}; "
                "deploy the same weights on both"
            )
        return check_route(tail.model, tail.split, h.end_split, h.next_hops)  # NotFound / InvalidInput

    @worker_frame  # the frame's log ids and, when tracing is on, its worker.frame span (runtime.daemon.tracing)
    async def process(self, req: pb.InferRequest) -> pb.InferResult:
        """Admit, load the tail, decode and compute one frame. Raises EdgesplitError.

        The admission slot is held until the executor job ends, not until this coroutine does:
        a caller that cancels or times out cannot pile work up past the queue bound, and a
        drain waits for every job actually running.
        """
        weight = self._weight(req)
        self._admit(weight)
        job = None
        try:
            tail = await self.resolve(req.header)
            route = self.next.route(req.header, tail.end) if tail.end is not None else None
            admitted_at = self._accept(tail, req)
            if route is None and self._inline(tail, weight):  # on this thread: no hand-off either way
                result = self._compute(tail, req, admitted_at)  # the slot freed below (job is None)
            elif route is None:  # the result straight back to the loop; the slot freed when the compute ends
                job = submit(self.executor, lambda: self._compute(tail, req, admitted_at), lambda: self._release(weight))
                result = await job
            else:
                job = asyncio.get_running_loop().run_in_executor(self.executor, self._compute, tail, req, admitted_at,
                                                                 route.codec)
                self._weights[id(job)] = weight
                result = await self._forward(job, route, req.header)
            self.metrics.frames.labels(tail.model.name, tail.split.name, tail.tl_id or "none").inc()
            return result
        finally:
            if job is None:
                self._release(weight)

    def start(self, req: pb.InferRequest, then: Then) -> asyncio.Future[pb.InferResult] | None:
        """``process`` for a stream's frame in the common case, without a task (runtime.worker.streaming): its tail
        already loaded, not chained, tracing and inline compute off. Admits, checks and hands the decode + tail to
        the compute threads at once; ``then(result, error)`` runs on the loop in the callback that ends the compute
        (the slot given back, the frame counted), where a task would wake up first. Raises EdgesplitError as
        ``process`` does. None: not the common case, nothing done; ``process`` it."""
        h = req.header
        if h.end_split or self.config.inline_compute_seconds > 0 or tracing_enabled():
            return None
        weight = self._weight(req)
        self._admit(weight)
        try:  # process' checks, in its order (a TL not held: the same PreconditionFailed)
            _check_header(h)
            tail = self._named(h)
            if tail is None or self._route_end(h, tail) is not None:  # a tail to load (process loads it); a
                self._release(weight)  # route's end is not reached without end_split
                return None
            admitted_at = self._accept(tail, req)
        except BaseException:
            self._release(weight)
            raise

        def ended(result: pb.InferResult | None, error: BaseException | None) -> None:
            self._release(weight)
            if error is None:
                self.metrics.frames.labels(tail.model.name, tail.split.name, tail.tl_id or "none").inc()
            then(result, error)

        return self.executor.post(lambda: self._compute(tail, req, admitted_at), then=ended)

    def _weight(self, req: pb.InferRequest) -> int:
        shape = req.tensor.shape
        return min(max(shape[0] if shape else 1, 1), self.config.max_batch,  # admission by batch size
                   self.config.max_concurrency + self.config.max_queue)

    def _accept(self, tail: Tail, req: pb.InferRequest) -> float:
        """The checks that need the tensor's header, the frame counted as received and waiting: its admission time."""
        _check_shape(tail, list(req.tensor.shape), req.tensor.dtype, self.config.max_batch)
        if req.tensor.codec == tensor_pb2.CODEC_ANS and tail.entropy is None:
            raise PreconditionFailed(
                "the frame is entropy-coded (codec ans), which needs the transform Transfer Layer that coded "
                f"it; this frame names {('TL ' + tail.tl_id) if tail.tl_id else 'no TL'}: send tl_id with it"
            )
        if req.tensor.codec in INPUT_IMAGE_CODECS and (tail.split.index != 0 or tail.decoder is not None):
            raise PreconditionFailed(f"the frame is an input image (codec jpeg or pixels), which only split 0 ('input') "
                                     f"without a TL takes; this frame names split {tail.split.name!r}")
        self.metrics.received_bytes.inc(req.tensor.payload_size or len(req.tensor.buffer))  # reading buffer copies it
        with self._count_lock:
            self._waiting += 1
            self.metrics.queue_depth.set(self._waiting)
        return time.perf_counter()

    async def _forward(self, job: asyncio.Future, route: Route, header: pb.FrameHeader) -> pb.InferResult:
        """Wait for the slice, send its output to the next tier and answer with the final result.

        The admission slot is held until the forward ends too: the queue bound covers frames
        waiting on a next tier, and a drain waits for them.
        """
        try:
            times, tensor, t_enc = await asyncio.shield(job)
        except BaseException:
            job.add_done_callback(self._job_done)  # release once the compute has really ended
            raise
        try:
            with span("worker.forward", **{"edgesplit.next_tier": route.address}):
                res, rt = await self.next.forward(route, tensor)
        finally:
            self._release(self._weights.pop(id(job), 1))
        times.forward_seconds = t_enc + rt
        result = pb.InferResult(header=header, output=res.output, times=times)
        hop = result.hops.add(address=route.address, split_id=route.header.split_id, end_split=route.header.end_split,
                              encode_seconds=t_enc, round_trip_seconds=rt, wire_bytes=wire_bytes(tensor))
        hop.times.CopyFrom(res.times)
        result.hops.extend(res.hops)  # the stages after the next tier, as it reported them
        return result

    def _inline(self, tail: Tail, weight: int) -> bool:
        """Whether this frame's decode + tail run on the event loop's thread (``inline_compute_seconds``): only
        while it is the one frame admitted and at most one InferStream is open, and its tail's last compute took
        at most that long (per batch element, times this frame's batch). Anything arriving meanwhile (another stream's first frame, a Health or Probe call)
        waits at most that long, as behind a busy executor thread; the executor's two hand-offs are saved."""
        cap = self.config.inline_compute_seconds
        return (cap > 0 and self._admitted == weight and len(self._stream_queues) <= 1
                and tail.compute_seconds is not None and tail.compute_seconds * weight <= cap)

    def _job_done(self, job: asyncio.Future) -> None:
        self._release(self._weights.pop(id(job), 1))
        if not job.cancelled():
            job.exception()  # retrieved here too, so an abandoned job's error is not reported as lost

    def _compute(self, tail: Tail, req: pb.InferRequest, admitted_at: float, forward_codec: Codec | None = None):
        """Decode and run the tail: an InferResult. With ``forward_codec`` (a chained frame) the slice
        output is encoded for the next tier instead: (StageTimes, wire tensor, encode seconds)."""
        t0 = time.perf_counter()
        with self._count_lock:
            self._waiting -= 1
            self.metrics.queue_depth.set(self._waiting)
        self.cancelled.check(req.header)  # DeadlineExceeded: its sender gave up on it while it waited
        self.metrics.inflight.inc()
        try:
            shared = tail.writes_input is False  # a raw payload as a view of the received bytes (read only)
            x_in = decode_tensor(req.tensor, max_bytes=self.config.max_tensor_bytes, model=tail.entropy,
                                 spec=tail.model.spec, shared=shared)
            version = x_in._version  # bumped by any in-place write into it or a view of it
            with torch.inference_mode():
                x = tail.decoder(x_in) if tail.decoder is not None else x_in  # TL decoding counts as decode
                t1 = time.perf_counter()
                y = tail.module(x)
            t2 = time.perf_counter()
            self._check_written(tail, x_in._version != version, shared)
        finally:
            self.metrics.inflight.dec()
        tail.compute_seconds = (t2 - t0) / max(1, x_in.shape[0] if x_in.dim() else 1)  # per batch element
        self.metrics.queue_seconds.observe(t0 - admitted_at)
        self.metrics.decode_seconds.observe(t1 - t0)
        self.metrics.tail_seconds.observe(t2 - t1)
        times = pb.StageTimes(queue_seconds=t0 - admitted_at, decode_seconds=t1 - t0, tail_seconds=t2 - t1)
        if forward_codec is not None:
            msg = forward_codec.encode(y)
            t_enc = time.perf_counter() - t2
            self.metrics.forward_encode_seconds.observe(t_enc)
            return times, msg, t_enc
        return pb.InferResult(header=req.header, output=encode_output(y), times=times)

    @staticmethod
    def _check_written(tail: Tail, written: bool, shared: bool) -> None:
        """Learn from a frame decoded to a copy whether the tail writes its input (a traced graph does the same
        every frame); a tail that wrote into a shared frame after all is decoded to a copy from then on."""
        if tail.writes_input is None or (written and not tail.writes_input):
            if written and shared:
                logger.warning("the tail %s@%s wrote into its input, received bytes; its frames are copied from now "
                               "on", tail.model.name, tail.split.name)
            tail.writes_input = written

    def _error_result(self, header: pb.FrameHeader | None, err: EdgesplitError) -> pb.InferResult:
        self.metrics.errors.labels(err.code.name).inc()
        logger.debug("frame refused: %s %s", err.code.name, err,
                     extra={"frame": header.seq, "agent": header.agent_id, "plan": header.plan_version} if header else None)
        return pb.InferResult(header=header, code=CODE_NUMBERS[err.code], message=str(err))

    # -- RPCs --------------------------------------------------------------------------------

    async def Prepare(self, request: pb.PrepareRequest, context: grpc.aio.ServicerContext) -> pb.PrepareResult:
        t0 = time.perf_counter()
        next_tier = ""  # an EdgesplitError raised here becomes its status (and is counted) in the daemon's interceptor
        tail = await self.resolve(request.header)
        if tail.end is not None:  # chained: the next tier must accept the rest of the route too
            route = self.next.route(request.header, tail.end)
            remaining = context.time_remaining()
            await self.next.prepare(route, None if remaining is None else remaining - 0.05)
            next_tier = route.address
        return pb.PrepareResult(
            input_shape=list(tail.input_shape),
            input_dtype=str(tail.split.dtype).replace("torch.", ""),
            model_digest=tail.model.digest,
            load_seconds=time.perf_counter() - t0,
            tl_id=tail.tl_id or "",
            next_tier=next_tier,
        )

    async def Probe(self, request: pb.ProbeRequest, context: grpc.aio.ServicerContext) -> pb.ProbeReply:
        self.metrics.probe_bytes.inc(len(request.payload))
        return probe.answer(request)  # InvalidInput over the limit

    async def Infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferResult:
        # errors become statuses (EdgesplitError its own, a bug INTERNAL) in the daemon's interceptor
        if request.tensor.chunks > 1:
            raise InvalidInput("Infer takes a whole frame (chunks <= 1); send larger tensors on InferStream")
        return await self.process(request)

    async def InferStream(self, request_iterator, context: grpc.aio.ServicerContext):
        """One result per frame, in completion order; a bad frame gets an error result, not a dead stream
        (runtime.worker.streaming). Counted by ``stream_slots``: a caller's newer stream ends its oldest, and
        beyond --max-streams a new one is refused RESOURCE_EXHAUSTED before anything is allocated."""
        with self.stream_slots.hold(current_identity(), context):
            session = StreamSession(self, request_iterator, context)
            session.open()
            try:
                while (result := await session.next()) is not None:
                    yield result
                    session.sent()
            finally:
                session.close()


class _Handlers:
    """Stands in for a server to take the generated registration's handlers (add_inference_servicer)."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, dict(handlers)


def add_inference_servicer(service: InferenceService, server) -> None:
    """``inference_pb2_grpc.add_InferenceServicer_to_server``, but InferStream's requests are read by
    runtime.wire.framewire.parse_request: a frame's payload stays a view of the bytes gRPC received (no
    protobuf copies of it; the same messages on the wire). Every other method is the generated one."""
    taken = _Handlers()
    pb_grpc.add_InferenceServicer_to_server(service, taken)
    stream = taken.handlers["InferStream"]
    taken.handlers["InferStream"] = grpc.stream_stream_rpc_method_handler(
        stream.stream_stream, request_deserializer=parse_request, response_serializer=stream.response_serializer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(taken.service, taken.handlers),))
    server.add_registered_method_handlers(taken.service, taken.handlers)
