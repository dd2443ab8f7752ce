"""``edgesplit agent --parallel-plan PLAN.json``: run every frame through a parallel stage (RFS/DPFP).

The agent runs the model up to the stage's first block, the coordinator (:mod:`runtime.agent.parallel`)
spreads the fused blocks over the workers, and the agent runs the rest. One JSON line per frame
(``where: "parallel"``, stage times, and per tile where it ran and how long it took); a summary with
per-worker tile times goes to stderr, and ``edgesplit_agent_tile_seconds{worker}`` /
``edgesplit_agent_tile_failures_total{worker,code}`` to the metrics endpoint.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import IO, Any

from runtime.agent.config import AgentConfig, default_agent_id
from runtime.agent.parallel import CoordinatorOptions, ParallelCoordinator, TileMetrics
from runtime.agent.parallel_maps import TileReport
from runtime.agent.sources import Frame, open_source
from runtime.agent.summary import percentile, tile_table
from runtime.contracts.errors import InvalidInput
from runtime.daemon.logcontext import log_scope
from runtime.daemon.metrics_http import MetricsEndpoint
from runtime.daemon.tracing import span
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
    seconds: dict[str, list[float]] = {}
    compute: dict[str, list[float]] = {}
    failed: dict[str, int] = {}
    for r in reports:
        seconds.setdefault(r.ran_on, []).append(r.seconds)
        compute.setdefault(r.ran_on, []).append(r.compute_seconds)
        for f in r.failures:
            failed[f.split(": ", 1)[0]] = failed.get(f.split(": ", 1)[0], 0) + 1
    return tile_table(seconds, failed, compute)


def load_stage(opts: ParallelRunOptions, model: str) -> ParallelStage:
    stage = ParallelStage.load(opts.plan)
    if stage.model and stage.model != model:
        raise InvalidInput(f"the parallel plan is for {stage.model!r}, the agent runs {model!r} (--model)")
    if stage.tail_worker:
        logger.warning("the plan names %s for the rest of the model after the stage; `edgesplit agent --parallel-plan` "
                       "runs the rest on this board (a planner's pushed stage sends it there)", stage.tail_worker)
    return stage.with_workers(opts.workers) if opts.workers else stage


async def run_parallel(config: AgentConfig, opts: ParallelRunOptions,
                       out: IO[str] | None = None) -> list[dict[str, Any]]:
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
        agent_id=config.agent_id or default_agent_id(config.cert_file), halo=config.parallel_halo,
        halo_early=config.parallel_halo_early), metrics)
    if endpoint is not None:
        print(f"metrics on http://{config.metrics_host}:{endpoint.port}/metrics", file=sys.stderr, flush=True)
    logger.info("parallel stage: %s over %d workers (%s)", " | ".join(f"{b.start}..{b.end}" for b in stage.blocks),
                len(stage.workers), ", ".join(stage.workers))
    labels = loaded.spec.labels
    records: list[dict[str, Any]] = []
    reports: list[TileReport] = []
    totals: list[float] = []
    try:
        t0 = time.perf_counter()
        refused = await coord.prepare(opts.prepare_timeout_seconds)
        logger.info("workers prepared in %.2f s%s", time.perf_counter() - t0,
                    f"; not ready: {refused} (their tiles run elsewhere)" if refused else "")
        with (open(config.output, "w") if config.output not in ("-", "") else nullcontext(sys.stdout)) as sink:
            sink = out or sink

            async def one(seq: int, frame: Frame) -> tuple[dict[str, Any], list[TileReport], float]:
                t0 = time.perf_counter()
                with span("agent.frame", **{"edgesplit.frame.seq": seq}), log_scope(frame=seq):  # tracing on: a root
                    y, tiles = await coord.run_frame(frame.tensor)  # each tile's InferTile a CLIENT span under it
                total = time.perf_counter() - t0
                p = torch.softmax(y.flatten().float(), 0)
                score, idx = (float(v) for v in p.max(0))
                return ({"seq": seq, "frame": frame.name, "class_index": int(idx),
                         "label": labels[int(idx)] if labels and int(idx) < len(labels) else "",
                         "score": round(score, 6), "where": "parallel", "strategy": stage.strategy,
                         "times_ms": {"total": round(total * 1e3, 3)}, "tiles": [_tile_json(r) for r in tiles]},
                        tiles, total)

            # --window frames in flight (the coordinator's work on one overlaps the workers' on another);
            # results are written in frame order
            pending: collections.deque[asyncio.Task[tuple[dict[str, Any], list[TileReport], float]]] = collections.deque()
            frames = enumerate(open_source(loaded.spec, config.source, config.frames))
            try:
                while True:
                    while len(pending) < max(1, config.window) and (item := next(frames, None)) is not None:
                        pending.append(asyncio.ensure_future(one(*item)))
                    if not pending:
                        break
                    rec, tiles, total = await pending.popleft()
                    sink.write(json.dumps(rec) + "\n")
                    sink.flush()
                    records.append(rec)
                    reports.extend(tiles)
                    totals.append(total * 1e3)
            finally:
                for task in pending:
                    task.cancel()
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

