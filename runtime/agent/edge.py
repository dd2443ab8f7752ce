"""One frame's round trip to its worker: send (bounded by the frame's deadline), wait for the result,
and read the worker's stage times into the FrameResult; a late or broken frame becomes a censored
link sample and a reason to run locally."""

from __future__ import annotations

import asyncio
import time

import grpc

from runtime.agent.frame import FrameResult
from runtime.agent.inflight import InFlight
from runtime.agent.metrics import AgentMetrics
from runtime.agent.telemetry import LinkEstimator
from runtime.contracts.errors import CODES_BY_NUMBER, DeadlineExceeded, EdgesplitError
from runtime.daemon.tracing import inject_frame, span
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.wire.codec import decode_tensor, wire_bytes
from runtime.wire.framewire import OutFrame
from runtime.wire.stream import EdgeStream, GivenUp
from runtime.wire.transport import link_chunk_bytes


def read_result(res: pb.InferResult, result: FrameResult, t_send: float) -> None:
    """The worker's answer into ``result``: output tensor and stage times. Raises EdgesplitError on a refusal."""
    if res.code != 0:
        code = CODES_BY_NUMBER.get(res.code, grpc.StatusCode.UNKNOWN)
        raise EdgesplitError(f"worker refused: {code.name}: {res.message}", code)
    result.output = decode_tensor(res.output)
    result.times.update(transfer_edge=time.perf_counter() - t_send, edge_queue=res.times.queue_seconds,
                        edge_decode=res.times.decode_seconds, edge_tail=res.times.tail_seconds)
    if res.sent_seconds > 0 and res.received_last_seconds > 0:  # the worker's clock: only differences count
        result.times["edge_held"] = max(0.0, res.sent_seconds - res.received_last_seconds)  # last byte in -> result out
        result.times["edge_receive"] = max(0.0, res.received_last_seconds - res.received_first_seconds)
    if res.hops:  # a chained frame: the worker's wait on its next tier, then each later tier's stages
        result.times["edge_forward"] = res.times.forward_seconds
        for i, hop in enumerate(res.hops, 1):
            stages = {"encode": hop.encode_seconds, "round_trip": hop.round_trip_seconds,
                      "queue": hop.times.queue_seconds, "decode": hop.times.decode_seconds,
                      "tail": hop.times.tail_seconds}
            result.times.update({f"next{i}_{k}": v for k, v in stages.items()})


async def _within(fut: asyncio.Future, deadline: float) -> pb.InferResult:
    """``await fut``, failed with asyncio.TimeoutError at ``deadline`` (``time.monotonic()`` s) if still pending.
    Not asyncio.wait_for: that waits on a second future chained to ``fut``, one more event-loop pass and
    callback per frame on the result's way in (runtime/measure/results/overhead.md)."""
    loop = asyncio.get_running_loop()

    def expire() -> None:
        if not fut.done():
            fut.set_exception(asyncio.TimeoutError())

    timer = loop.call_later(max(0.0, deadline - time.monotonic()), expire)
    try:
        return await fut
    finally:
        timer.cancel()


CHUNK_FIGURE_MAX_AGE_SECONDS = 60.0  # a link's bandwidth figure older than this sizes no frame's messages


class EdgeSender:
    """Sends frames on their plan's stream and waits, within ``deadline_seconds``, for their results."""

    def __init__(self, link: LinkEstimator, inflight: InFlight, metrics: AgentMetrics, deadline_seconds: float):
        self.link = link
        self.inflight = inflight
        self.metrics = metrics
        self.deadline_seconds = deadline_seconds

    def _chunk_bytes(self, stream: EdgeStream) -> int:
        """Payload bytes per message on this stream's link (runtime.wire.transport.link_chunk_bytes); a bandwidth
        figure older than CHUNK_FIGURE_MAX_AGE_SECONDS sizes nothing (the link is taken as unmeasured)."""
        est = self.link.links.get(stream.address)
        fresh = est is not None and est.bandwidth.age(self.link.clock()) <= CHUNK_FIGURE_MAX_AGE_SECONDS
        return link_chunk_bytes(stream.transport.chunk_bytes, est.bandwidth.value if fresh and est is not None else 0.0)

    def _censored(self, address: str, ahead: int, elapsed: float) -> None:
        """No result after ``elapsed`` s: the link did not carry ``ahead`` bytes in the time left once the
        worker's recent hold is taken off (a starved worker is not a slow link; runtime.agent.estimator)."""
        network = elapsed - self.inflight.hold(address)
        if network > 0:
            self.link.observe_censored(address, ahead, network)

    async def run(self, stream: EdgeStream, header: pb.FrameHeader, req: pb.StreamRequest | OutFrame,
                  result: FrameResult) -> str:
        """Send one frame (``req``: a stream message whose frame holds the encoded tensor, or an OutFrame
        whose payload stays beside it until gRPC serialises it; built on the board thread: no copy of the
        payload) and wait (bounded) for its result; returns "" or why it must run locally."""
        seq = header.seq
        req.frame.header.CopyFrom(header)
        inject_frame(req.frame.header)  # the worker's spans join this frame's trace (tracing on; runtime.daemon.tracing)
        # what the profile's bytes count; an OutFrame counts them without serialising its payload (ByteSize would)
        result.wire_bytes = req.wire_bytes() if isinstance(req, OutFrame) else wire_bytes(req.frame.tensor)
        result.worker = stream.address
        ahead = self.inflight.sent(stream.address, seq, result.wire_bytes)  # bytes before ours, ours included
        t_send = result.sent_at = time.perf_counter()
        deadline = time.monotonic() + self.deadline_seconds  # covers the send too: a frame stuck behind others gives up
        try:
            with span("agent.send"):
                # DeadlineExceeded: not (fully) sent, the worker told to drop it
                fut = await stream.send(req, deadline, self._chunk_bytes(stream))
            metrics = self.metrics
            metrics.sent_bytes.inc(result.wire_bytes)
            metrics.raw_bytes.inc(result.raw_bytes)  # the same frames: raw / sent is the compression ratio
            metrics.inflight_frames += 1  # the gauge reads it when scraped
            try:
                with span("agent.wait"):
                    res = await _within(fut, deadline)
            finally:
                metrics.inflight_frames -= 1
            read_result(res, result, t_send)
            if "edge_held" in result.times:
                self.inflight.note_hold(stream.address, result.times["edge_held"])
        except GivenUp as e:  # the agent left this link (runtime.agent.fallbacks): not the deadline's doing
            self._censored(stream.address, ahead, time.perf_counter() - t_send)
            return f"given up: {e}"
        except (asyncio.TimeoutError, DeadlineExceeded) as e:
            if not isinstance(e, DeadlineExceeded):  # sent whole: the worker is told not to compute it
                stream.abandon(seq)
            # censored: the link did not carry `ahead` bytes in this time (runtime.agent.estimator)
            self._censored(stream.address, ahead, time.perf_counter() - t_send)
            return f"deadline: no edge result within {self.deadline_seconds:g}s"
        except EdgesplitError as e:
            refused = str(e).startswith("worker refused")
            if not refused:  # the stream broke under it: its bytes did not get through either (censored)
                self._censored(stream.address, ahead, time.perf_counter() - t_send)
            return str(e) if refused else f"worker unavailable: {e}"
        finally:
            self.inflight.done(stream.address, seq, result.wire_bytes)
        return ""
