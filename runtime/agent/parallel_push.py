"""The parallel stage (RFS/DPFP) of the plan the planner pushed: ``Plan.parallel`` (issue 13).

:class:`PushedStage` is what the agent holds for it: :class:`runtime.agent.planner_link.PlannerLink`
hands it every plan the agent applies, and :meth:`runtime.agent.client.Agent.infer` sends frames
through it while a stage is active (where = "parallel" in the results). The planner side is
``planner.parallel_push``; the stage from a file is ``edgesplit agent --parallel-plan``
(:mod:`runtime.agent.parallel_run`).

Frames through the stage feed the agent's link estimate (:func:`feed_link`): each tile a worker
answered is one bandwidth sample of that worker's link (keyed by its address, as an edge frame's
is), its bytes both ways over its round trip less the worker's own times and the link's base RTT.
The tiles of a block travel at the same time over the coordinator's one uplink, so a sample is the
share of the link one tile got (as for a window of edge frames), not the raw link rate.

The rest after the stage (``ParallelStage.tail_worker``, set when the planner predicts it faster on a
worker than on the board): the stitched map at the last block's end goes to that worker as an
ordinary edge frame (``FrameHeader.split_id`` = that split, the stage's codec) on a stream of its own,
sent and awaited by the agent's :class:`runtime.agent.edge.EdgeSender` within the agent's frame
deadline. If it fails (refused, unreachable, late) the agent runs the rest itself and the frame's
``fallback_reason`` says why: the frame is not lost. A frame's ``worker`` and ``times`` say where the
rest ran (``edge_tail`` and ``transfer_edge`` on the worker; ``local_tail`` on the board).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Collection

import torch

from runtime.agent.edge import EdgeSender
from runtime.agent.frame import FrameResult
from runtime.agent.parallel import LOCAL, CoordinatorOptions, ParallelCoordinator, TileMetrics
from runtime.agent.parallel_maps import TileReport
from runtime.agent.telemetry import LinkEstimator
from runtime.contracts.errors import EdgesplitError, InvalidInput
from runtime.daemon.tracing import parallel_frame
from runtime.models.loader import LoadedModel
from runtime.parallel.plan import ParallelStage
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb
from runtime.wire.asyncutil import CloseLater
from runtime.wire.stream import EdgeStream

logger = logging.getLogger(__name__)


def feed_link(link: LinkEstimator, reports: list[TileReport]) -> int:
    """Bandwidth samples of a parallel frame's remote tiles into ``link`` (a
    :class:`runtime.agent.telemetry.LinkEstimator`): per tile, its bytes both ways over its network
    time (round trip - the worker's queue, decode and compute - the link's base RTT, 0 if unknown);
    tiles under the estimator's ``min_bytes`` or with no network time left give none. Returns the
    number of samples taken."""
    taken = 0
    for r in reports:
        if r.ran_on in ("", LOCAL) or not r.answered_at:
            continue
        size = r.sent_bytes + r.received_bytes
        network = r.seconds - r.worker_seconds - link.estimate(r.ran_on).rtt.value
        if size >= link.min_bytes and network > 0:
            link.add_bandwidth_sample(size / network, r.ran_on)
            taken += 1
    return taken


def tile_times(reports: list[TileReport], workers: Collection[str]) -> tuple[dict[str, list[float]], dict[str, int]]:
    """A frame's tile round trips by the worker that computed them (one of ``workers``, the stage's, or
    "local"; a tile never computed is left out) and its failed tile attempts by worker (``workers`` only):
    ``FrameResult.tile_seconds`` / ``tile_failures``, which the agent's summary prints per worker."""
    seconds: dict[str, list[float]] = {}
    failed: dict[str, int] = {}
    for r in reports:
        if r.ran_on == LOCAL or r.ran_on in workers:
            seconds.setdefault(r.ran_on, []).append(r.seconds)
        for f in r.failures:  # "ADDRESS: CODE"
            w = f.split(": ", 1)[0]
            if w in workers:
                failed[w] = failed.get(w, 0) + 1
    return seconds, failed


