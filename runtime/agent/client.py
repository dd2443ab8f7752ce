"""The device agent's core: head + encode on the board, a long-lived stream to the worker,
results matched by sequence number, and local fallback so every frame gets exactly one result."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import torch

from runtime.codec import Codec, decode_tensor
from runtime.errors import CODES_BY_NUMBER, EdgesplitError, InvalidInput, Unavailable, from_rpc_error
from runtime.models.loader import LoadedModel
from runtime.models.slicing import SplitPoint
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.transport import TransportOptions, frame_messages
from runtime.agent.metrics import STAGES, AgentMetrics

logger = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 30.0


@dataclass
class FrameResult:
    """Exactly one per frame, whether it ran on the edge or locally."""

    seq: int
    frame: str
    output: torch.Tensor
    where: str  # "edge" or "local"
    split: str
    codec: str
    plan_version: int = 0
    fallback_reason: str = ""
    wire_bytes: int = 0
    times: dict[str, float] = field(default_factory=dict)  # seconds by stage

    def top1(self) -> tuple[int, float]:
        probs = torch.softmax(self.output.reshape(-1).float(), dim=0)
        score, idx = probs.max(dim=0)
        return int(idx), float(score)

    def to_json(self, labels: tuple[str, ...] | None) -> dict:
        idx, score = self.top1()
        return {
            "seq": self.seq,
            "frame": self.frame,
            "class_index": idx,
            "label": labels[idx] if labels and idx < len(labels) else None,
            "score": round(score, 6),
            "where": self.where,
            "fallback_reason": self.fallback_reason or None,
            "split": self.split,
            "codec": self.codec,
            "plan_version": self.plan_version,
            "wire_bytes": self.wire_bytes,
            "times_ms": {k: round(v * 1e3, 3) for k, v in self.times.items()},
        }


class EdgeStream:
    """One bidirectional stream to a worker; reopened with exponential back-off after a failure."""

    def __init__(self, address: str, transport: TransportOptions, metrics: AgentMetrics,
                 connect_timeout: float, reconnect: float):
        self.address = address
        self.transport = transport
        self.metrics = metrics
        self.connect_timeout = connect_timeout
        self.reconnect = reconnect
        self.epoch = 0
        self._backoff = reconnect
        self._retry_at = 0.0
        self._channel: grpc.aio.Channel | None = None
        self._call = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._open_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()

    @property
    def is_open(self) -> bool:
        return self._call is not None

    async def _ensure_open(self) -> None:
        if self._call is not None:
            return
        async with self._open_lock:
            if self._call is not None:
                return
            now = time.monotonic()
            if now < self._retry_at:
                raise Unavailable(f"worker {self.address} unreachable; next try in {self._retry_at - now:.1f}s")
            channel = grpc.aio.insecure_channel(self.address, options=self.transport.channel_options())
            try:
                await asyncio.wait_for(channel.channel_ready(), self.connect_timeout)
            except (asyncio.TimeoutError, grpc.RpcError) as e:
                await channel.close()
                self._retry_at = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, MAX_BACKOFF_SECONDS)
                raise Unavailable(f"worker {self.address} unreachable ({type(e).__name__})") from None
            self._channel = channel
            self._call = pb_grpc.InferenceStub(channel).InferStream()
            self.epoch += 1
            self._backoff = self.reconnect
            self._reader = asyncio.create_task(self._read(self._call, self.epoch))
            self.metrics.stream_up.set(1)
            self.metrics.reconnects.inc()
            logger.info("stream %d open to %s", self.epoch, self.address)

    async def _read(self, call, epoch: int) -> None:
        reason = "stream closed by the worker"
        try:
            async for res in call:
                if res.header.stream_epoch != epoch:
                    continue
                fut = self._pending.pop(res.header.seq, None)
                if fut is not None and not fut.done():
                    fut.set_result(res)  # a result for an abandoned frame is dropped here
        except grpc.aio.AioRpcError as e:
            reason = f"stream failed: {e.code().name} {e.details()}"
        except asyncio.CancelledError:
            reason = "agent closing"
        finally:
            self._broken(call, reason)

    def _broken(self, call, reason: str) -> None:
        if self._call is not call:
            return
        level = logging.INFO if reason == "agent closing" else logging.WARNING
        logger.log(level, "stream %d to %s ended: %s", self.epoch, self.address, reason)
        self._call = None
        self.metrics.stream_up.set(0)
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_SECONDS)
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(Unavailable(reason))
        channel, self._channel = self._channel, None
        if channel is not None:
            asyncio.get_running_loop().create_task(channel.close(grace=None))

    async def send(self, request: pb.InferRequest) -> asyncio.Future:
        """Send one frame; returns a future for its result. Raises Unavailable."""
        await self._ensure_open()
        call = self._call
        request.header.stream_epoch = self.epoch
        seq = request.header.seq
        fut = asyncio.get_running_loop().create_future()
        self._pending[seq] = fut
        try:
            async with self._write_lock:
                for msg in frame_messages(request, self.transport.chunk_bytes):
                    await call.write(msg)
        except (grpc.RpcError, asyncio.InvalidStateError, RuntimeError) as e:
            self._pending.pop(seq, None)
            self._broken(call, f"write failed: {type(e).__name__}")
            raise Unavailable(f"could not send frame {seq}: {e}") from None
        return fut

    async def prepare(self, header: pb.FrameHeader, timeout: float) -> pb.PrepareResult:
        """Have the worker load the tail now (unary, with a deadline). Raises EdgesplitError."""
        await self._ensure_open()
        try:
            return await pb_grpc.InferenceStub(self._channel).Prepare(pb.PrepareRequest(header=header), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None

    def abandon(self, seq: int) -> None:
        self._pending.pop(seq, None)

    async def close(self) -> None:
        call = self._call
        if call is not None:
            try:
                await asyncio.wait_for(call.done_writing(), 1.0)
            except Exception:
                pass
            call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None


class Agent:
    """Runs the head on the board and the tail on the edge (or locally when it must)."""

    def __init__(self, loaded: LoadedModel, split: SplitPoint, codec: Codec, *, worker: str = "",
                 agent_id: str = "", transport: TransportOptions | None = None,
                 deadline_seconds: float = 2.0, connect_timeout: float = 2.0, reconnect: float = 1.0,
                 metrics: AgentMetrics | None = None, plan_version: int = 0, tl=None):
        self.loaded = loaded
        self.split = split
        self.codec = codec
        self.agent_id = agent_id or f"{socket.gethostname()}-{os.getpid()}"
        self.deadline_seconds = deadline_seconds
        self.plan_version = plan_version
        self.metrics = metrics or AgentMetrics()
        self.transport = transport or TransportOptions()
        # One thread: the board's compute (head, encode, local tail) runs one frame at a time.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="board")
        self.head = loaded.head(split.name)
        self._local_tail = loaded.tail(split.name)
        # Transfer Layer (a runtime.transfer.artifact.LoadedTL): its encoder runs after the head, on
        # the board thread, timed as stage "tl_encode"; local fallback still uses the raw head output.
        self.tl = tl
        self.encoder = tl.tl.encoder if tl is not None else None
        if tl is not None and (tl.model.name != loaded.name or tl.split.name != split.name):
            raise InvalidInput(f"Transfer Layer {tl.tl_id} is for {tl.model.name}@{tl.split.name}, "
                               f"not {loaded.name}@{split.name}")
        self.stream = EdgeStream(worker, self.transport, self.metrics, connect_timeout, reconnect) if worker else None
        self._seq = itertools.count()

    def _header(self, seq: int = 0) -> pb.FrameHeader:
        return pb.FrameHeader(agent_id=self.agent_id, seq=seq, model_id=self.loaded.name, split_id=self.split.name,
                              plan_version=self.plan_version, model_digest=self.loaded.digest,
                              tl_id=self.tl.tl_id if self.tl is not None else "")

    async def start(self, timeout: float = 120.0) -> None:
        """Open the stream and have the worker load the tail, so the first frame does not wait for it.

        A worker that cannot serve this model/split is reported here; frames then run locally.
        """
        if self.stream is None:
            return
        try:
            res = await self.stream.prepare(self._header(), timeout)
            logger.info("worker ready for %s@%s (loaded in %.2fs)", self.loaded.name, self.split.name, res.load_seconds)
        except EdgesplitError as e:
            logger.warning("worker %s cannot serve %s@%s yet: %s: %s", self.stream.address, self.loaded.name,
                           self.split.name, e.code.name, e)

    def _head_encode(self, x: torch.Tensor):
        """Head, then (with a TL and a worker) the TL encoder, then the wire codec.
        Returns (h, message, start, head s, codec s, tl_encode s or None); h is the raw head output."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            h = self.head(x)
        t1 = time.perf_counter()
        z, t_tl = h, None
        if self.encoder is not None and self.stream is not None:
            with torch.inference_mode():
                z = self.encoder(h)
            t_tl = time.perf_counter() - t1
        t2 = time.perf_counter()
        msg = self.codec.encode(z) if self.stream is not None else None
        return h, msg, t0, t1 - t0, time.perf_counter() - t2, t_tl

    def _run_local_tail(self, h: torch.Tensor):
        t0 = time.perf_counter()
        with torch.inference_mode():
            y = self._local_tail(h)
        return y, time.perf_counter() - t0

    async def infer(self, x: torch.Tensor, frame: str = "") -> FrameResult:
        """One frame, start to finish. Never raises for network trouble: it falls back locally."""
        seq = next(self._seq)
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        h, msg, t_start, t_head, t_enc, t_tl = await loop.run_in_executor(self.executor, self._head_encode, x)
        result = FrameResult(seq, frame or f"frame-{seq}", torch.empty(0), "edge", self.split.name,
                             self.codec.name, self.plan_version)
        # board_queue: waiting for the board thread (other frames' head or local tail)
        result.times.update(board_queue=t_start - t0, head=t_head, encode=t_enc)
        if t_tl is not None:
            result.times["tl_encode"] = t_tl
        reason = "no worker configured"
        if self.stream is not None:
            req = pb.InferRequest(header=self._header(seq), tensor=msg)
            result.wire_bytes = len(msg.buffer)
            t_send = time.perf_counter()
            try:
                fut = await self.stream.send(req)
                self.metrics.sent_bytes.inc(result.wire_bytes)
                self.metrics.inflight.inc()
                try:
                    res = await asyncio.wait_for(fut, self.deadline_seconds)
                finally:
                    self.metrics.inflight.dec()
                if res.code != 0:
                    code = CODES_BY_NUMBER.get(res.code, grpc.StatusCode.UNKNOWN)
                    raise EdgesplitError(f"worker refused: {code.name}: {res.message}", code)
                result.output = decode_tensor(res.output)
                result.times.update(transfer_edge=time.perf_counter() - t_send, edge_queue=res.times.queue_seconds,
                                    edge_decode=res.times.decode_seconds, edge_tail=res.times.tail_seconds)
            except asyncio.TimeoutError:
                self.stream.abandon(seq)
                reason = f"deadline: no edge result within {self.deadline_seconds:g}s"
            except EdgesplitError as e:
                reason = str(e) if str(e).startswith("worker refused") else f"worker unavailable: {e}"
            else:
                reason = ""
        if reason:
            result.where, result.fallback_reason = "local", reason
            self.metrics.fallbacks.labels(_reason_label(reason)).inc()
            logger.debug("frame %d runs locally: %s", seq, reason)
            result.output, t_tail = await loop.run_in_executor(self.executor, self._run_local_tail, h)
            result.times["local_tail"] = t_tail
        result.times["total"] = time.perf_counter() - t0
        self.metrics.frames.labels(result.where).inc()
        for stage, seconds in result.times.items():
            if stage in STAGES:
                self.metrics.stage_seconds.labels(stage).observe(seconds)
        return result

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.close()
        self.executor.shutdown(wait=False)


def _reason_label(reason: str) -> str:
    """Bounded label values for the fallback counter."""
    for prefix, label in (("deadline", "deadline"), ("worker refused", "refused"), ("worker unavailable", "unavailable")):
        if reason.startswith(prefix):
            return label
    return "no_worker"
