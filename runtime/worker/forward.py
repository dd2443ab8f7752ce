"""Worker chaining: forward a frame's slice output to a next-tier worker and relay its answer.

A frame whose header sets ``end_split`` asks this worker to run only [split_id, end_split) and to
send the result on to the worker named by the header's first hop (see runtime.wire.chain), which runs
the rest of the route; the final result comes back here and goes back to the sender.

* Only the addresses this worker was started with (``--next-tier``, matched exactly) are dialled.
  A frame naming any other is refused PERMISSION_DENIED before any compute; a chained frame sent
  to a worker with no next tier is refused FAILED_PRECONDITION. A client never picks the target.
* One long-lived stream per next tier (runtime.wire.stream.EdgeStream, the agent's own): opened on
  first use within ``forward_connect_timeout_seconds``, reopened with exponential back-off after a
  failure. Forwarded frames are renumbered on it (many senders share one stream).
* Every forward is bounded by ``forward_deadline_seconds`` (DEADLINE_EXCEEDED); an unreachable
  next tier is UNAVAILABLE and a refusal there keeps its code. The message names the next tier,
  so the agent's local fallback says why the chain failed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc

from runtime.contracts.errors import (
    CODES_BY_NUMBER,
    DeadlineExceeded,
    EdgesplitError,
    PermissionDenied,
    PreconditionFailed,
    Unavailable,
    from_status,
)
from runtime.daemon.tracing import inject_frame
from runtime.models.slicing import SplitPoint
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.wire.codec import Codec, get_codec
from runtime.wire.stream import EdgeStream
from runtime.worker.config import WorkerConfig
from runtime.worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

PREPARE_TIMEOUT_SECONDS = 60.0  # a next tier's Prepare when the caller set no deadline


@dataclass
class _TierMetrics:
    stream_up: Any
    reconnects: Any
    stream_died: Any  # reason -> None (runtime.wire.stream.StreamMetrics)


@dataclass(frozen=True)
class Route:
    """Where one chained frame goes after this worker's slice."""

    address: str  # the next tier (one of --next-tier)
    codec: Codec  # how the slice output travels there
    header: pb.FrameHeader  # the header the next tier gets (its split, end split and remaining hops)


