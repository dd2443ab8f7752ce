"""One bidirectional gRPC stream to a worker, reopened with back-off after a failure; results are
matched to frames by sequence number and stream epoch.

Shared by both roles that send frames: the device agent (to its edge worker) and a worker that
runs a middle slice and forwards to its next tier (runtime.worker.forward). It imports neither.

The idle liveness probe (runtime.wire.liveness) goes as a ``StreamProbe`` message on the open stream, echoed
by the worker's stream reader (runtime.worker.streaming), when the worker said in the stream's initial
metadata that it answers them (runtime.wire.streamprobe); otherwise, and while frames are outstanding, as a unary
grpc.health.v1 Health/Check on the same connection, as before (issue 14: a write on the open stream where the
Health/Check was a new call, a task and six completion-queue operations). Each echo is a round-trip sample
(``EdgeStream.rtt``: count, last, smallest, age; ``on_rtt`` receives each).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc

from runtime.contracts.errors import DeadlineExceeded, Unavailable, from_rpc_error
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.wire.asyncutil import Backoff, wait_set
from runtime.wire.framewire import OutFrame, serialize_request
from runtime.wire.liveness import LAG_TOLERANCE_SECONDS, LinkHint, Liveness, death_kind
from runtime.wire.streamprobe import RttRecord, advertised
from runtime.wire.transport import TransportOptions, frame_messages

logger = logging.getLogger(__name__)

class GivenUp(DeadlineExceeded):
    """A frame's wait ended by ``EdgeStream.give_up`` (its sender left the link), not by its deadline."""


MAX_BACKOFF_SECONDS = 2.0  # the agent runs frames locally meanwhile: retry soon, jittered
BACKOFF_JITTER = 0.5  # each delay drawn from [delay / 2, delay], so agents that lost one worker spread out


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


HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# a HealthCheckRequest with no service (the server's overall health) is zero bytes on the wire
EMPTY_HEALTH_CHECK = b""


