"""One bidirectional gRPC stream to a worker, reopened with back-off after a failure; results are
matched to frames by sequence number and stream epoch.

Shared by both roles that send frames: the device agent (to its edge worker) and a worker that
runs a middle slice and forwards to its next tier (runtime.worker.forward). It imports neither.

Here: opening the stream (and its back-off), its reader (results to their frames' futures), its writer (a
frame's messages, a frame given up on: ``abandon``, ``give_up``), how a stream ends (``_broken``, ``close``).
The liveness watchdog that probes a silent worker and declares its stream dead is ``StreamWatch``
(runtime.wire.stream_watch), a part of EdgeStream kept in its own module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

import grpc

from runtime.contracts.errors import DeadlineExceeded, Unavailable, from_rpc_error
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.wire.asyncutil import Backoff, wait_set
from runtime.wire.framewire import OutFrame, serialize_request
from runtime.wire.liveness import LinkHint, Liveness, death_kind
from runtime.wire.stream_watch import WRITE_ERRORS, StreamWatch
from runtime.wire.stream_watch import time_health_check as time_health_check  # its callers import it from here
from runtime.wire.streamprobe import advertised
from runtime.wire.transport import TransportOptions, frame_messages

logger = logging.getLogger(__name__)


class GivenUp(DeadlineExceeded):
    """A frame's wait ended by ``EdgeStream.give_up`` (its sender left the link), not by its deadline."""


MAX_BACKOFF_SECONDS = 2.0  # the agent runs frames locally meanwhile: retry soon, jittered
BACKOFF_JITTER = 0.5  # each delay drawn from [delay / 2, delay], so agents that lost one worker spread out
# why a stream ended, when no gRPC status says it: this side closed it (``close``; a forwarding worker's too), or the
# worker ended the call itself with status OK (its drain ends every open stream so)
CLOSED_HERE = "agent closing"
CLOSED_BY_WORKER = "stream closed by the worker"


class StreamMetrics(Protocol):
    """What a stream reports (the agent's AgentMetrics has these; a worker passes per-tier children)."""

    stream_up: Any  # a prometheus Gauge: 1 while the stream is open
    reconnects: Any  # a prometheus Counter: streams opened
    # optional: ``stream_died(reason)``, called once per stream that ended for any cause but its own close
    # (reasons: runtime.wire.liveness.death_kind)


INFER_STREAM = "/edgesplit.v1.Inference/InferStream"

