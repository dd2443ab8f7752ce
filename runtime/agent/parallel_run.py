"""``edgesplit agent --parallel-plan PLAN.json``: run every frame through a parallel stage (RFS/DPFP).

The agent runs the model up to the stage's first block, the coordinator (:mod:`runtime.agent.parallel`)
spreads the fused blocks over the workers, and the agent runs the rest. One JSON line per frame
(``where: "parallel"``, stage times, and per tile where it ran and how long it took); a summary with
per-worker tile times goes to stderr, and ``edgesplit_agent_tile_seconds{worker}`` /
``edgesplit_agent_tile_failures_total{worker,code}`` to the metrics endpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import IO, Any

from runtime.agent.config import AgentConfig
from runtime.agent.parallel import CoordinatorOptions, ParallelCoordinator, TileMetrics, TileReport
from runtime.agent.sources import open_source
from runtime.agent.summary import percentile
from runtime.contracts.errors import InvalidInput
from runtime.daemon.logcontext import log_scope
from runtime.daemon.metrics_http import MetricsEndpoint
from runtime.daemon.tracing import parallel_frame, span
from runtime.models.loader import load_model
from runtime.parallel.plan import ParallelStage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelRunOptions:
    """What ``edgesplit agent`` adds for a parallel stage."""

    plan: str  # plan JSON ('edgesplit plan --parallel --parallel-out')
    workers: tuple[str, ...] = ()  # addresses replacing the plan's workers, in order (empty: the plan's own)
    tile_deadline_seconds: float = 10.0  # a tile without an answer by then is recomputed elsewhere
    codec: str = ""  # override the plan's codec ("": the plan's)
    prepare_timeout_seconds: float = 120.0  # how long workers may take to load the model before the first frame


def _tile_json(r: TileReport) -> dict[str, Any]:
    return {"block": r.block, "rows": list(r.rows), "cols": list(r.cols), "planned": r.planned, "ran_on": r.ran_on,
            "ms": round(r.seconds * 1e3, 3), "compute_ms": round(r.compute_seconds * 1e3, 3),
            "sent_bytes": r.sent_bytes, "failures": r.failures}


def tile_summary(reports: Sequence[TileReport]) -> str:
    """Per worker: tiles, failed attempts, p50/p95 tile round trip and worker compute (ms)."""
    by: dict[str, list[TileReport]] = {}
    failed: dict[str, int] = {}
    for r in reports:
        by.setdefault(r.ran_on, []).append(r)
        for f in r.failures:
            failed[f.split(": ", 1)[0]] = failed.get(f.split(": ", 1)[0], 0) + 1
    lines = [f"{'worker':<24} {'tiles':>6} {'failed':>6} {'p50 ms':>8} {'p95 ms':>8} {'compute p50':>11}"]
    for w in sorted(set(by) | set(failed)):
        rs = by.get(w, [])
        s = [r.seconds * 1e3 for r in rs] or [0.0]
        c = [r.compute_seconds * 1e3 for r in rs] or [0.0]
        lines.append(f"{w:<24} {len(rs):>6} {failed.get(w, 0):>6} {percentile(s, 50):>8.2f} {percentile(s, 95):>8.2f} "
                     f"{percentile(c, 50):>11.2f}")
    return "\n".join(lines)


def load_stage(opts: ParallelRunOptions, model: str) -> ParallelStage:
    stage = ParallelStage.load(opts.plan)
    if stage.model and stage.model != model:
        raise InvalidInput(f"the parallel plan is for {stage.model!r}, the agent runs {model!r} (--model)")
    return stage.with_workers(opts.workers) if opts.workers else stage


async def run_parallel(config: AgentConfig, opts: ParallelRunOptions, out: IO[str] | None = None) -> list[dict]:
    """Process ``config.source`` through the stage; returns the result records."""
    import torch

    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    loaded = load_model(config.model)
    stage = load_stage(opts, loaded.name)
    metrics = TileMetrics()
    endpoint = MetricsEndpoint(metrics.registry, config.metrics_host, config.metrics_port) if config.metrics_port >= 0 else None
    coord = ParallelCoordinator(loaded, stage, CoordinatorOptions(
        codec=opts.codec, tile_deadline_seconds=opts.tile_deadline_seconds, transport=config.transport(),
        agent_id=config.agent_id or "agent"), metrics)
    if endpoint is not None:
        print(f"metrics on http://{config.metrics_host}:{endpoint.port}/metrics", file=sys.stderr, flush=True)
    logger.info("parallel stage: %s over %d workers (%s)", " | ".join(f"{b.start}..{b.end}" for b in stage.blocks),
                len(stage.workers), ", ".join(stage.workers))
    labels = loaded.spec.labels
    records: list[dict] = []
    reports: list[TileReport] = []
    totals: list[float] = []
    try:
        t0 = time.perf_counter()
        refused = await coord.prepare(opts.prepare_timeout_seconds)
        logger.info("workers prepared in %.2f s%s", time.perf_counter() - t0,
                    f"; not ready: {refused} (their tiles run elsewhere)" if refused else "")
        with (open(config.output, "w") if config.output not in ("-", "") else nullcontext(sys.stdout)) as sink:
            sink = out or sink
            for seq, frame in enumerate(open_source(loaded.spec, config.source, config.frames)):
                t0 = time.perf_counter()
                with span("agent.frame", **{"edgesplit.frame.seq": seq}), log_scope(frame=seq):  # tracing on: a root
                    y, tiles = await coord.run_frame(frame.tensor)  # each tile's InferTile a CLIENT span under it
                total = time.perf_counter() - t0
                p = torch.softmax(y.flatten().float(), 0)
                score, idx = (float(v) for v in p.max(0))
                rec = {"seq": seq, "frame": frame.name, "class_index": int(idx),
                       "label": labels[int(idx)] if labels and int(idx) < len(labels) else "",
                       "score": round(score, 6), "where": "parallel", "strategy": stage.strategy,
                       "times_ms": {"total": round(total * 1e3, 3)}, "tiles": [_tile_json(r) for r in tiles]}
                sink.write(json.dumps(rec) + "\n")
                sink.flush()
                records.append(rec)
                reports.extend(tiles)
                totals.append(total * 1e3)
        if config.summary and records:
            print(f"== edgesplit parallel summary: {loaded.name}, {len(stage.blocks)} fused blocks over "
                  f"{len(stage.workers)} workers ({stage.strategy or 'plan'})\nframes {len(records)}: total p50 "
                  f"{percentile(totals, 50):.2f} ms, p95 {percentile(totals, 95):.2f} ms\n{tile_summary(reports)}",
                  file=sys.stderr, flush=True)
    finally:
        await coord.close()
        if endpoint is not None:
            endpoint.close()
    return records


class PushedStage:
    """The parallel stage of the plan the planner pushed (``Plan.parallel``), if any.

    :meth:`apply` takes each plan the agent applies: a plan with a stage gets a coordinator (the
    workers asked to load the model first), a plan without one drops it. While a stage is active the
    agent's frames go through :meth:`infer` (the head up to the stage and the tail after it on the
    device, the blocks tiled over the workers; a failed worker's tiles are recomputed elsewhere or
    locally, so no frame is lost)."""

    def __init__(self, loaded, options: CoordinatorOptions | None = None, metrics: TileMetrics | None = None,
                 prepare_timeout_seconds: float = 60.0):
        self.loaded = loaded
        self.options = options or CoordinatorOptions()
        self.metrics = metrics or TileMetrics()
        self.prepare_timeout_seconds = prepare_timeout_seconds
        self.coord: ParallelCoordinator | None = None
        self.version = 0  # the plan version whose stage is active
        self.predicted_seconds = 0.0

    @property
    def active(self) -> bool:
        return self.coord is not None

    async def apply(self, plan) -> None:
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
    async def infer(self, seq: int, x, frame: str = ""):
        """One frame through the active stage: a ``FrameResult`` with where = "parallel"."""
        from runtime.agent.frame import FrameResult

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
        return result

    async def close(self) -> None:
        if self.coord is not None:
            await self.coord.close()
            self.coord = None
