"""The device agent's core: head + encode on the board, a long-lived stream to the worker,
results matched by sequence number, and local fallback so every frame gets exactly one result."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import torch

from runtime.agent.config import AgentOptions, InitialPlan
from runtime.agent.inflight import InFlight
from runtime.agent.metrics import STAGES, AgentMetrics
from runtime.agent.metrics import reason_label as _reason_label
from runtime.agent.telemetry import LinkEstimator
from runtime.contracts.errors import (
    CODES_BY_NUMBER,
    DeadlineExceeded,
    EdgesplitError,
    InvalidInput,
    PreconditionFailed,
    Unavailable,
)
from runtime.models.loader import LoadedModel
from runtime.models.slicing import OUTPUT, SplitPoint
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.wire.chain import Hop, check_route
from runtime.wire.codec import Codec, codec_at, decode_tensor, wire_bytes
from runtime.wire.stream import EdgeStream

if TYPE_CHECKING:
    from runtime.transfer.artifact import LoadedTL

logger = logging.getLogger(__name__)


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
    refined: bool = False  # an ambiguous edge result replaced by the board's exact tail (see refine_margin)
    worker: str = ""  # address of the worker the frame was sent to ("" when none): its link's key in self.link
    predicted_seconds: float = 0.0  # the plan's predicted latency (0: no prediction; set by the planner link)

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
            "refined": self.refined,
            "times_ms": {k: round(v * 1e3, 3) for k, v in self.times.items()},
            "predicted_ms": round(self.predicted_seconds * 1e3, 3) if self.predicted_seconds else None,
        }


@dataclass(frozen=True)
class ActivePlan:
    """Everything one frame needs, switched as a whole.

    A frame reads ``Agent.active`` once, before its first ``await``, and uses only that object
    until it has its result: head, TL encoder, wire codec, header (split, plan version, TL id),
    stream, and the local tail for fallback. ``Agent.apply_plan`` builds a new ActivePlan in full
    and then replaces ``Agent.active`` in one assignment, so a frame never mixes two plans.
    """

    version: int
    split: SplitPoint
    codec: Codec
    head: torch.nn.Module
    local_tail: torch.nn.Module
    tl: LoadedTL | None = None
    stream: EdgeStream | None = None  # None: every frame runs on the board
    # Worker chaining (runtime.wire.chain): the worker runs [split, end_split) and forwards to next_hops.
    end_split: str = ""  # where the worker's slice ends; "" = the worker runs the whole tail
    next_hops: tuple[Hop, ...] = ()  # the tiers after the worker, in order (none: its first --next-tier)

    @property
    def encoder(self) -> torch.nn.Module | None:
        return self.tl.tl.encoder if self.tl is not None else None

    @property
    def tl_id(self) -> str:
        return self.tl.tl_id if self.tl is not None else ""

    @property
    def worker(self) -> str:
        return self.stream.address if self.stream is not None else ""

    @property
    def chain(self) -> str:
        """The chain after the worker, for logs ("" when the worker runs the whole tail)."""
        if not self.end_split:
            return ""
        return f" (slice ..{self.end_split}, then " + " -> ".join(map(str, self.next_hops or (Hop(),))) + ")"


class Agent:
    """Runs the head on the board and the tail on the edge (or locally when it must).

    Plans switch at frame boundaries: :meth:`infer` takes its sequence number and the active plan
    in the same synchronous step, so frames started before :meth:`apply_plan` swaps the plan
    finish under the old one (old stream, old split, old ``plan_version`` in their results) and
    every later frame runs the new one. Sequence numbers keep counting across switches; every
    frame still gets exactly one result.
    """

    def __init__(self, loaded: LoadedModel, plan: InitialPlan, options: AgentOptions | None = None,
                 metrics: AgentMetrics | None = None):
        options = options or AgentOptions()
        split, codec, worker, tl = plan.split, plan.codec, plan.worker, plan.tl
        self.loaded = loaded
        self.options = options
        self.agent_id = options.agent_id or f"{socket.gethostname()}-{os.getpid()}"
        self.deadline_seconds = options.deadline_seconds
        self.connect_timeout = options.connect_timeout
        self.reconnect = options.reconnect
        self.prepare_timeout = options.prepare_timeout
        self.refine_margin = options.refine_margin  # checked in [0, 1] by AgentOptions
        self.worker_address = worker  # the configured worker: used by plans that name none
        self.tl_dir = options.tl_dir
        self.metrics = metrics or AgentMetrics()
        self.transport = options.transport
        self.link = LinkEstimator(self.metrics)
        # One thread: the board's compute (head, encode, local tail) runs one frame at a time.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="board")
        # Transfer Layer (a runtime.transfer.artifact.LoadedTL): its encoder runs after the head, on
        # the board thread, timed as stage "tl_encode"; local fallback still uses the raw head output.
        if tl is not None and (tl.model.name != loaded.name or tl.split.name != split.name):
            raise InvalidInput(f"Transfer Layer {tl.tl_id} is for {tl.model.name}@{tl.split.name}, "
                               f"not {loaded.name}@{split.name}")
        stream = self._new_stream(worker) if worker and split.name != OUTPUT else None
        end, hops = self._check_route(split, plan.end_split, plan.next_hops, stream is not None)
        self._streams: dict[str, EdgeStream] = {worker: stream} if stream is not None else {}
        self.active = ActivePlan(plan.version, split, codec, loaded.head(split.name), loaded.tail(split.name), tl,
                                 stream, end, hops)
        self.metrics.plan_version.set(plan.version)
        self._plan_lock = asyncio.Lock()  # one apply_plan at a time
        self._retiring: set[asyncio.Task] = set()
        self._retired: list[EdgeStream] = []  # streams a switch left behind (closed once idle)
        self._seq = itertools.count()
        self.inflight = InFlight(self.link)  # frames sent and not yet answered, per link; late ones are evidence
        self.link.use(self.active.worker)

    # The active plan's parts, for callers that predate ActivePlan (read-only).
    split = property(lambda self: self.active.split)
    codec = property(lambda self: self.active.codec)
    tl = property(lambda self: self.active.tl)
    plan_version = property(lambda self: self.active.version)
    head = property(lambda self: self.active.head)
    encoder = property(lambda self: self.active.encoder)
    stream = property(lambda self: self.active.stream)

    def _new_stream(self, address: str) -> EdgeStream:
        return EdgeStream(address, self.transport, self.metrics, self.connect_timeout, self.reconnect)

    def _check_route(self, split: SplitPoint, end_split: str, next_hops: Sequence[Hop | str],
                     has_worker: bool) -> tuple[str, tuple[Hop, ...]]:
        """(end split name or "", hops) of a chained plan, checked against the model. Raises EdgesplitError."""
        hops = tuple(h if isinstance(h, Hop) else Hop.parse(h) for h in next_hops)
        end = check_route(self.loaded, split, end_split, hops)  # NotFound / InvalidInput
        if end is not None and not has_worker:
            raise InvalidInput(f"end split {end_split!r} names a slice for the worker, but the plan has no worker "
                               "(or runs every layer here): give a worker, or drop end_split")
        return (end.name if end is not None else ""), hops

    def _header(self, plan: ActivePlan, seq: int = 0) -> pb.FrameHeader:
        return pb.FrameHeader(agent_id=self.agent_id, seq=seq, model_id=self.loaded.name, split_id=plan.split.name,
                              plan_version=plan.version, model_digest=self.loaded.digest, tl_id=plan.tl_id,
                              end_split=plan.end_split, next_hops=[h.to_pb() for h in plan.next_hops])

    async def start(self, timeout: float = 120.0) -> None:
        """Open the stream and have the worker load the tail, so the first frame does not wait for it.

        A worker that cannot serve this model/split is reported here; frames then run locally.
        """
        plan = self.active
        if plan.stream is None:
            return
        try:
            res = await plan.stream.prepare(self._header(plan), timeout)
            logger.info("worker ready for %s@%s (loaded in %.2fs)", self.loaded.name, plan.split.name, res.load_seconds)
        except EdgesplitError as e:
            logger.warning("worker %s cannot serve %s@%s yet: %s: %s", plan.stream.address, self.loaded.name,
                           plan.split.name, e.code.name, e)

    # -- plans -------------------------------------------------------------------------------

    async def apply_plan(self, split: str | int, codec: str | Codec, tl=None, version: int = 0,
                         worker_address: str | None = None, *, model_id: str = "", end_split: str = "",
                         next_hops: Sequence[Hop | str] = (), fallback: bool = False) -> None:
        """Switch to a new plan at the next frame boundary, or refuse it and keep the current one.

        ``tl``: None/"" for none, a TL id (resolved in ``tl_dir``), a manifest path, or a LoadedTL.
        ``worker_address``: None keeps the current worker (or the configured one), "" runs every
        frame on the board; split ``"output"`` always runs locally with no worker traffic.
        ``end_split`` / ``next_hops``: a chained plan (runtime.wire.chain) in which the worker runs only
        [split, end_split) and forwards the rest along ``next_hops`` (Hop or "ADDRESS[@END_SPLIT]");
        a plan names its whole route, so the defaults ("", ()) mean the worker runs the whole tail.
        ``fallback``: an entry of the plan's fallback table (runtime.agent.fallbacks), under its ``version``.

        Checked before anything changes: the model (``model_id``, when given) is this agent's,
        ``version`` is newer than the current one, the split exists, the codec is known, the TL
        loads and belongs to this model and split, and the worker's Prepare accepts the new
        split (a refusal there refuses the plan; an unreachable *current* worker does not, since the
        old plan needs it as much). Head, tail and TL are built off the event loop. Then
        ``self.active`` is replaced in one assignment: frames already started finish under the
        old plan, later frames use the new one. A stream the new plan no longer uses is closed
        once the frames holding it are done.

        Raises an EdgesplitError (NotFound, InvalidInput, PreconditionFailed, Unavailable, ...)
        whose message starts with ``plan vN refused:``; the old plan then stays in effect.
        """
        async with self._plan_lock:
            current = self.active
            try:
                plan, fresh = await self._build_plan(current, split, codec, tl, int(version), worker_address, model_id,
                                                     end_split, next_hops, fallback)
            except EdgesplitError as e:
                self.metrics.plan_refusals.labels(e.code.name).inc()
                logger.warning("plan v%s refused (keeping v%d): %s", version, current.version, e, extra={"plan": version})
                raise type(e)(f"plan v{version} refused: {e}", e.code) from None
            self.active = plan  # the switch: frames that start from here on use the new plan
            if fresh:
                self._streams[plan.stream.address] = plan.stream
            if current.stream is not None and current.stream is not plan.stream:
                self._retire(current.stream)
            self.metrics.plan_switches.inc()
            self.link.use(plan.worker)
            self.metrics.plan_version.set(plan.version)
            logger.info("plan v%d in effect: %s@%s (%s) codec %s TL %s worker %s%s", plan.version, self.loaded.name,
                        plan.split.index, plan.split.name, plan.codec.name, plan.tl_id or "none", plan.worker or "none",
                        plan.chain, extra={"plan": plan.version, "model": self.loaded.name, "split": plan.split.name})

    async def _build_plan(self, current: ActivePlan, split, codec, tl, version: int, worker_address: str | None,
                          model_id: str, end_split: str = "", next_hops: Sequence = (),
                          fallback: bool = False) -> tuple[ActivePlan, bool]:
        """The new plan, fully built and accepted by its worker; and whether its stream is new."""
        if model_id and model_id != self.loaded.name:
            raise PreconditionFailed(f"the plan is for model {model_id!r}, but this agent runs {self.loaded.name!r}")
        if version < current.version or (version == current.version and not fallback):
            raise PreconditionFailed(f"stale plan: version {version} is not newer than the current v{current.version}")
        sp = self.loaded.split(split)  # NotFound with the valid range
        art = await self._resolve_tl(current, tl, sp)
        # InvalidInput with the valid names; "ans" codes with the plan's (transform) TL's model; jpeg only at split 0
        cod = codec_at(codec, sp.index, sp.name, model=art.tl.entropy_model if art else None, spec=self.loaded.spec)
        loop = asyncio.get_running_loop()
        # Not on the board thread: frames keep running while the new head and tail are built.
        head, tail = await loop.run_in_executor(None, lambda: (self.loaded.head(sp.name), self.loaded.tail(sp.name)))
        address = worker_address if worker_address is not None else (current.worker or self.worker_address)
        end, hops = self._check_route(sp, end_split, next_hops, sp.name != OUTPUT and bool(address))
        if sp.name == OUTPUT or not address:
            return ActivePlan(version, sp, cod, head, tail, art, None), False
        stream = self._streams.get(address)
        fresh = stream is None
        if fresh:
            stream = self._new_stream(address)
        plan = ActivePlan(version, sp, cod, head, tail, art, stream, end, hops)
        try:
            await stream.prepare(self._header(plan), self.prepare_timeout)
        except (Unavailable, DeadlineExceeded) as e:
            if fresh:
                await stream.close()
                raise Unavailable(f"worker {address} did not answer: {e}") from None
            logger.warning("worker %s unreachable while switching to plan v%d; switching anyway (frames fall "
                           "back locally until it answers): %s", address, version, e)
        except EdgesplitError as e:
            if fresh:
                await stream.close()
            raise type(e)(f"worker {address} refused {self.loaded.name}@{sp.name}"
                          f"{' with TL ' + plan.tl_id if plan.tl_id else ''}: {e}", e.code) from None
        except BaseException:
            if fresh:
                await stream.close()
            raise
        return plan, fresh

    async def _resolve_tl(self, current: ActivePlan, tl, sp: SplitPoint):
        if tl is None or tl == "":
            return None
        from runtime.transfer.artifact import LoadedTL, load_tl

        if isinstance(tl, LoadedTL):
            art = tl
        elif current.tl is not None and str(tl) in (current.tl.tl_id, str(current.tl.path)):
            art = current.tl
        else:
            loop = asyncio.get_running_loop()
            try:
                art = await loop.run_in_executor(None, lambda: load_tl(tl, self.tl_dir or None, loaded=self.loaded))
            except EdgesplitError as e:
                raise type(e)(f"Transfer Layer {str(tl)!r} (tl_dir {self.tl_dir or '.'!r}): {e}", e.code) from None
        if art.model.name != self.loaded.name or art.model.digest != self.loaded.digest:
            raise PreconditionFailed(f"Transfer Layer {art.tl_id} is for {art.model.name} weights {art.model.digest}, "
                                     f"not {self.loaded.name} weights {self.loaded.digest}")
        if art.split.name != sp.name:
            raise PreconditionFailed(f"Transfer Layer {art.tl_id} is for split {art.split.name!r}, "
                                     f"but the plan names split {sp.name!r}")
        return art

    def _retire(self, stream: EdgeStream) -> None:
        """Close ``stream`` once the frames that hold it finish (bounded; stragglers then run locally)."""
        if self._streams.get(stream.address) is stream:
            del self._streams[stream.address]
        self._retired.append(stream)
        bound = max(30.0, 4 * self.deadline_seconds)

        async def close_when_idle() -> None:
            if not await stream.wait_idle(bound):
                logger.warning("%d frames still hold the stream to %s after %.0fs; closing it", stream.users,
                               stream.address, bound)
            await stream.close()
            self._retired.remove(stream)

        task = asyncio.get_running_loop().create_task(close_when_idle())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def probe_rtt(self, timeout: float = 1.0) -> float | None:
        """One RTT probe over the active plan's stream (folded into ``self.link``); None without one."""
        stream = self.active.stream
        if stream is None or not stream.is_open:
            return None
        return await self.link.probe_rtt(stream, timeout, stream.address,
                                         queued=self.inflight.bytes(stream.address) > 0)

    # -- frames ------------------------------------------------------------------------------

    def _head_encode(self, plan: ActivePlan, x: torch.Tensor):
        """Head, then (with a TL and a worker) the TL encoder, then the wire codec.
        Returns (h, message, start, head s, codec s, tl_encode s or None); h is the raw head output."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            h = plan.head(x)
        t1 = time.perf_counter()
        z, t_tl = h, None
        if plan.encoder is not None and plan.stream is not None:
            with torch.inference_mode():
                z = plan.encoder(h)
            t_tl = time.perf_counter() - t1
        t2 = time.perf_counter()
        msg = plan.codec.encode(z) if plan.stream is not None else None
        return h, msg, t0, t1 - t0, time.perf_counter() - t2, t_tl

    @staticmethod
    def _run_local_tail(plan: ActivePlan, h: torch.Tensor):
        t0 = time.perf_counter()
        with torch.inference_mode():
            y = plan.local_tail(h)
        return y, time.perf_counter() - t0

    async def infer(self, x: torch.Tensor, frame: str = "") -> FrameResult:
        """One frame, start to finish. Never raises for network trouble: it falls back locally.

        The sequence number and the plan are taken together before the first ``await``: this
        frame runs entirely under that plan, whatever apply_plan does meanwhile.
        """
        seq = next(self._seq)
        plan = self.active
        stream = plan.stream
        if stream is not None:
            stream.hold()
        try:
            return await self._infer(plan, seq, x, frame)
        finally:
            if stream is not None:
                stream.release()

    async def _infer(self, plan: ActivePlan, seq: int, x: torch.Tensor, frame: str) -> FrameResult:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        h, msg, t_start, t_head, t_enc, t_tl = await loop.run_in_executor(self.executor, self._head_encode, plan, x)
        result = FrameResult(seq, frame or f"frame-{seq}", torch.empty(0), "edge", plan.split.name,
                             plan.codec.name, plan.version)
        # board_queue: waiting for the board thread (other frames' head or local tail)
        result.times.update(board_queue=t_start - t0, head=t_head, encode=t_enc)
        if t_tl is not None:
            result.times["tl_encode"] = t_tl
        if plan.stream is not None:
            reason = await self._on_edge(plan.stream, self._header(plan, seq), msg, result)
        elif plan.split.name == OUTPUT:
            reason = "plan runs every layer on the device (split 'output')"
        else:
            reason = "no worker configured"
        if reason:
            result.where, result.fallback_reason = "local", reason
            self.metrics.fallbacks.labels(_reason_label(reason)).inc()
            logger.debug("frame %d runs locally: %s", seq, reason, extra={"frame": seq, "plan": plan.version})
            result.output, t_tail = await loop.run_in_executor(self.executor, self._run_local_tail, plan, h)
            result.times["local_tail"] = t_tail
        elif self.refine_margin > 0 and _top1_margin(result.output) < self.refine_margin:
            result.output, t_tail = await loop.run_in_executor(self.executor, self._run_local_tail, plan, h)
            result.refined = True
            result.times["refine"] = t_tail
            self.metrics.refined.inc()
            logger.debug("frame %d: ambiguous edge result, tail re-run on the board", seq)
        result.times["total"] = time.perf_counter() - t0
        self.metrics.frames.labels(result.where).inc()
        for stage, seconds in result.times.items():
            if stage in STAGES:
                self.metrics.stage_seconds.labels(stage).observe(seconds)
        self.link.observe(result)
        return result

    async def _on_edge(self, stream: EdgeStream, header: pb.FrameHeader, msg, result: FrameResult) -> str:
        """Send one frame and wait (bounded) for its result; returns "" or why it must run locally."""
        seq = header.seq
        req = pb.InferRequest(header=header, tensor=msg)
        result.wire_bytes, result.worker = wire_bytes(msg), stream.address  # what the profile's bytes count
        ahead = self.inflight.sent(stream.address, seq, result.wire_bytes)  # bytes before ours, ours included
        t_send = time.perf_counter()
        deadline = time.monotonic() + self.deadline_seconds  # covers the send too: a frame stuck behind others gives up
        try:
            fut = await stream.send(req, deadline)  # DeadlineExceeded: not (fully) sent, the worker told to drop it
            self.metrics.sent_bytes.inc(result.wire_bytes)
            self.metrics.inflight.inc()
            try:
                res = await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
            finally:
                self.metrics.inflight.dec()
            if res.code != 0:
                code = CODES_BY_NUMBER.get(res.code, grpc.StatusCode.UNKNOWN)
                raise EdgesplitError(f"worker refused: {code.name}: {res.message}", code)
            result.output = decode_tensor(res.output)
            result.times.update(transfer_edge=time.perf_counter() - t_send, edge_queue=res.times.queue_seconds,
                                edge_decode=res.times.decode_seconds, edge_tail=res.times.tail_seconds)
            if res.hops:  # a chained frame: the worker's wait on its next tier, then each later tier's stages
                result.times["edge_forward"] = res.times.forward_seconds
                for i, hop in enumerate(res.hops, 1):
                    stages = {"encode": hop.encode_seconds, "round_trip": hop.round_trip_seconds,
                              "queue": hop.times.queue_seconds, "decode": hop.times.decode_seconds,
                              "tail": hop.times.tail_seconds}
                    result.times.update({f"next{i}_{k}": v for k, v in stages.items()})
        except (asyncio.TimeoutError, DeadlineExceeded) as e:
            if not isinstance(e, DeadlineExceeded):  # sent whole: the worker is told not to compute it
                stream.abandon(seq)
            # censored: the link did not carry `ahead` bytes in this time (runtime.agent.estimator)
            self.link.observe_censored(stream.address, ahead, time.perf_counter() - t_send)
            return f"deadline: no edge result within {self.deadline_seconds:g}s"
        except EdgesplitError as e:
            refused = str(e).startswith("worker refused")
            if not refused:  # the stream broke under it: its bytes did not get through either (censored)
                self.link.observe_censored(stream.address, ahead, time.perf_counter() - t_send)
            return str(e) if refused else f"worker unavailable: {e}"
        finally:
            self.inflight.done(stream.address, seq, result.wire_bytes)
        return ""

    async def close(self) -> None:
        await self.inflight.close()
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        streams = {id(s): s for s in (*self._retired, *self._streams.values())}
        if self.active.stream is not None:
            streams[id(self.active.stream)] = self.active.stream
        for stream in streams.values():
            await stream.close()
        self.executor.shutdown(wait=False)


def _top1_margin(output: torch.Tensor) -> float:
    """p1 - p2 of the softmax over a result's scores (1.0 when there is a single score)."""
    scores = output.reshape(-1).float()
    if scores.numel() < 2:
        return 1.0
    top = torch.softmax(scores, 0).topk(2).values
    return float(top[0] - top[1])
