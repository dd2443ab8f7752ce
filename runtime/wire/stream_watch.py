"""The liveness watchdog of an EdgeStream (runtime.wire.stream): when to probe a worker that has said nothing for a
while, how, and when to declare its stream dead, by the rules of runtime.wire.liveness.

The idle probe goes as a ``StreamProbe`` message on the open stream, echoed by the worker's stream reader
(runtime.worker.streaming), when the worker said in the stream's initial metadata that it answers them
(runtime.wire.streamprobe); otherwise, and while frames are outstanding, as a unary grpc.health.v1 Health/Check on
the same connection (issue 14: a write on the open stream where the Health/Check was a new call, a task and six
completion-queue operations). With frames outstanding a second probe goes on the path's own connection, queued
behind none. Each echo is a round-trip sample (``rtt``: count, last, smallest, age; ``on_rtt`` receives each).

``StreamWatch`` is a part of EdgeStream, kept apart: it holds the watchdog's own state (its sleep, the stream
probe in flight, the samples) and reads the stream's connection state, which EdgeStream owns. Also here:
``time_health_check``, the Health/Check probe, which the agent's prober and telemetry use on their own.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from collections.abc import Callable

import grpc

from runtime.contracts.errors import from_rpc_error
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.wire.liveness import LAG_TOLERANCE_SECONDS, Liveness
from runtime.wire.streamprobe import RttRecord

# what a write on a stream call raises once the stream is going away (ended, cancelled, or its channel closed)
WRITE_ERRORS = (grpc.RpcError, asyncio.InvalidStateError, RuntimeError)

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


class StreamWatch(abc.ABC):
    """The watchdog half of EdgeStream (module docstring); EdgeStream sets the attributes declared below."""

    # the stream's, read here: this epoch's call and liveness record, its channels, the frames holding it, how long
    # a connect may take
    _call: grpc.aio.StreamStreamCall | None
    _live: Liveness
    _channel: grpc.aio.Channel | None
    _path: grpc.aio.Channel | None
    users: int
    connect_timeout: float

    def __init__(self) -> None:
        self._watchdog: asyncio.Task | None = None
        # the watchdog's sleep (_nap): when it is due to wake (live.clock() time), and its timer, moved sooner
        # when an answer or a new frame brings a probe's instant forward (_sooner), so it never wakes on a tick
        self._wake_at = 0.0
        self._wake: asyncio.TimerHandle | None = None
        self._napping: asyncio.Future | None = None
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

    @abc.abstractmethod
    def _broken(self, call: grpc.aio.StreamStreamCall | None, reason: str, kind: str = "") -> None:
        """The stream ended for ``reason`` (EdgeStream's)."""

    @abc.abstractmethod
    async def _write_control(self, call: grpc.aio.StreamStreamCall, msg: pb.StreamRequest) -> None:
        """One message on ``call`` behind the frames, under its write lock (EdgeStream's)."""

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
        try:
            await self._write_control(call, pb.StreamRequest(probe=pb.StreamProbe(id=probe_id)))
        except WRITE_ERRORS as e:
            self._broken(call, f"write failed: {type(e).__name__}")

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
