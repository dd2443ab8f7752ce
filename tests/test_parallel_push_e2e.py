"""A parallel stage pushed by the planner and run by the agent (issue 13), all real, on loopback.

A real planner (in this event loop), two real worker processes serving ResNet-18 (a bundled model:
the planner takes its receptive geometry by name), and an agent with its :class:`PlannerLink`. The
workers register with hand-written profiles (the model's real split names) that make two of them
worth it: the tileable blocks take 0.2 s each on a worker and 2 s on the board, the pooling and
classifier after them 1 ms anywhere (whatever bandwidth the agent measures on loopback, halving the
compute gains more than the halos and exchanges cost). The planner's search offloads the
whole model to one worker; its re-planner then considers DPFP over both and, predicted faster,
pushes the plan with ``Plan.parallel``. The agent applies it and runs frames through the stage:
every frame's output equals the unsplit model's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
import torch
from polling import until

from planner.config import PlannerConfig
from planner.server import serve as serve_planner
from runtime.agent.client import Agent
from runtime.agent.config import AgentOptions, InitialPlan
from runtime.agent.planner_link import PlannerLink, PlannerLinkOptions
from runtime.agent.sources import open_source
from runtime.agent.summary import summarize
from runtime.contracts.profile import Block, Profile
from runtime.models.loader import load_model
from runtime.parallel.tiled import tileable_end
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as ppb_grpc
from runtime.wire.codec import get_codec

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(180)]

AGENT = "board-p"
WORKERS = ("edge-a", "edge-b")
RPC = 10.0
MODEL = "resnet18"
PLANNER = dict(hold_seconds=0.5, replan_interval_seconds=0.1, telemetry_max_rate_hz=5.0, default_rtt_seconds=0.001,
               default_bandwidth_bytes_per_second=50e6, metrics_port=-1, compute_telemetry=False)


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL)


def make_profile(loaded, role: str, machine: str) -> Profile:
    conv = 2.0 if role == "device" else 0.2  # compute dominates even a slow measured link: two workers win
    end = tileable_end(loaded.sliced, 0)  # blocks 0 .. end-1 can be tiled
    blocks = tuple(Block(i, sp.name, conv if i < end else 0.001, sp.fp32_bytes)
                   for i, sp in enumerate(loaded.sliced.split_points[1:]))
    return Profile(machine=machine, role=role, model=loaded.name, model_digest=loaded.digest, blocks=blocks,
                   input_bytes=loaded.sliced.split_points[0].fp32_bytes)


@contextlib.asynccontextmanager
async def pushing_planner(loaded, config: PlannerConfig, agent_id: str = AGENT, workers: tuple[str, ...] = WORKERS,
                          profile: Callable[..., Profile] = make_profile, telemetry_interval: float = 0.5,
                          **agent_options) -> AsyncIterator[tuple]:
    """A planner serving ``config`` in this event loop, a stub on it, and an agent (local at first, no worker) with a
    :class:`PlannerLink` to it naming ``workers`` and a board ``profile``; the link is not started (the test
    registers its workers first). Yields (planner server, stub, agent, link); closes them all on the way out."""
    ps = await serve_planner(config)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{ps.port}")
    agent = Agent(loaded, InitialPlan(loaded.split("output"), get_codec("raw")),
                  AgentOptions(agent_id=agent_id, deadline_seconds=30.0, connect_timeout=2.0, **agent_options))
    link = PlannerLink(agent, PlannerLinkOptions(
        f"127.0.0.1:{ps.port}", profile(loaded, "device", "board"), agent_id, workers=workers,
        telemetry_interval_seconds=telemetry_interval, rpc_timeout=5.0, connect_timeout=1.0, backoff_initial=0.1,
        backoff_max=0.5))
    try:
        yield ps, ppb_grpc.PlannerStub(channel), agent, link
    finally:
        await link.close()
        await agent.close()
        await channel.close()
        await ps.drain_and_stop(1.0)


async def register(stub, loaded, worker_id: str, port: int, profile: Callable[..., Profile] = make_profile) -> None:
    """Worker ``worker_id`` on 127.0.0.1:``port`` registers with its edge ``profile``."""
    await stub.RegisterWorker(ppb.RegisterWorkerRequest(
        worker_id=worker_id, address=f"127.0.0.1:{port}", tier="edge",
        profiles_json=[profile(loaded, "edge", worker_id).to_json()]), timeout=RPC)


def test_the_planner_pushes_a_parallel_stage_and_the_agent_runs_frames_through_it(loaded, start_worker, tmp_path):
    ports = [start_worker("--preload", MODEL, "--torch-threads", "1")[1] for _ in WORKERS]
    frames = [f.tensor for f in open_source(loaded.spec, "synthetic", 4)]
    with torch.inference_mode():
        expected = [loaded.full(x) for x in frames]

    async def scenario():
        config = PlannerConfig(listen="127.0.0.1:0", db=str(tmp_path / "planner.sqlite"), **PLANNER)
        async with pushing_planner(loaded, config) as (_, stub, agent, link):
            for wid, port in zip(WORKERS, ports, strict=True):
                await register(stub, loaded, wid, port)
            await link.start()
            await until(lambda: agent.parallel.active, 20, "a plan with a parallel stage")
            stage = agent.parallel.coord.stage
            results = [await agent.infer(x, f"f{i}") for i, x in enumerate(frames)]
            sampled = {w: agent.link.estimate(w).bandwidth.samples for w in stage.workers}  # tiles feed the link
            # per-worker tile times on the agent's own metrics (its endpoint serves agent.metrics.registry)
            tile_counts = {w: agent.metrics.registry.get_sample_value("edgesplit_agent_tile_seconds_count",
                                                                      {"worker": w}) for w in stage.workers}
            assert all(n is not None and n > 0 for n in tile_counts.values()), tile_counts
            info = next(a for a in (await stub.ListAgents(ppb.ListAgentsRequest(), timeout=RPC)).agents
                        if a.agent_id == AGENT)
            return results, info, stage, sampled, tile_counts

    results, info, stage, sampled, tile_counts = asyncio.run(scenario())
    assert all(n > 0 for n in sampled.values()), sampled
    # the agent's summary: each worker of the stage with the tiles it computed (as many as the metrics counted)
    # and their round trip
    text = summarize(results, loaded.split("output"), "raw", loaded.name)
    lines = text.splitlines()
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[lines.index("parallel stage tiles by worker (round trip)") + 2:]}
    for w in stage.workers:
        tiles, failed, p50, p95 = rows[w]
        assert int(tiles) == tile_counts[w] == sum(len(r.tile_seconds.get(w, ())) for r in results) > 0, (w, text)
        assert 0 < float(p50) <= float(p95) and int(failed) == 0, (w, text)
    assert set(rows) <= {*stage.workers, "local"}
    assert set(stage.workers) == {f"127.0.0.1:{p}" for p in ports}
    assert list(info.plan.parallel.worker_ids) == list(WORKERS) and "parallel stage" in info.plan.reason
    assert any(sum(1 for s in b.shares if s > 0) == 2 for b in stage.blocks)  # both workers compute tiles
    for r, want in zip(results, expected, strict=True):
        assert r.where == "parallel" and r.plan_version >= 1
        assert float((r.output - want).abs().max() / want.abs().max()) <= 1e-5
        assert r.top1()[0] == int(want.argmax())


def test_a_second_worker_registering_brings_a_parallel_stage(loaded, start_worker, tmp_path):
    """One worker at first: an ordinary offload. A second registers while the best configuration stays
    the same: the planner reconsiders DPFP over both and pushes the plan again, now with the stage."""
    ports = [start_worker("--preload", MODEL, "--torch-threads", "1")[1] for _ in WORKERS]
    x = next(iter(open_source(loaded.spec, "synthetic", 1))).tensor
    with torch.inference_mode():
        want = loaded.full(x)

    async def scenario():
        config = PlannerConfig(listen="127.0.0.1:0", db=str(tmp_path / "planner.sqlite"), **PLANNER)
        async with pushing_planner(loaded, config) as (_, stub, agent, link):
            await register(stub, loaded, WORKERS[0], ports[0])
            await link.start()
            await until(lambda: agent.plan_version >= 1, 20, "a first plan")
            first = agent.plan_version
            assert not agent.parallel.active  # one worker: no parallel stage
            await register(stub, loaded, WORKERS[1], ports[1])
            await until(lambda: agent.parallel.active, 20, "a plan with a parallel stage after the second worker")
            stage = agent.parallel.coord.stage
            result = await agent.infer(x, "f0")
            return first, stage, result

    first, stage, result = asyncio.run(scenario())
    assert set(stage.workers) == {f"127.0.0.1:{p}" for p in ports} and result.plan_version > first
    assert result.where == "parallel"
    assert float((result.output - want).abs().max() / want.abs().max()) <= 1e-5
