"""The ``edgesplit agent`` process: source -> head/encode -> worker, JSON results, summary."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import IO

from runtime.agent.client import Agent, FrameResult
from runtime.agent.config import AgentConfig, InitialPlan
from runtime.agent.local_api import serve_local_api
from runtime.agent.metrics import AgentMetrics
from runtime.agent.pacing import Pacer
from runtime.agent.sources import open_source
from runtime.agent.summary import summarize
from runtime.daemon.logcontext import bind
from runtime.daemon.metrics_http import MetricsEndpoint
from runtime.daemon.sdnotify import notify, start_watchdog, stop_watchdog
from runtime.daemon.server import reload_on_sighup, stop_on_signals
from runtime.models.loader import LoadedModel, load_model
from runtime.models.slicing import INPUT, OUTPUT, SplitPoint
from runtime.wire.chain import Hop
from runtime.wire.codec import get_codec

logger = logging.getLogger(__name__)


def default_split(loaded: LoadedModel) -> SplitPoint:
    """A sensible default cut: the smallest tensor within the first half of the network."""
    points = loaded.sliced.split_points
    inner = [sp for sp in points if sp.name not in (INPUT, OUTPUT)]
    if not inner:
        return points[-1]
    first_half = inner[: max(1, len(inner) // 2)]
    return min(first_half, key=lambda sp: (sp.fp32_bytes, sp.index))


def choose_split(loaded: LoadedModel, key: str) -> SplitPoint:
    return loaded.split(key) if key else default_split(loaded)


def next_hops(config: AgentConfig) -> tuple[Hop, ...]:
    """The chain after the worker from --next-hop / --forward-codec (runtime.wire.chain)."""
    hops = tuple(Hop.parse(text, config.forward_codec) for text in config.next_hops)
    if config.end_split and not hops and config.forward_codec:
        hops = (Hop(codec=config.forward_codec),)  # the worker's first --next-tier, with this codec
    return hops


async def run_agent(config: AgentConfig, out: IO[str] | None = None,
                    fmt: Callable[[FrameResult, tuple[str, ...] | None], str] | None = None) -> list[FrameResult]:
    """Process the source (and serve the local API if asked); returns the results in order.

    Each result is written to ``out`` (default: ``config.output``) as ``fmt(result, labels)``,
    by default one JSON line.
    """
    import torch

    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    loop = asyncio.get_running_loop()
    loaded = await loop.run_in_executor(None, load_model, config.model)
    tl = None
    if config.tl:
        from runtime.transfer.artifact import load_tl

        tl = await loop.run_in_executor(None, lambda: load_tl(config.tl, config.tl_dir or None, loaded=loaded))
    split = choose_split(loaded, config.split or (tl.split.name if tl is not None else ""))
    codec = get_codec(config.codec, model=tl.tl.entropy_model if tl is not None else None, spec=loaded.spec)
    metrics = AgentMetrics()
    endpoint = MetricsEndpoint(metrics.registry, config.metrics_host, config.metrics_port) if config.metrics_port >= 0 else None
    plan = InitialPlan(split, codec, worker=config.worker, tl=tl, end_split=config.end_split, next_hops=next_hops(config))
    agent = Agent(loaded, plan, config.agent_options(), metrics)
    bind(agent=agent.agent_id)  # every log line of this process (and the tasks it starts) names the agent
    try:  # built before the agent starts, so a bad profile file is an error before any frame
        link = _planner_link(config, agent) if config.planner else None
    except BaseException:
        await agent.close()
        if endpoint is not None:
            endpoint.close()
        raise
    logger.info("agent: model %s split %s (%s) codec %s TL %s worker %s%s", loaded.name, split.index, split.name,
                codec.name, tl.tl_id if tl is not None else "none", config.worker or "none", agent.active.chain)
    await agent.start()
    if link is not None:
        await link.start()
        logger.info("following plans from %s", config.planner)
    local_api = await serve_local_api(agent, config.serve) if config.serve else None
    # Handle SIGTERM/SIGINT before announcing the API, so a supervisor that signals right after
    # the announcement gets a clean shutdown rather than the default (kill) action.
    stop = stop_on_signals() if local_api is not None else None
    if stop is None:
        reload_on_sighup()  # SIGHUP: re-read certificates and token (runtime.wire.reloading), do not end
    if local_api is not None:
        print(f"edgesplit agent local API on {local_api.address}", file=sys.stderr, flush=True)
    if endpoint is not None:
        print(f"metrics on http://{config.metrics_host}:{endpoint.port}/metrics", file=sys.stderr, flush=True)
    notify("READY=1")  # systemd Type=notify: the model is loaded (and the local API serves, if asked for)
    watchdog = start_watchdog() if local_api is None else None  # the local API's daemon runs its own
    results: list[FrameResult] = []
    try:
        with (open(config.output, "w") if config.output not in ("-", "") else nullcontext(sys.stdout)) as sink:
            sink = out or sink
            if config.source not in ("", "none"):
                results = await _stream_source(agent, config, sink, fmt or _json_line, link)
            if config.summary and results:
                print(summarize(results, agent.split, agent.codec.name, loaded.name, split_of=loaded.split), file=sys.stderr,
                      flush=True)
        if stop is not None:
            await stop.wait()
    finally:
        await stop_watchdog(watchdog)
        if local_api is not None:
            await local_api.stop(1.0)
        if link is not None:
            await link.close()
        await agent.close()
        if endpoint is not None:
            endpoint.close()
    return results


def _planner_link(config: AgentConfig, agent: Agent):
    """The agent's link to its planner (``--planner``), not started."""
    from runtime.agent.planner_link import PlannerLink, PlannerLinkOptions
    from runtime.agent.prober import ProbeOptions

    return PlannerLink(agent, PlannerLinkOptions(
        config.planner, config.profile, agent.agent_id, workers=tuple(config.planner_workers),
        constraints=config.constraints(), telemetry_interval_seconds=config.telemetry_interval_seconds,
        telemetry_heartbeat_seconds=config.telemetry_heartbeat_seconds,
        transport=config.transport(), probe=ProbeOptions(budget_fraction=config.probe_budget)))