async def time_health_check(channel: grpc.aio.Channel, timeout: float) -> float:
    """Seconds one ``grpc.health.v1.Health/Check`` takes on ``channel``. Raises EdgesplitError.

    The request goes as its bytes and the answer is not parsed (only its arrival counts): one method object
    per call, where the generated stub made two and a request message. Per probe on loopback, the loop thread's
    CPU went 390-525 -> 275-490 us (lower in 5 of 6 pairs, micro-benchmark; ~2 probes a second idle; issue 14)."""
    check = channel.unary_unary(HEALTH_CHECK)
    t0 = time.perf_counter()
    try:
        await check(EMPTY_HEALTH_CHECK, timeout=timeout)
    except grpc.aio.AioRpcError as e:
        raise from_rpc_error(e) from None
    return time.perf_counter() - t0


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class EdgeStream:
    """One bidirectional stream to a worker; reopened with exponential back-off after a failure."""

    def __init__(self, address: str, transport: TransportOptions, metrics: StreamMetrics,
                 connect_timeout: float, reconnect: float, link_hint: LinkHint | None = None):
        self.address = address
        # the link's (bandwidth, RTT) estimate, for link-aware liveness (runtime.wire.liveness); None: keep-alive only
        self.link_hint = link_hint
        self._live = Liveness(None, transport.liveness)  # replaced for each epoch
        self._watchdog: asyncio.Task | None = None
        # the watchdog's sleep (_nap): when it is due to wake (live.clock() time), and its timer, moved sooner
        # when an answer or a new frame brings a probe's instant forward (_sooner), so it never wakes on a tick
        self._wake_at = 0.0
        self._wake: asyncio.TimerHandle | None = None
        self._napping: asyncio.Future | None = None
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
        # tasks holding or waiting for _write_lock (send, _cancel): at 0 an acquire() returns at once (a lock
        # just released to a waiter not yet running reads unlocked, yet acquire() would queue behind it)
        self._writers = 0
        self._cancels: set[asyncio.Task] = set()  # FrameCancel writes in flight (abandon)
        self.closed = False  # after close(): never reopened; frames still holding it run locally
        self.users = 0  # frames that captured a plan using this stream and have not finished
        self._idle = asyncio.Event()
        self._idle.set()
        # stream probes (module docstring): whether this epoch's worker answers them, the one in flight
        # (id, live.clock() and perf_counter() when sent), and what they measured
        self.stream_probes = False
        self._probe_id = 0
        self._probe_out: tuple[int, float, float] | None = None
        self.rtt = RttRecord()
        self.on_rtt: Callable[[float], None] | None = None  # called with each echo's round trip (seconds)
        # liveness probes sent: on the stream, as Health/Check on the frames' connection, on the path; and how many
        # of the first two went while a frame held the stream with nothing outstanding (its head computing)
        self.probes_sent = {"stream": 0, "health": 0, "path": 0, "held": 0}

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
        reason = "stream closed by the worker"
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
        except grpc.aio.AioRpcError as e:
            reason = f"stream failed: {e.code().name} {e.details()}"
        except asyncio.CancelledError:
            reason = "agent closing"
        finally:
            self._broken(call, reason)

    def _echoed(self, call: grpc.aio.StreamStreamCall, probe_id: int) -> None:
        """The worker echoed a stream probe: progress (it queued behind every byte sent before it), and a
        round-trip sample when nothing was outstanding."""
        out = self._probe_out
        if self._call is not call or out is None or out[0] != probe_id:
            return  # a stale echo (an earlier epoch, or a probe already given up on)
        self._probe_out = None
        live = self._live
        seconds = time.perf_counter() - out[2]
        if not live.outstanding:
            self.rtt.add(seconds, time.monotonic())
            if self.on_rtt is not None:
                self.on_rtt(seconds)
        live.probe_answered(out[1])
        self._sooner(live)  # the next probe is due probe_after from now

    def _broken(self, call: grpc.aio.StreamStreamCall | None, reason: str, kind: str = "") -> None:
        if self._call is not call:
            return
        level = logging.INFO if reason == "agent closing" or self.closed else logging.WARNING
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
                   deadline: float | None = None) -> asyncio.Future:
        """Send one frame; returns a future for its result. Raises Unavailable.

        ``request``: an InferRequest, a StreamRequest with ``frame`` set (sent without copying the
        payload when it fits one message; see ``frame_messages``), or an OutFrame (its payload written
        once, by the serializer; runtime.wire.framewire).

        ``deadline`` (``time.monotonic()`` seconds): past it, the frame is not started, or its
        remaining chunks are not sent and the worker is told to drop it (``FrameCancel``), so an
        abandoned frame stops taking the link from the frames behind it; raises DeadlineExceeded.
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
                for msg in frame_messages(request, self.transport.chunk_bytes):
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
        except (grpc.RpcError, asyncio.InvalidStateError, RuntimeError) as e:
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
        self._writers += 1
        try:
            async with self._write_lock:
                stale = self._call is not call  # reopened meanwhile: the old stream's frames are gone
                if not stale:
                    await call.write(pb.StreamRequest(cancel=pb.FrameCancel(seq=seq)))
        except (grpc.RpcError, asyncio.InvalidStateError, RuntimeError):
            pass  # the stream is going away: nothing will be computed for it anyway
        finally:
            self._writers -= 1

    async def _watch(self, call: grpc.aio.StreamStreamCall, live: Liveness) -> None:
        """Declare the stream dead by the liveness rules (runtime.wire.liveness): with no answer for a
        while, ask the peer with a probe on the same connection (queued behind the same bytes) and, frames
        outstanding, one on the path's own connection (queued behind none); time this loop could not run
        (the watchdog woke late) is not counted against the peer."""
        probe: asyncio.Task | None = None
        path_probe: asyncio.Task | None = None
        try:
            while self._call is call:
                await self._nap(live, live.next_check())  # wakes when a probe or the verdict is due
                why = live.verdict()
                if why:  # an answer may be waiting in this loop: one more short look before the verdict
                    await self._nap(live, LAG_TOLERANCE_SECONDS)
                    why = live.verdict()
                if why and self._call is call:
                    self._broken(call, why, live.reason)
                    call.cancel()
                    return
                if (probe is None or probe.done()) and live.wants_probe() and self._channel is not None:
                    probe = self._probe(call, live)
                if (path_probe is None or path_probe.done()) and live.wants_path_probe() and self._path is not None:
                    self.probes_sent["path"] += 1
                    path_probe = asyncio.create_task(self._ask(self._path, live, path=True))
        finally:
            for task in (probe, path_probe):
                if task is not None:
                    task.cancel()

    def _probe(self, call: grpc.aio.StreamStreamCall, live: Liveness) -> asyncio.Task | None:
        """The probe on the frames' connection: a stream probe when idle and the worker answers them (one at a
        time: none while one is unanswered, the verdict decides), else a Health/Check."""
        if self.stream_probes and not live.outstanding and self._probe_out is not None:
            return None
        if self.users > 0 and not live.outstanding:
            self.probes_sent["held"] += 1  # a frame holds the stream, nothing sent yet: its head is computing
        if self.stream_probes and not live.outstanding:
            self._probe_id += 1
            self._probe_out = (self._probe_id, live.clock(), time.perf_counter())
            self.probes_sent["stream"] += 1
            return asyncio.create_task(self._write_probe(call, self._probe_id))
        self.probes_sent["health"] += 1
        assert self._channel is not None
        return asyncio.create_task(self._ask(self._channel, live, path=False))

    async def _write_probe(self, call: grpc.aio.StreamStreamCall, probe_id: int) -> None:
        """Write one stream probe (behind any frame being written); a failed write is the stream's end."""
        self._writers += 1
        try:
            async with self._write_lock:
                stale = self._call is not call  # reopened meanwhile: the new epoch probes for itself
                if not stale:
                    await call.write(pb.StreamRequest(probe=pb.StreamProbe(id=probe_id)))
        except (grpc.RpcError, asyncio.InvalidStateError, RuntimeError) as e:
            self._broken(call, f"write failed: {type(e).__name__}")
        finally:
            self._writers -= 1

    async def _nap(self, live: Liveness, seconds: float) -> None:
        """Sleep ``seconds``, or until :meth:`_sooner` moves the wake-up forward; a late wake-up (this loop
        stalled) is excused, not counted against the peer."""
        loop = asyncio.get_running_loop()
        fut = self._napping = loop.create_future()
        self._wake_at = live.clock() + seconds
        self._wake = loop.call_later(seconds, _resolve, fut)
        try:
            await fut
        finally:
            self._wake.cancel()
            self._napping = None
        late = live.clock() - self._wake_at
        self._wake_at = 0.0
        if late > LAG_TOLERANCE_SECONDS:
            live.excuse(late)

    def _sooner(self, live: Liveness) -> None:
        """Something brought a probe or the verdict forward: the sleeping watchdog wakes at that instant."""
        fut = self._napping
        if fut is None or fut.done() or live is not self._live:
            return
        at = live.clock() + live.next_check()
        if at < self._wake_at:
            if self._wake is not None:
                self._wake.cancel()
            self._wake_at = at
            self._wake = asyncio.get_running_loop().call_later(max(0.0, at - live.clock()), _resolve, fut)

    async def _ask(self, channel: grpc.aio.Channel, live: Liveness, path: bool) -> None:
        """One probe: on the frames' own connection (``path`` False: queued behind their bytes, so it may
        take the link's allowance) or on the path's (queued behind none: the floor)."""
        sent_at = live.clock()
        timeout = live.options.floor_seconds if path else (live.allowance() or live.options.floor_seconds)
        with contextlib.suppress(Exception):  # unanswered: the watchdog's verdict decides, not this probe
            await time_health_check(channel, timeout)
            if path:
                live.path_answered()
            else:
                live.probe_answered(sent_at)
            self._sooner(live)  # the next probe is due probe_after from now, before the verdict it sleeps to

    async def _warm(self, path: grpc.aio.Channel) -> None:
        """Connect the path now (handshakes, the server's certificate against a CRL), so a probe on it
        later takes one round trip; a failure here is the probe's to find."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(path.channel_ready(), self.connect_timeout)

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