class NextTiers:
    """The next-tier workers this worker may forward to, and one stream to each."""

    def __init__(self, config: WorkerConfig, metrics: WorkerMetrics):
        self.config = config
        self.metrics = metrics
        self.allowed: tuple[str, ...] = tuple(a.strip() for a in config.next_tiers)
        self._streams: dict[str, EdgeStream] = {}
        self._codecs: dict[str, Codec] = {}
        self._seq = itertools.count(1)
        # goodput to each next tier (bytes / (round trip - its hold), smoothed), for the streams' liveness
        self._bandwidth: dict[str, float] = {}

    def route(self, h: pb.FrameHeader, end: SplitPoint) -> Route:
        """The route of a frame whose slice here ends at ``end``. Raises before anything runs."""
        hop = h.next_hops[0] if h.next_hops else pb.Hop()
        address = self._check_address(hop.address, end)
        codec = self._codec(hop.codec or self.config.forward_codec)
        nh = pb.FrameHeader()
        nh.CopyFrom(h)
        nh.split_id, nh.end_split, nh.tl_id, nh.seq, nh.stream_epoch = end.name, hop.end_split, "", 0, 0
        del nh.next_hops[:]
        nh.next_hops.extend(h.next_hops[1:])
        return Route(address, codec, nh)

    def _check_address(self, address: str, end: SplitPoint) -> str:
        if not self.allowed:
            raise PreconditionFailed(
                f"the frame asks this worker to stop at split {end.name!r} and forward the rest, but it forwards "
                "to no next tier: start it with --next-tier HOST:PORT, or send frames without end_split")
        if not address:
            return self.allowed[0]
        if address not in self.allowed:
            raise PermissionDenied(
                f"this worker does not forward to {address!r}; its next tiers are {', '.join(self.allowed)}. Name one "
                f"of those in the hop, or start the worker with --next-tier {address} to allow it")
        return address

    def _codec(self, name: str) -> Codec:
        if name not in self._codecs:
            self._codecs[name] = get_codec(name)  # InvalidInput with the valid names; "ans" needs a TL: refused
        return self._codecs[name]

    def _stream(self, address: str) -> EdgeStream:
        stream = self._streams.get(address)
        if stream is None:
            deaths = self.metrics.stream_deaths
            m = _TierMetrics(self.metrics.next_tier_up.labels(address), self.metrics.next_tier_opens.labels(address),
                             lambda reason: deaths.labels("next_tier", reason).inc())
            stream = EdgeStream(address, self.config.transport(), m, self.config.forward_connect_timeout_seconds,
                                self.config.forward_reconnect_seconds,
                                link_hint=lambda: (self._bandwidth.get(address, 0.0), 0.0))
            self._streams[address] = stream
        return stream

    async def forward(self, route: Route, tensor) -> tuple[pb.InferResult, float]:
        """Send the slice output; returns the next tier's (successful) result and the round trip in seconds."""
        stream = self._stream(route.address)
        header = pb.FrameHeader()
        header.CopyFrom(route.header)
        header.seq = seq = next(self._seq)
        inject_frame(header)  # the next tier's worker.frame is a child of this worker.forward span (tracing on)
        req = pb.StreamRequest()  # sent as is when it fits one message (runtime.wire.transport.frame_messages)
        req.frame.header.CopyFrom(header)
        req.frame.tensor.CopyFrom(tensor)
        deadline = self.config.forward_deadline_seconds
        t0 = time.perf_counter()
        try:
            res = await asyncio.wait_for(self._round_trip(stream, req, route.address), deadline)
        except asyncio.TimeoutError:
            stream.abandon(seq)
            self._count(route.address, grpc.StatusCode.DEADLINE_EXCEEDED)
            raise DeadlineExceeded(f"next tier {route.address} gave no result within {deadline:g}s "
                                   "(--forward-deadline-seconds on this worker)") from None
        except Unavailable as e:
            self._count(route.address, grpc.StatusCode.UNAVAILABLE)
            raise Unavailable(f"next tier {route.address} unreachable: {e}") from None
        rt = time.perf_counter() - t0
        code = CODES_BY_NUMBER.get(res.code, grpc.StatusCode.UNKNOWN)
        self._count(route.address, code)
        if code != grpc.StatusCode.OK:
            raise from_status(code, f"next tier {route.address} refused the frame: {code.name}: {res.message}")
        self.metrics.forward_seconds.labels(route.address).observe(rt)
        self._sample(route.address, req.frame.tensor.payload_size, rt, res)
        return res, rt

    def _sample(self, address: str, nbytes: int, rt: float, res: pb.InferResult) -> None:
        """A goodput sample from one forward: its bytes over the round trip less the next tier's hold."""
        if not (res.sent_seconds > 0 and res.received_last_seconds > 0) or nbytes <= 0:
            return
        network = rt - (res.sent_seconds - res.received_last_seconds)
        if network > 0:
            old = self._bandwidth.get(address)
            sample = nbytes / network
            self._bandwidth[address] = sample if old is None else 0.7 * old + 0.3 * sample

    async def _round_trip(self, stream: EdgeStream, req: pb.StreamRequest, address: str) -> pb.InferResult:
        fut = await stream.send(req)
        self.metrics.forwarded_bytes.labels(address).inc(req.frame.tensor.payload_size)
        return await fut

    def _count(self, address: str, code: grpc.StatusCode) -> None:
        self.metrics.forwarded.labels(address, code.name).inc()

    async def prepare(self, route: Route, timeout: float | None) -> pb.PrepareResult:
        """Have the next tier load the rest of the route (bounded). Raises EdgesplitError naming it."""
        timeout = PREPARE_TIMEOUT_SECONDS if timeout is None else max(0.1, timeout)
        stream = self._stream(route.address)
        try:
            return await asyncio.wait_for(stream.prepare(route.header, timeout), timeout + 1.0)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"next tier {route.address} did not answer Prepare within {timeout:g}s") from None
        except Unavailable as e:
            raise Unavailable(f"next tier {route.address} unreachable: {e}") from None
        except EdgesplitError as e:
            raise type(e)(f"next tier {route.address} cannot serve the rest of the route: {e}", e.code) from None

    async def close(self) -> None:
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            await stream.close()