def _json_line(result: FrameResult, labels: tuple[str, ...] | None,
               stamps: tuple[float, float] | None = None) -> str:
    """One result line; ``stamps``: wall-clock (arrival, result ready) of the frame, as started_unix/finished_unix."""
    line = result.to_json(labels)
    if stamps is not None:
        line["started_unix"], line["finished_unix"] = round(stamps[0], 4), round(stamps[1], 4)
    return json.dumps(line)


async def _stream_source(agent: Agent, config: AgentConfig, sink: IO[str], fmt, link=None) -> list[FrameResult]:
    """Keep ``window`` frames in flight; write results in frame order as they complete (each with its
    plan's predicted latency when the planner ``link`` knows it)."""
    loop = asyncio.get_running_loop()
    frames = open_source(agent.loaded.spec, config.source, config.frames)
    window = asyncio.Semaphore(max(1, config.window))
    done: dict[int, FrameResult] = {}
    ordered: list[FrameResult] = []
    labels = agent.loaded.spec.labels
    tasks: set[asyncio.Task] = set()

    stamps: dict[int, tuple[float, float]] = {}  # index -> wall clock (arrival, result ready)

    def flush() -> None:
        while len(ordered) in done:
            index = len(ordered)
            r = done.pop(index)
            ordered.append(r)
            when = stamps.pop(index, None)
            sink.write((_json_line(r, labels, when) if fmt is _json_line else fmt(r, labels)) + "\n")
        sink.flush()

    async def one(index: int, frame) -> None:
        try:
            started = time.time()
            r = await agent.infer(frame.tensor, frame.name)
            stamps[index] = (started, time.time())
            if link is not None:
                r.predicted_seconds = link.predicted(r)
            done[index] = r
            flush()
        finally:
            window.release()

    index = 0
    pace = Pacer(config.fps, loop.time)
    agent.link.frame_interval, agent.link.frame_window = pace.period, max(1, config.window)  # the queue terms' workload
    while True:
        if not pace.period:
            await window.acquire()
        frame = await loop.run_in_executor(None, next, frames, None)
        if frame is None:
            if not pace.period:
                window.release()
            break
        if pace.period:  # a camera: the frame arrives at its time, and is lost if the agent is behind
            await asyncio.sleep(pace.wait())
            if window.locked():
                pace.dropped += 1
                agent.metrics.dropped_frames.inc()
                logger.debug("frame %s dropped: %d frames in flight at its arrival", frame.name, config.window)
                continue
            await window.acquire()
        task = asyncio.create_task(one(index, frame))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        index += 1
    if tasks:
        await asyncio.gather(*tasks)
    if pace.period:
        print(f"paced at {config.fps:g} fps: {pace.arrived} frames arrived, {pace.dropped} dropped "
              f"(the agent was behind)", file=sys.stderr, flush=True)
    return ordered

