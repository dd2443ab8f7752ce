"""The device agent's core: head + encode on the board, a long-lived stream to the worker,
results matched by sequence number, and local fallback so every frame gets exactly one result.

Its parts: runtime.agent.frame (FrameResult), runtime.agent.plan (ActivePlan, PlanBuilder: checking
and building a plan), runtime.agent.edge (EdgeSender: one frame's round trip to its worker).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import torch

from runtime.agent.boardplace import INLINE_BOARD_SECONDS, BoardPlacement
from runtime.agent.config import AgentOptions, InitialPlan, default_agent_id
from runtime.agent.edge import EdgeSender
from runtime.agent.frame import FrameResult, top1_margin
from runtime.agent.inflight import InFlight
from runtime.agent.metrics import AgentMetrics
from runtime.agent.metrics import reason_label as _reason_label
from runtime.agent.parallel import CoordinatorOptions
from runtime.agent.parallel_push import PushedStage
from runtime.agent.plan import ActivePlan, PlanBuilder
from runtime.agent.telemetry import LinkEstimator
from runtime.contracts.errors import EdgesplitError, InvalidInput
from runtime.daemon.tracing import agent_frame
from runtime.models.loader import LoadedModel
from runtime.models.slicing import INPUT, OUTPUT
from runtime.wire import handoff
from runtime.wire.chain import Hop
from runtime.wire.codec import Codec
from runtime.wire.stream import EdgeStream

__all__ = ["ActivePlan", "Agent", "FrameResult"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


# a frame's output until its result or its local tail sets it (never handed out): one tensor, not torch.empty(0)
# per frame (12 us of the loop thread's time a frame between frames, where torch's dispatch runs cold; issue 14)
_NO_OUTPUT = torch.empty(0)


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
        self.agent_id = options.agent_id or default_agent_id(options.transport.security.cert_file)
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
        self.link.keep_history = False  # read only by a planner link's result lines: it turns it on (PlannerLink)
        # One thread: the board's compute (head, encode, local tail) runs one frame at a time. (A dedicated thread on
        # a queue.SimpleQueue was measured against it, 2026-12-05: not kept; runtime/measure/results/overhead.md.)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="board")
        self.plans = PlanBuilder(loaded, self.agent_id, self.tl_dir, self.prepare_timeout, self._new_stream)
        # Transfer Layer (a runtime.transfer.artifact.LoadedTL): its encoder runs after the head, on
        # the board thread, timed as stage "tl_encode"; local fallback still uses the raw head output.
        if tl is not None and (tl.model.name != loaded.name or tl.split.name != split.name):
            raise InvalidInput(f"Transfer Layer {tl.tl_id} is for {tl.model.name}@{tl.split.name}, "
                               f"not {loaded.name}@{split.name}")
        stream = self._new_stream(worker) if worker and split.name != OUTPUT else None
        end, hops = self.plans.check_route(split, plan.end_split, plan.next_hops, stream is not None)
        self._streams: dict[str, EdgeStream] = {worker: stream} if stream is not None else {}
        self.active = ActivePlan(plan.version, split, codec, loaded.head(split.name), loaded.tail(split.name), tl,
                                 stream, end, hops)
        self.metrics.plan_version.set(plan.version)
        self.metrics.plan_split_index.set(split.index)
        self._plan_lock = asyncio.Lock()  # one apply_plan at a time
        self._retiring: set[asyncio.Task] = set()
        self._retired: list[EdgeStream] = []  # streams a switch left behind (closed once idle)
        self._seq = itertools.count()
        # A frame's board work runs on this loop's thread, not handed to the board thread and back, when it is the
        # agent's only frame, the board thread is idle and the plan's last frame took at most this long on the board,
        # or longer while the hand-offs back are measured to stall (_board_inline, runtime.agent.boardplace; 0: never).
        # The bound is the stall the stream's liveness takes as this process's own (runtime.wire.liveness)
        self.inline_board_seconds = INLINE_BOARD_SECONDS
        self.board_place = BoardPlacement()
        self._frames = 0  # frames between infer's start and their result
        self._board_jobs = 0  # jobs handed to the board thread and not yet ended
        self._board_last: tuple[ActivePlan | None, float] = (None, math.inf)  # (plan, its last frame's board seconds)
        self.board_handoffs = 0  # jobs handed to the board thread so far (tests count them)
        self.inflight = InFlight(self.link)  # frames sent and not yet answered, per link; late ones are evidence
        self._probe_channels: dict[str, grpc.aio.Channel] = {}  # RTT probes' own connection (probe_rtt)
        self.edge = EdgeSender(self.link, self.inflight, self.metrics, self.deadline_seconds)
        self.link.use(self.active.worker)
        # a pushed plan's parallel stage (Plan.parallel, RFS/DPFP): while active, frames go through it
        self.parallel = PushedStage(loaded, CoordinatorOptions(transport=self.transport, agent_id=self.agent_id,
                                                               halo=options.parallel_halo,
                                                               halo_early=options.parallel_halo_early),
                                    prepare_timeout_seconds=self.prepare_timeout, link=self.link,
                                    edge=self.edge, new_stream=self._new_stream)  # its tail worker's frames

    # The active plan's parts, for callers that predate ActivePlan (read-only).
    split = property(lambda self: self.active.split)
    codec = property(lambda self: self.active.codec)
    tl = property(lambda self: self.active.tl)
    plan_version = property(lambda self: self.active.version)
    head = property(lambda self: self.active.head)
    encoder = property(lambda self: self.active.encoder)
    stream = property(lambda self: self.active.stream)

    @property
    def telemetry_plan_version(self) -> int:
        """The plan version telemetry reports: 0 under an entry of the fallback table (the agent's own
        band switch), whose split is not the plan's: the planner then takes no compute sample for the
        plan's split from these frames (a band plan has no version of its own)."""
        return 0 if self.active.fallback else self.active.version

    def _new_stream(self, address: str) -> EdgeStream:
        stream = EdgeStream(address, self.transport, self.metrics, self.connect_timeout, self.reconnect,
                            link_hint=lambda: self._link_hint(address))
        stream.on_rtt = self.metrics.stream_rtt.observe  # its idle probes' echoes: edgesplit_agent_stream_rtt_seconds
        return stream

    def _link_hint(self, address: str) -> tuple[float, float]:
        """(bandwidth B/s, RTT s) of the link to ``address`` for the stream's liveness (0.0: unknown)."""
        est = self.link.links.get(address)
        return (est.bandwidth.value, est.rtt.value) if est is not None else (0.0, 0.0)

    async def start(self, timeout: float = 120.0) -> None:
        """Open the stream and have the worker load the tail, so the first frame does not wait for it.

        A worker that cannot serve this model/split is reported here; frames then run locally.
        """
        plan = self.active
        if plan.stream is None:
            return
        try:
            res = await plan.stream.prepare(self.plans.header(plan), timeout)
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

        Checked before anything changes (runtime.agent.plan.PlanBuilder): the model (``model_id``,
        when given) is this agent's, ``version`` is newer than the current one, the split exists,
        the codec is known, the TL loads and belongs to this model and split, and the worker's
        Prepare accepts the new split (a refusal there refuses the plan; an unreachable *current*
        worker does not, since the old plan needs it as much). Head, tail and TL are built off the
        event loop. Then ``self.active`` is replaced in one assignment: frames already started
        finish under the old plan, later frames use the new one. A stream the new plan no longer
        uses is closed once the frames holding it are done.

        Raises an EdgesplitError (NotFound, InvalidInput, PreconditionFailed, Unavailable, ...)
        whose message starts with ``plan vN refused:``; the old plan then stays in effect.
        """
        async with self._plan_lock:
            current = self.active
            address = worker_address if worker_address is not None else (current.worker or self.worker_address)
            try:
                plan, fresh = await self.plans.build(current, self._streams, split, codec, tl, int(version), address,
                                                     model_id, end_split, next_hops, fallback)
            except EdgesplitError as e:
                self.metrics.plan_refusals.labels(e.code.name).inc()
                logger.warning("plan v%s refused (keeping v%d): %s", version, current.version, e, extra={"plan": version})
                raise type(e)(f"plan v{version} refused: {e}", e.code) from None
            self._switch(current, plan, fresh)

    def _switch(self, current: ActivePlan, plan: ActivePlan, fresh: bool) -> None:
        self.active = plan  # the switch: frames that start from here on use the new plan
        self._board_last = (None, math.inf)  # its first frame goes to the board thread (_board_inline)
        if fresh:
            self._streams[plan.stream.address] = plan.stream
        if current.stream is not None and current.stream is not plan.stream:
            self._retire(current.stream)
        self.metrics.plan_switches.inc()
        self.link.use(plan.worker)
        self.metrics.plan_version.set(plan.version)
        self.metrics.plan_split_index.set(plan.split.index)
        logger.info("plan v%d in effect: %s@%s (%s) codec %s TL %s worker %s%s", plan.version, self.loaded.name,
                    plan.split.index, plan.split.name, plan.codec.name, plan.tl_id or "none", plan.worker or "none",
                    plan.chain, extra={"plan": plan.version, "model": self.loaded.name, "split": plan.split.name})

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
        """One RTT probe of the active plan's worker (folded into ``self.link``); None without one.

        On a connection of its own (``TransportOptions.probe_channel``), not the frames': a probe on the
        frame connection waits behind every byte queued ahead of it, and measured the backlog, not the RTT."""
        address = self.active.worker
        if not address:
            return None
        channel = self._probe_channels.get(address)
        if channel is None:
            for old in self._probe_channels.values():  # one worker at a time: the plan's
                await old.close()
            self._probe_channels = {address: self.transport.probe_channel(address)}
            channel = self._probe_channels[address]
        return await self.link.probe_rtt(channel, timeout, address, queued=self.inflight.bytes(address) > 0)

    # -- frames ------------------------------------------------------------------------------

    def _head_encode(self, plan: ActivePlan, x: torch.Tensor):
        """Head, then (with a TL and a worker) the TL encoder, then the wire codec, straight into the
        stream message the frame travels in (its header is set at send time; no copy of the payload).
        Returns (h, message, start, head s, codec s, tl_encode s or None, (output, tail s) or None, end); h is the
        raw head output; the 7th is set when the plan sends nothing (the tail ran here); start and end: perf_counter."""
        t0 = time.perf_counter()
        if plan.split.name == INPUT:  # the head there is the empty graph, x itself: not called (nor inference_mode
            h = x                     # entered), 0.1 ms of a frame's board time after the board sat idle (issue 14)
        else:
            with torch.inference_mode():
                h = plan.head(x)
        t1 = time.perf_counter()
        z, t_tl = h, None
        if plan.encoder is not None and plan.stream is not None:
            with torch.inference_mode():
                z = plan.encoder(h)
            t_tl = time.perf_counter() - t1
        t2 = time.perf_counter()
        msg, tail = None, None
        if plan.stream is not None:
            msg = plan.codec.encode_frame(z)  # the payload beside the message until gRPC writes it (wire.framewire)
        t_enc = time.perf_counter() - t2
        if plan.stream is None:
            # nothing to send: the tail runs in this board job too, not queued behind the next frame's head
            tail = self._run_local_tail(plan, h)
        return h, msg, t0, t1 - t0, t_enc, t_tl, tail, time.perf_counter()

    def _on_board(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` on the board thread, its result (or exception) on a future of the running loop, in one
        ``call_soon_threadsafe`` (runtime.wire.handoff.submit): what ``loop.run_in_executor(self.executor, ...)``
        did, without the executor future's done-callback and the second, chained loop future
        (asyncio.wrap_future), several Python calls a frame on both threads (issue 14)."""
        self._board_jobs += 1
        self.board_handoffs += 1
        return handoff.submit(self.executor, functools.partial(fn, *args), self._board_ended)

    def _board_ended(self) -> None:
        self._board_jobs -= 1

    def _board_inline(self, plan: ActivePlan) -> bool:
        """Whether this frame's board work runs on the loop's thread: it is the only frame in the agent (several in
        flight overlap the board with the link and the worker, and the loop must take their results meanwhile), no
        job of an earlier frame is still on the board thread (one at a time), and this plan's previous frame took at
        most ``inline_board_seconds`` there (a long head would hold the loop: probes, the local API and the planner
        link wait on it). A plan's first frame goes to the board thread. Longer board work runs on the loop too while
        the hand-offs back stall, except while the prober is timing a call there (runtime.agent.boardplace)."""
        last, seconds = self._board_last
        return (self._frames == 1 and not self._board_jobs and last is plan
                and self.board_place.inline(seconds, self.inline_board_seconds, hold=not self.link.timing))

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
        if self.parallel.active:
            return await self.parallel.infer(seq, x, frame)
        plan = self.active
        stream = plan.stream
        if stream is not None:
            stream.hold()
        self._frames += 1
        try:
            return await self._infer(plan, seq, x, frame)
        finally:
            self._frames -= 1
            if stream is not None:
                stream.release()

    @agent_frame  # the frame's log ids and, when tracing is on, its agent.frame span (runtime.daemon.tracing)
    async def _infer(self, plan: ActivePlan, seq: int, x: torch.Tensor, frame: str) -> FrameResult:
        t0 = time.perf_counter()
        handed = not self._board_inline(plan)
        if handed:
            board = await self._on_board(self._head_encode, plan, x)
            back = time.perf_counter() - board[-1]  # the board job's end -> this frame running on the loop again
        else:
            board = self._head_encode(plan, x)
        h, msg, t_start, t_head, t_enc, t_tl, tail, _ = board
        self._board_last = (plan, t_head + t_enc + (t_tl or 0.0) + (tail[1] if tail is not None else 0.0))
        result = FrameResult(seq, frame or f"frame-{seq}", _NO_OUTPUT, "edge", plan.split.name,
                             plan.codec.name, plan.version)  # its output is set below, on every path
        # board_queue: waiting for the board thread (other frames' head or local tail)
        result.times.update(board_queue=t_start - t0, head=t_head, encode=t_enc)
        if handed:
            result.times["board_return"] = back
            self.board_place.handed_back(back)
        result.raw_bytes = h.numel() * h.element_size()
        if t_tl is not None:
            result.times["tl_encode"] = t_tl
        if plan.stream is not None:
            reason = await self.edge.run(plan.stream, self.plans.header(plan, seq), msg, result)
        elif plan.split.name == OUTPUT:
            reason = "plan runs every layer on the device (split 'output')"
        else:
            reason = "no worker configured"
        if reason:
            result.where, result.fallback_reason = "local", reason
            self.metrics.fallbacks.labels(_reason_label(reason)).inc()
            logger.debug("frame %d runs locally: %s", seq, reason, extra={"frame": seq, "plan": plan.version})
            if tail is None:  # the edge failed: the tail was not run with the head
                tail = await self._on_board(self._run_local_tail, plan, h)
            result.output, t_tail = tail
            result.times["local_tail"] = t_tail
        elif self.refine_margin > 0 and top1_margin(result.output) < self.refine_margin:
            result.output, t_tail = await self._on_board(self._run_local_tail, plan, h)
            result.refined = True
            result.times["refine"] = t_tail
            self.metrics.refined.inc()
            logger.debug("frame %d: ambiguous edge result, tail re-run on the board", seq)
        result.times["total"] = time.perf_counter() - t0
        self.metrics.frames_by[result.where].inc()  # "edge" or "local"
        by_stage = self.metrics.stage_by  # the STAGES' histograms
        for stage, seconds in result.times.items():
            histogram = by_stage.get(stage)
            if histogram is not None:
                histogram.observe(seconds)
        # its stages count only under the plan telemetry names now (the planner reads a head against that plan)
        self.link.observe(result, 0 if plan.fallback else plan.version, self.telemetry_plan_version)
        return result

    async def close(self) -> None:
        await self.parallel.close()
        await self.inflight.close()
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        streams = {id(s): s for s in (*self._retired, *self._streams.values())}
        if self.active.stream is not None:
            streams[id(self.active.stream)] = self.active.stream
        for stream in streams.values():
            await stream.close()
        for channel in self._probe_channels.values():
            await channel.close()
        self.executor.shutdown(wait=False)