class PushedStage:
    """The parallel stage of the plan the planner pushed (``Plan.parallel``), if any.

    :meth:`apply` takes each plan the agent applies: a plan with a stage gets a coordinator (the
    workers asked to load the model first), a plan without one drops it. While a stage is active the
    agent's frames go through :meth:`infer` (the head up to the stage and the tail after it on the
    device, the blocks tiled over the workers; a failed worker's tiles are recomputed elsewhere or
    locally, so no frame is lost)."""

    def __init__(self, loaded: LoadedModel, options: CoordinatorOptions | None = None, metrics: TileMetrics | None = None,
                 prepare_timeout_seconds: float = 60.0, link: LinkEstimator | None = None,
                 edge: EdgeSender | None = None, new_stream: Callable[[str], EdgeStream] | None = None):
        self.loaded = loaded
        # the rest after the stage on its tail worker: the agent's sender and its way to open a stream (None: the
        # rest always runs here)
        self.edge, self.new_stream = edge, new_stream
        self.tail_stream: EdgeStream | None = None  # the active stage's stream to its tail worker
        self.link = link  # the agent's LinkEstimator: frames through the stage feed it (None: they do not)
        self.options = options or CoordinatorOptions()
        # per-worker tile times and failures: by default in the agent's own registry (the one its LinkEstimator
        # counts into), so edgesplit_agent_tile_seconds{worker} is on the agent's metrics endpoint
        agent_metrics = link.metrics if link is not None else None
        self.metrics = metrics or TileMetrics(agent_metrics.registry if agent_metrics is not None else None)
        self.prepare_timeout_seconds = prepare_timeout_seconds
        self.coord: ParallelCoordinator | None = None
        self.version = 0  # the plan version whose stage is active
        self.predicted_seconds = 0.0
        self._replaced = CloseLater(30.0)  # replaced coordinators and tail streams: closed once frames on them end

    @property
    def active(self) -> bool:
        return self.coord is not None

    async def apply(self, plan: ppb.Plan) -> None:
        """Take a ``planner_pb2.Plan``'s stage, or none. InvalidInput (the plan is refused) for a stage
        this model cannot run: other model, unknown split, a block that cannot be tiled."""
        old = self.coord
        if not plan.HasField("parallel") or not plan.parallel.blocks:
            self.coord = None
            self._use_tail(None)
        else:
            if plan.model_id and plan.model_id != self.loaded.name:
                raise InvalidInput(f"the plan's parallel stage is for {plan.model_id!r}, the agent runs {self.loaded.name!r}")
            stage = ParallelStage.from_proto(plan.parallel, self.loaded.name)
            coord = ParallelCoordinator(self.loaded, stage, self.options, self.metrics)
            refused = await coord.prepare(self.prepare_timeout_seconds)
            if refused:
                logger.warning("plan v%d: workers not ready for the parallel stage: %s (their tiles run elsewhere)",
                               plan.version, refused)
            self._use_tail(await self._tail_stream(stage, coord))
            self.coord = coord
            logger.info("plan v%d: parallel stage %s over %s", plan.version,
                        " | ".join(f"{b.start}..{b.end}" for b in stage.blocks), ", ".join(stage.workers))
        self.version, self.predicted_seconds = plan.version, plan.predicted_seconds
        if old is not None and old is not self.coord:
            self._replaced.add(old)

    async def _tail_stream(self, stage: ParallelStage, coord: ParallelCoordinator) -> EdgeStream | None:
        """A stream to the stage's tail worker, the worker asked to load the rest (None: the rest runs here)."""
        if not stage.tail_worker or coord.last.name == "output":
            return None
        if self.edge is None or self.new_stream is None:
            logger.warning("the parallel stage names tail worker %s, but this agent sends no frames to workers: "
                           "the rest runs here", stage.tail_worker)
            return None
        old = self.tail_stream
        stream = old if old is not None and old.address == stage.tail_worker else self.new_stream(stage.tail_worker)
        try:
            await stream.prepare(self._header(coord, 0), self.prepare_timeout_seconds)
        except EdgesplitError as e:  # not fatal: each frame tries it and runs the rest here if it fails
            logger.warning("tail worker %s did not prepare %s@%s: %s %s", stage.tail_worker, self.loaded.name,
                           coord.last.name, e.code.name, e)
        return stream

    def _use_tail(self, stream: EdgeStream | None) -> None:
        old, self.tail_stream = self.tail_stream, stream
        if old is not None and old is not stream:
            self._replaced.add(old)

    def _header(self, coord: ParallelCoordinator, seq: int) -> pb.FrameHeader:
        return pb.FrameHeader(agent_id=self.options.agent_id, seq=seq, model_id=self.loaded.name,
                              split_id=coord.last.name, plan_version=self.version,
                              model_digest=self.loaded.digest if self.options.model_digest else "")

    async def _tail(self, coord: ParallelCoordinator, stream: EdgeStream, result: FrameResult,
                    y: torch.Tensor) -> torch.Tensor:
        """The rest of the frame from the stitched map ``y`` on the tail worker, else here (``result`` says which)."""
        assert self.edge is not None
        t0 = time.perf_counter()
        stream.hold()
        try:
            msg = await coord.encode_frame(y)
            result.times["encode"] = time.perf_counter() - t0
            reason = await self.edge.run(stream, self._header(coord, result.seq), msg, result)
        except EdgesplitError as e:
            reason = f"tail worker failed: {e}"
        finally:
            stream.release()
        if not reason:
            return result.output
        result.fallback_reason, result.worker = reason, ""
        logger.warning("frame %d: the rest after the parallel stage runs here: %s", result.seq, reason)
        t1 = time.perf_counter()
        out = await coord.local_tail(y)
        result.times["local_tail"] = time.perf_counter() - t1
        return out

    @parallel_frame  # log ids and, when tracing is on, the frame's agent.frame span (runtime.daemon.tracing)
    async def infer(self, seq: int, x: torch.Tensor, frame: str = "") -> FrameResult:
        """One frame through the active stage: a ``FrameResult`` with where = "parallel"."""
        coord = self.coord
        if coord is None:
            raise InvalidInput("no parallel stage is active")
        t0 = time.perf_counter()
        result = FrameResult(seq, frame or f"frame-{seq}", x, "parallel", coord.stage.blocks[0].start,
                             coord.codec_name, self.version, predicted_seconds=self.predicted_seconds)
        stream = self.tail_stream
        tail = functools.partial(self._tail, coord, stream, result) if stream is not None else None
        result.output, reports = await coord.run_frame(x, tail=tail)
        result.wire_bytes += sum(r.sent_bytes + r.received_bytes for r in reports)
        result.times["total"] = time.perf_counter() - t0
        result.times["tiles_max"] = max((r.seconds for r in reports), default=0.0)
        result.tile_seconds, result.tile_failures = tile_times(reports, coord.stage.workers)
        if self.link is not None:
            self.link.observe(result)  # the frame and its stage times (where = "parallel": no sample of its own)
            feed_link(self.link, reports)
        return result

    async def close(self) -> None:
        await self._replaced.close_now()
        if self.tail_stream is not None:
            await self.tail_stream.close()
            self.tail_stream = None
        if self.coord is not None:
            await self.coord.close()
            self.coord = None
