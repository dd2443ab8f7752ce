"""One InferStream on the worker: read messages, rebuild frames, run each as it completes, send one
result per frame in completion order (a bad frame gets an error result, not a dead stream).

Each result carries the frame's receive times and the time it left, on the worker's monotonic clock
(InferResult.received_first_seconds / received_last_seconds / sent_seconds), so the agent can take the
worker's hold off its round trip and get a bandwidth sample from every frame (issue 11).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from runtime.contracts.errors import EdgesplitError, as_error
from runtime.daemon.auth import acts_for_agent
from runtime.daemon.tracing import frame_arrived
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
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
        self.tasks: set[asyncio.Task] = set()
        self.slots = ResultSlots(service.config.max_stream_results, service)  # backpressure (runtime.worker.backpressure)
        self.origin = ("", 0)  # agent id and stream epoch of this stream's frames (what a cancel refers to)
        self.dropped_seq: int | None = None  # the last frame refused part-way; its late chunks are ignored
        self.first_at = 0.0  # monotonic time the open frame's first message arrived
        self._read_task: asyncio.Task | None = None
        self.stall: StallGuard | None = None  # ends the stream when the client stops reading (runtime.worker.backpressure)

    def open(self) -> None:
        """Start reading the stream (``close`` must follow, whatever happens); called in the RPC's task."""
        self.service.metrics.streams.inc()
        self.stall = StallGuard(self.service.config.stalled_stream_seconds, self.context,
                                self.service.metrics.stalled_streams.inc)
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

    async def _one(self, frame: pb.InferRequest, first: float, last: float) -> None:
        service = self.service
        try:
            result = await service.process(frame)
        except EdgesplitError as e:
            result = service._error_result(frame.header, e)
        except Exception as e:
            h = frame.header
            logger.exception("frame %d failed", h.seq, extra={"frame": h.seq, "agent": h.agent_id, "plan": h.plan_version})
            result = service._error_result(h, as_error(e))
        result.received_first_seconds, result.received_last_seconds = first, last
        await self.out.put(result)

    async def _refuse(self, header: pb.FrameHeader, err: EdgesplitError) -> None:
        await self.slots.put(self.out, self.service._error_result(header, err))

    async def _reader(self) -> None:
        try:
            async for msg in self.requests:
                frame = await self._feed(msg)
                if frame is not None:
                    await self.slots.take()
                    task = asyncio.create_task(self._one(frame, self.first_at, time.monotonic()))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
        finally:
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.out.put(None)

    async def _feed(self, msg: pb.StreamRequest) -> pb.InferRequest | None:
        """One message into the assembler: the frame it completes, or None (errors answered here)."""
        kind = msg.WhichOneof("kind")
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