def open_frame_stream(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
    """A new InferStream call on ``channel``: the generated stub's, with a request serializer that also
    takes OutFrames (their payload written once; runtime.wire.framewire)."""
    method = channel.stream_stream(INFER_STREAM, request_serializer=serialize_request,
                                   response_deserializer=pb.InferResult.FromString)
    return method()


class EdgeStream(StreamWatch):
    """One bidirectional stream to a worker; reopened with exponential back-off after a failure."""

    def __init__(self, address: str, transport: TransportOptions, metrics: StreamMetrics,
                 connect_timeout: float, reconnect: float, link_hint: LinkHint | None = None):
        super().__init__()  # the watchdog's own state (StreamWatch)
        self.address = address
        # the link's (bandwidth, RTT) estimate, for link-aware liveness (runtime.wire.liveness); None: keep-alive only
        self.link_hint = link_hint
        self._live = Liveness(None, transport.liveness)  # replaced for each epoch
        self.transport = transport
        self.metrics = metrics
        self.connect_timeout = connect_timeout
        self.reconnect = reconnect
        self.epoch = 0
        self._backoff = Backoff(reconnect, max(reconnect, MAX_BACKOFF_SECONDS),  # doubles to 2 s, reset when open
                                jitter=BACKOFF_JITTER)
        self._retry_at = 0.0
        self._channel: grpc.aio.Channel | None = None
        # the path's own connection to the worker (liveness: probes there queue behind no frame), per epoch
        self._path: grpc.aio.Channel | None = None
        self._warming: asyncio.Task | None = None  # the path's connection (and its server check) being made
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._open_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        # tasks holding or waiting for _write_lock (send, _write_control): at 0 an acquire() returns at once (a lock
        # just released to a waiter not yet running reads unlocked, yet acquire() would queue behind it)
        self._writers = 0
        self._cancels: set[asyncio.Task] = set()  # FrameCancel writes in flight (abandon)
        self.closed = False  # after close(): never reopened; frames still holding it run locally
        self.users = 0  # frames that captured a plan using this stream and have not finished
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def is_open(self) -> bool:
        return self._call is not None

    @property
    def liveness(self) -> Liveness:
        """The current epoch's liveness bookkeeping (runtime.wire.liveness; a new one each time the stream opens)."""
        return self._live

    def hold(self) -> None:
        """A frame starts using this stream (its plan names it)."""
        self.users += 1
        self._idle.clear()

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait (bounded) until no frame holds the stream; False on timeout."""
        return await wait_set(self._idle, timeout)

    async def _ensure_open(self) -> None:
        if self._call is not None:
            return
        async with self._open_lock:
            if self._call is not None:
                return
            if self.closed:
                raise Unavailable(f"stream to {self.address} was closed (its sender moved off this worker)")
            now = time.monotonic()
            if now < self._retry_at:
                raise Unavailable(f"worker {self.address} unreachable; next try in {self._retry_at - now:.1f}s")
            channel = self.transport.aio_channel(self.address)
            try:
                await asyncio.wait_for(channel.channel_ready(), self.connect_timeout)
            except (asyncio.TimeoutError, grpc.RpcError) as e:
                await channel.close()
                self._retry_at = time.monotonic() + self._backoff.next()
                raise Unavailable(f"worker {self.address} unreachable ({type(e).__name__})") from None
            self._channel = channel
            self._call = open_frame_stream(channel)
            self.epoch += 1
            self._backoff.reset()
            self.stream_probes, self._probe_out = False, None  # until this worker says so (_read)
            self._reader = asyncio.create_task(self._read(self._call, self.epoch))
            self._live = Liveness(self.link_hint, self.transport.liveness, path=True)
            self._watchdog = asyncio.create_task(self._watch(self._call, self._live))
            self.metrics.stream_up.set(1)
            self.metrics.reconnects.inc()
            logger.info("stream %d open to %s", self.epoch, self.address)

    async def _read(self, call: grpc.aio.StreamStreamCall, epoch: int) -> None:
        reason = CLOSED_BY_WORKER
        try:
            metadata = await call.initial_metadata()  # before any result: a worker that answers probes says so
            if self._call is call:
                self.stream_probes = advertised(metadata)
            async for res in call:
                if res.header.stream_epoch != epoch:
                    if res.HasField("probe"):  # an echo (no header): not a frame's result
                        self._echoed(call, res.probe.id)
                    continue
                seq = res.header.seq
                fut = self._pending.pop(seq, None)
                if fut is not None and not fut.done():
                    fut.set_result(res)  # a result for an abandoned frame is dropped here
                    # the frame's task runs first, then this reader's liveness record and its next read (grpc.aio's
                    # receive op, a new future), which sat in the frame's path (issue 14: 803 KB overhead median
                    # 2.01 -> 1.93 ms, lower in 4 of 6 pairs; runtime/measure/results/overhead.md 2026-12-05 q3)
                    await asyncio.sleep(0)
                if self._call is call:  # (still this epoch's stream: it may have broken meanwhile)
                    live = self._live
                    live.answered(seq)
                    if self._wake_at > live.progress_at + live.options.probe_after_seconds:
                        self._sooner(live)  # asleep past the next probe's instant (after a probe, until the verdict)
            if self.closed:  # the worker's answer to close()'s half-close, read before close() cancelled the call
                reason = CLOSED_HERE
        except grpc.aio.AioRpcError as e:
            reason = f"stream failed: {e.code().name} {e.details()}"
        except asyncio.CancelledError:
            reason = CLOSED_HERE
        finally:
            self._broken(call, reason)

    def _broken(self, call: grpc.aio.StreamStreamCall | None, reason: str, kind: str = "") -> None:
        if self._call is not call:
            return
        level = logging.INFO if reason == CLOSED_HERE or self.closed else logging.WARNING
        logger.log(level, "stream %d to %s ended: %s", self.epoch, self.address, reason)
        died = getattr(self.metrics, "stream_died", None)  # optional in StreamMetrics
        if level == logging.WARNING and died is not None:
            died(kind or death_kind(reason))
        self._call = None
        self.metrics.stream_up.set(0)
        self._retry_at = time.monotonic() + self._backoff.next()
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(Unavailable(reason))
        for channel in (self._channel, self._path):
            if channel is not None:
                asyncio.get_running_loop().create_task(channel.close(grace=None))
        self._channel = self._path = None

    async def send(self, request: pb.InferRequest | pb.StreamRequest | OutFrame,
                   deadline: float | None = None, chunk_bytes: int = 0) -> asyncio.Future:
        """Send one frame; returns a future for its result. Raises Unavailable.

        ``request``: an InferRequest, a StreamRequest with ``frame`` set (sent without copying the
        payload when it fits one message; see ``frame_messages``), or an OutFrame (its payload written
        once, by the serializer; runtime.wire.framewire).

        ``deadline`` (``time.monotonic()`` seconds): past it, the frame is not started, or its
        remaining chunks are not sent and the worker is told to drop it (``FrameCancel``), so an
        abandoned frame stops taking the link from the frames behind it; raises DeadlineExceeded.
        ``chunk_bytes``: payload bytes per message (the transport's ``chunk_bytes`` the most; 0: that).
        """
        await self._ensure_open()
        call: grpc.aio.StreamStreamCall = self._call  # open: _ensure_open returned
        frame = request if isinstance(request, pb.InferRequest) else request.frame
        frame.header.stream_epoch = self.epoch
        seq = frame.header.seq
        fut = asyncio.get_running_loop().create_future()
        self._pending[seq] = fut
        written = 0
        lock = self._write_lock
        busy = self._writers > 0 or lock.locked()
        self._writers += 1
        try:
            if deadline is not None and busy:  # frames ahead of it hold or wait for the lock: wait, bounded
                await asyncio.wait_for(lock.acquire(), max(0.0, deadline - time.monotonic()))
            elif deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded(f"frame {seq}: deadline passed before it was sent")
            else:  # free (the usual case): taken at once, no task (wait_for's cost ~23 us a frame; issue 14)
                await lock.acquire()
            live = self._live
            if self._path is None and live.path:  # with the epoch's first frame: connected before it is needed
                self._path = self.transport.probe_channel(self.address)
                self._warming = asyncio.get_running_loop().create_task(self._warm(self._path))
            live.sent(seq, frame.tensor.payload_size or len(frame.tensor.buffer))  # outstanding from its first byte (a write may block)
            if self._wake_at > live.progress_at + live.options.probe_after_seconds:
                self._sooner(live)  # the first frame after idle: probes are due from now (idle ones may be off)
            try:
                cap = self.transport.chunk_bytes
                for msg in frame_messages(request, min(chunk_bytes, cap) if chunk_bytes > 0 else cap):
                    if deadline is not None and time.monotonic() > deadline:
                        # bytes already written still queue on the link: waited for until a probe proves them through
                        if written:
                            live.abandon(seq)
                        else:
                            live.forget(seq)
                            self._sooner(live)  # fewer bytes outstanding: the verdict may be due sooner
                        if written:
                            await call.write(pb.StreamRequest(cancel=pb.FrameCancel(seq=seq)))
                        raise DeadlineExceeded(f"frame {seq}: deadline passed after {written} of its messages")
                    await call.write(msg)
                    written += 1
            finally:
                lock.release()
        except asyncio.TimeoutError:
            self._pending.pop(seq, None)
            raise DeadlineExceeded(f"frame {seq}: deadline passed while frames ahead of it were sent") from None
        except DeadlineExceeded:
            self._pending.pop(seq, None)
            raise
        except WRITE_ERRORS as e:
            self._pending.pop(seq, None)
            self._broken(call, f"write failed: {type(e).__name__}")
            raise Unavailable(f"could not send frame {seq}: {e}") from None
        finally:
            self._writers -= 1
        return fut

    async def prepare(self, header: pb.FrameHeader, timeout: float) -> pb.PrepareResult:
        """Have the worker load the tail now (unary, with a deadline). Raises EdgesplitError."""
        await self._ensure_open()
        try:
            stub = pb_grpc.InferenceStub(self._channel)  # type: ignore[no-untyped-call]  # generated, unannotated
            result: pb.PrepareResult = await stub.Prepare(pb.PrepareRequest(header=header), timeout=timeout)
            return result
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None

    async def probe_rtt(self, timeout: float) -> float:
        """Seconds of one grpc.health.v1 Health/Check on the channel the frames use (same
        connection, negligible server work). Never opens a stream: raises Unavailable when none is open."""
        channel = self._channel
        if channel is None:
            raise Unavailable(f"no open channel to {self.address}")
        return await time_health_check(channel, timeout)

    def abandon(self, seq: int) -> None:
        """Give up on frame ``seq`` (sent whole, no result by its deadline): its result will be dropped,
        and the worker is told not to compute it if it has not started."""
        self._pending.pop(seq, None)
        self._live.abandon(seq)
        call = self._call
        if call is not None:
            task = asyncio.get_running_loop().create_task(self._cancel(call, seq))
            self._cancels.add(task)
            task.add_done_callback(self._cancels.discard)

    def give_up(self, reason: str) -> int:
        """Give up on every frame waiting for a result (the agent left this link: it collapsed): each
        frame's wait ends with GivenUp(``reason``) and the worker is told to drop it. Returns how many."""
        pending = [(seq, fut) for seq, fut in self._pending.items() if not fut.done()]
        for seq, fut in pending:
            self.abandon(seq)
            fut.set_exception(GivenUp(reason))
        return len(pending)

    async def _cancel(self, call: grpc.aio.StreamStreamCall, seq: int) -> None:
        with contextlib.suppress(*WRITE_ERRORS):  # the stream is going away: nothing will be computed for it anyway
            await self._write_control(call, pb.StreamRequest(cancel=pb.FrameCancel(seq=seq)))

    async def _write_control(self, call: grpc.aio.StreamStreamCall, msg: pb.StreamRequest) -> None:
        """Write one control message (a FrameCancel, a StreamProbe) on ``call``, behind any frame being written;
        nothing if the stream was reopened meanwhile (the old stream's frames are gone, and the new epoch probes
        for itself). Raises what the write raised (WRITE_ERRORS: the stream is going away)."""
        self._writers += 1
        try:
            async with self._write_lock:
                stale = self._call is not call  # reopened meanwhile
                if not stale:
                    await call.write(msg)
        finally:
            self._writers -= 1

    async def close(self) -> None:
        self.closed = True
        for task in (self._watchdog, self._warming):
            if task is not None:
                task.cancel()
        for task in list(self._cancels):
            task.cancel()
        call = self._call
        if call is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(call.done_writing(), 1.0)
            call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for channel in (self._channel, self._path):
            if channel is not None:
                await channel.close(grace=None)
        self._channel = self._path = None
