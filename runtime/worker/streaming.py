"""One InferStream on the worker: read messages, rebuild frames, run each as it completes, send one
result per frame in completion order (a bad frame gets an error result, not a dead stream).

Each result carries the frame's receive times and the time it left, on the worker's monotonic clock
(InferResult.received_first_seconds / received_last_seconds / sent_seconds), so the agent can take the
worker's hold off its round trip and get a bandwidth sample from every frame (issue 11).

A ``StreamProbe`` on the stream (issue 14) is answered with an InferResult holding only the probe, queued
behind the results before it: the agent's idle liveness probe, one write on the open stream where a unary
Health/Check was a new call. The worker says it answers them in the stream's initial metadata
(runtime.wire.streamprobe, sent as the stream opens); an agent that sees no such key keeps Health/Check.
Limits (SECURITY.md): a probe message over ``MAX_STREAM_PROBE_BYTES`` ends the stream INVALID_ARGUMENT, and
probes beyond ``--max-stream-probes-per-second`` (a bucket of as many, refilled at that rate) end it
RESOURCE_EXHAUSTED; neither is buffered (an agent sends one at a time, about two a second idle).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import grpc

from runtime.contracts.errors import EdgesplitError, as_error
from runtime.daemon.auth import acts_for_agent
from runtime.daemon.interceptors import end_call
from runtime.daemon.tracing import frame_arrived
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.wire.streamprobe import (
    DEFAULT_STREAM_PROBES_PER_SECOND,
    MAX_STREAM_PROBE_BYTES,
    PROBE_RATE,
    PROBE_SIZE,
    STREAM_PROBE_METADATA,
    ProbeBucket,
)
from runtime.wire.transport import FrameAssembler
from runtime.worker.backpressure import ResultSlots, StallGuard

logger = logging.getLogger(__name__)


class StreamSession:
    """The state of one InferStream: its assembler, result queue, frame tasks and backpressure slots."""

    def __init__(self, service: Any, request_iterator, context: Any = None):  # service: the InferenceService
        self.service = service
        self.requests = request_iterator
        self.context = context  # the RPC's ServicerContext: a stalled stream is ended with a status through it
        self.assembler = FrameAssembler(service.config.max_tensor_bytes, service.reassembly)
        self.out: asyncio.Queue[pb.InferResult | None] = asyncio.Queue()
        self.tasks: set[asyncio.Future] = set()  # frames not yet answered: their tasks or compute jobs
        self.slots = ResultSlots(service.config.max_stream_results, service)  # backpressure (runtime.worker.backpressure)
        self.origin = ("", 0)  # agent id and stream epoch of this stream's frames (what a cancel refers to)
        self.dropped_seq: int | None = None  # the last frame refused part-way; its late chunks are ignored
        self.first_at = 0.0  # monotonic time the open frame's first message arrived
        self._read_task: asyncio.Task | None = None
        self.stall: StallGuard | None = None  # ends the stream when the client stops reading (runtime.worker.backpressure)
        rate = float(getattr(service.config, "max_stream_probes_per_second", DEFAULT_STREAM_PROBES_PER_SECOND))
        self.probes = ProbeBucket(rate)  # StreamProbe messages answered (the rate cap)
        self.probes_answered = 0
        self.advertise = rate > 0  # say in the initial metadata that probes are answered
        self._rpc_task: asyncio.Task | None = None  # the RPC's task, ended by a refused probe
        self.ended = False  # a refused probe ended the stream

    def open(self) -> None:
        """Start reading the stream (``close`` must follow, whatever happens); called in the RPC's task."""
        self.service.metrics.streams.inc()
        self.stall = StallGuard(self.service.config.stalled_stream_seconds, self.context,
                                self.service.metrics.stalled_streams.inc)
        self._rpc_task = asyncio.current_task()
        self._read_task = asyncio.create_task(self._reader())
        self.service._stream_queues.add(self.out)

    async def next(self) -> pb.InferResult | None:
        """The next answer, stamped with its send time; None once the sender ended the stream or the
        worker's drain did. After the caller has sent it, ``sent`` frees its slot."""
        result = await self.out.get()
        if result is not None:
            result.sent_seconds = time.monotonic()
            if self.stall is not None:
                self.stall.arm()  # not sent within --stalled-stream-seconds: the client stopped reading
        return result

    def sent(self) -> None:
        if self.stall is not None:
            self.stall.disarm()
        self.slots.give()

    def close(self) -> None:
        if self.stall is not None:
            self.stall.disarm()
        self.service._stream_queues.discard(self.out)
        if self._read_task is not None:
            self._read_task.cancel()
        self.assembler.close()  # a partial frame's bytes go back to the worker's budget
        self.slots.close()
        self.service.metrics.streams.dec()

    def _start(self, frame: pb.InferRequest, first: float, last: float) -> None:
        """Run a complete frame: handed to the compute threads from here in the common case (``service.start``:
        no task, its result queued in the callback that ends the compute), else in a task of its own."""
        try:
            job = self.service.start(frame, lambda result, error: self._answer(frame, first, last, result, error))
        except Exception as e:  # refused before the compute: answered at once
            self._answer(frame, first, last, None, e)
            return
        if job is None:
            job = asyncio.create_task(self._one(frame, first, last))
        self.tasks.add(job)
        job.add_done_callback(self.tasks.discard)

    async def _one(self, frame: pb.InferRequest, first: float, last: float) -> None:
        try:
            result = await self.service.process(frame)
        except Exception as e:
            self._answer(frame, first, last, None, e)
        else:
            self._answer(frame, first, last, result, None)

    def _answer(self, frame: pb.InferRequest, first: float, last: float, result: pb.InferResult | None,
                error: BaseException | None) -> None:
        """Queue a frame's result, or the error result for what it raised (a bug: INTERNAL, logged)."""
        if result is None or error is not None:
            h = frame.header
            if not isinstance(error, EdgesplitError):
                logger.error("frame %d failed", h.seq, exc_info=error,
                             extra={"frame": h.seq, "agent": h.agent_id, "plan": h.plan_version})
            result = self.service._error_result(h, as_error(error or RuntimeError("no result")))
        result.received_first_seconds, result.received_last_seconds = first, last
        self.out.put_nowait(result)  # unbounded: the slot taken before the frame bounds it

    async def _probe(self, msg: pb.StreamRequest) -> None:
        """Answer a StreamProbe behind the results already queued (a result slot, like any result), or end
        the stream: a probe over the size cap, or beyond the rate cap, is refused, never buffered."""
        size = msg.ByteSize()
        if size > MAX_STREAM_PROBE_BYTES:
            self._end(PROBE_SIZE, grpc.StatusCode.INVALID_ARGUMENT, f"a stream probe of {size} bytes is over the limit of "
                      f"{MAX_STREAM_PROBE_BYTES} bytes: send only its id")
        elif not self.probes.take():
            self._end(PROBE_RATE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"more than {self.probes.rate:g} stream probes a second (--max-stream-probes-per-second): the "
                      "worker ended this stream; probe at most once per answer, or open a new stream")
        else:
            self.probes_answered += 1
            await self.slots.put(self.out, pb.InferResult(probe=msg.probe))

    def _end(self, reason: str, code: grpc.StatusCode, message: str) -> None:
        peer = self.context.peer() if self.context is not None else "?"
        logger.warning("ending the stream from %s: %s", peer, message)
        self.service.metrics.streams_shed.labels(reason).inc()  # refused probes are data, not only a log line
        self.ended = True  # the reader stops: nothing more from this stream is taken
        end_call(self.context, self._rpc_task, code, message)

    async def _refuse(self, header: pb.FrameHeader, err: EdgesplitError) -> None:
        await self.slots.put(self.out, self.service._error_result(header, err))

    async def _reader(self) -> None:
        if self.advertise and self.context is not None:  # before any result: the agent knows before it probes
            with contextlib.suppress(Exception):  # the call already ended or sent its metadata: nothing to say
                await self.context.send_initial_metadata((STREAM_PROBE_METADATA,))
        try:
            async for msg in self.requests:
                frame = await self._feed(msg)
                if self.ended:
                    break
                if frame is not None:
                    await self.slots.take()
                    self._start(frame, self.first_at, time.monotonic())
        finally:
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.out.put(None)

    async def _feed(self, msg: pb.StreamRequest) -> pb.InferRequest | None:
        """One message into the assembler: the frame it completes, or None (errors answered here)."""
        kind = msg.WhichOneof("kind")
        if kind == "probe":
            await self._probe(msg)
            return None
        if kind == "cancel":  # the sender gave up on a frame (runtime.worker.cancel)
            self.service.cancelled.cancel(self.assembler, self.origin, msg.cancel.seq)
            return None
        if kind == "frame":
            if acts_for_agent(msg.frame.header.agent_id):  # else the frame is refused when resolved
                self.origin = (msg.frame.header.agent_id, msg.frame.header.stream_epoch)
            self.first_at = time.monotonic()
            frame_arrived()  # its worker.receive span starts now (tracing on)
        pending = self.assembler.pending_header
        if kind == "chunk" and pending is None and msg.chunk.seq == self.dropped_seq:
            return None  # rest of a frame that already got its error result
        try:
            return self.assembler.feed(msg)
        except EdgesplitError as e:
            # An error while a frame is open is about that frame: answer it under its own
            # header (agent_id, stream_epoch, seq) so the agent can match the result.
            if pending is not None:
                header = pending
            elif kind == "frame":
                header = msg.frame.header
            else:
                header = pb.FrameHeader(seq=msg.chunk.seq)
            if kind is not None:
                self.dropped_seq = header.seq
            await self._refuse(header, e)
            if kind != "frame" or pending is None:
                return None
        # a new frame cut the open one short: the new frame itself starts afresh
        try:
            return self.assembler.feed(msg)
        except EdgesplitError as e2:
            self.dropped_seq = msg.frame.header.seq
            await self._refuse(msg.frame.header, e2)
            return None
