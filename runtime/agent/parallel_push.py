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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection

import torch

from runtime.agent.frame import FrameResult
from runtime.agent.parallel import LOCAL, CoordinatorOptions, ParallelCoordinator, TileMetrics
from runtime.agent.parallel_maps import TileReport
from runtime.agent.telemetry import LinkEstimator
from runtime.contracts.errors import InvalidInput
from runtime.daemon.tracing import parallel_frame
from runtime.models.loader import LoadedModel
from runtime.parallel.plan import ParallelStage
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb

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
                 prepare_timeout_seconds: float = 60.0, link: LinkEstimator | None = None):
        self.loaded = loaded
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

    @property
    def active(self) -> bool:
        return self.coord is not None

    async def apply(self, plan: ppb.Plan) -> None:
        """Take a ``planner_pb2.Plan``'s stage, or none. InvalidInput (the plan is refused) for a stage
        this model cannot run: other model, unknown split, a block that cannot be tiled."""
        old = self.coord
        if not plan.HasField("parallel") or not plan.parallel.blocks:
            self.coord = None
        else:
            if plan.model_id and plan.model_id != self.loaded.name:
                raise InvalidInput(f"the plan's parallel stage is for {plan.model_id!r}, the agent runs {self.loaded.name!r}")
            stage = ParallelStage.from_proto(plan.parallel, self.loaded.name)
            coord = ParallelCoordinator(self.loaded, stage, self.options, self.metrics)
            refused = await coord.prepare(self.prepare_timeout_seconds)
            if refused:
                logger.warning("plan v%d: workers not ready for the parallel stage: %s (their tiles run elsewhere)",
                               plan.version, refused)
            self.coord = coord
            logger.info("plan v%d: parallel stage %s over %s", plan.version,
                        " | ".join(f"{b.start}..{b.end}" for b in stage.blocks), ", ".join(stage.workers))
        self.version, self.predicted_seconds = plan.version, plan.predicted_seconds
        if old is not None and old is not self.coord:
            asyncio.get_running_loop().call_later(30.0, lambda: asyncio.ensure_future(old.close()))  # frames in flight

    @parallel_frame  # log ids and, when tracing is on, the frame's agent.frame span (runtime.daemon.tracing)
    async def infer(self, seq: int, x: torch.Tensor, frame: str = "") -> FrameResult:
        """One frame through the active stage: a ``FrameResult`` with where = "parallel"."""
        coord = self.coord
        if coord is None:
            raise InvalidInput("no parallel stage is active")
        t0 = time.perf_counter()
        y, reports = await coord.run_frame(x)
        result = FrameResult(seq, frame or f"frame-{seq}", y, "parallel", coord.stage.blocks[0].start,
                             coord.codec_name, self.version, predicted_seconds=self.predicted_seconds)
        result.wire_bytes = sum(r.sent_bytes + r.received_bytes for r in reports)
        result.times["total"] = time.perf_counter() - t0
        result.times["tiles_max"] = max((r.seconds for r in reports), default=0.0)
        result.tile_seconds, result.tile_failures = tile_times(reports, coord.stage.workers)
        if self.link is not None:
            self.link.observe(result)  # the frame and its stage times (where = "parallel": no sample of its own)
            feed_link(self.link, reports)
        return result

    async def close(self) -> None:
        if self.coord is not None:
            await self.coord.close()
            self.coord = None
