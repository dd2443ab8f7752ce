"""A planner-pushed parallel stage that uses the halo exchange, end to end on loopback (issue 13).

A real planner configured from ``edgesplit planner serve --parallel-halo --parallel-halo-round-ms 0``
(its gRPC server in this event loop), two real worker processes serving ResNet-18 started with
``--halo-peer 127.0.0.1`` (so each may dial the other) and a metrics endpoint, and an agent with
its :class:`PlannerLink`. The profiles are those of tests/test_parallel_push_e2e.py (two workers
worth it); with the fetch round not costed, DPFP keeps the map on the workers at a boundary where
gathering and scattering it would cost more, so the pushed stage has halo blocks. Frames run
through the workers' exchange (``edgesplit_worker_halo_parts_total{source="peer"}`` grows), no
frame falls back to gather and scatter, and each output equals the unsplit model's. An agent with
``parallel_halo=False`` (``edgesplit agent --no-parallel-halo``) takes the same plan and gathers
every block: frames right, no peer parts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import urllib.request

import pytest
import torch
from conftest import wait_for
from prometheus_client.parser import text_string_to_metric_families

from runtime.agent.sources import open_source
from runtime.cli.main import build_parser
from runtime.cli.planner import _config
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb
from tests.test_parallel_push_e2e import (  # noqa: F401 (loaded: a fixture)
    MODEL,
    PLANNER,
    RPC,
    WORKERS,
    loaded,
    pushing_planner,
    register,
    until,
)

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(240)]

TOL = 1e-5  # relative to the output's largest magnitude, as in the other parallel-stage tests
HALO_FLAGS = ("--parallel-halo", "--parallel-halo-round-ms", "0")


def _metrics_port(proc) -> int | None:
    found = re.search(r"metrics on http://[\d.]+:(\d+)/metrics", proc.log_path.read_text(errors="replace"))
    return int(found.group(1)) if found else None


def peer_parts(metrics_port: int, source: str = "peer") -> float:
    """The worker's ``edgesplit_worker_halo_parts_total{source}`` (0 before any)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "edgesplit_worker_halo_parts_total" and s.labels.get("source") == source)


@pytest.fixture(scope="module")
def halo_workers(start_worker):
    """Two ResNet-18 workers that list each other (by host) as halo peers: [(grpc_port, metrics_port)]."""
    out = []
    for _ in WORKERS:
        proc, port = start_worker("--preload", MODEL, "--torch-threads", "1", "--halo-peer", "127.0.0.1",
                                  "--metrics-port", "0")
        out.append((port, wait_for(lambda p=proc: _metrics_port(p), 60, "the worker's metrics endpoint", proc)))
    return out


def planner_config(tmp_path, *flags: str):
    """The planner's config as ``edgesplit planner serve FLAGS`` builds it, with the test's timings."""
    args = build_parser().parse_args(["planner", "serve", "--listen", "127.0.0.1:0",
                                      "--db", str(tmp_path / "planner.sqlite"), *flags])
    return dataclasses.replace(_config(args), **PLANNER)


def run_pushed(loaded, workers, tmp_path, agent_id: str, planner_flags=HALO_FLAGS, parallel_halo: bool = True):  # noqa: F811
    """Frames through the stage the planner pushes: (results, stage, halo fallbacks, Plan as the planner holds it)."""
    frames = [f.tensor for f in open_source(loaded.spec, "synthetic", 3)]

    async def scenario():
        async with pushing_planner(loaded, planner_config(tmp_path, *planner_flags), agent_id,
                                   parallel_halo=parallel_halo) as (_, stub, agent, link):
            for wid, (port, _) in zip(WORKERS, workers, strict=True):
                await register(stub, loaded, wid, port)
            await link.start()
            await until(lambda: agent.parallel.active, 30, "a plan with a parallel stage")
            coord = agent.parallel.coord
            results = [await agent.infer(x, f"f{i}") for i, x in enumerate(frames)]
            info = next(a for a in (await stub.ListAgents(ppb.ListAgentsRequest(), timeout=RPC)).agents
                        if a.agent_id == agent_id)
            return results, coord.stage, coord.halo_fallbacks, coord.last_fallback, info.plan

    results, stage, fallbacks, why, plan = asyncio.run(asyncio.wait_for(scenario(), 200))
    with torch.inference_mode():
        expected = [loaded.full(x) for x in frames]
    for r, want in zip(results, expected, strict=True):
        assert r.where == "parallel" and r.plan_version >= 1
        assert float((r.output - want).abs().max() / want.abs().max()) <= TOL
        assert r.top1()[0] == int(want.argmax())
    assert set(stage.workers) == {f"127.0.0.1:{p}" for p, _ in workers}
    return stage, fallbacks, why, plan


def test_a_pushed_halo_stage_exchanges_halos_between_the_workers(loaded, halo_workers, tmp_path):  # noqa: F811
    before = sum(peer_parts(m) for _, m in halo_workers)
    stage, fallbacks, why, plan = run_pushed(loaded, halo_workers, tmp_path, "board-h")
    assert any(b.halo_input for b in plan.parallel.blocks), plan.parallel  # the push carries halo blocks
    assert any(b.halo for b in stage.blocks) and not stage.blocks[0].halo
    assert fallbacks == 0, why  # every frame through the exchange, none run again with gather and scatter
    assert sum(peer_parts(m) for _, m in halo_workers) > before  # crop parts fetched worker to worker


def test_an_agent_without_parallel_halo_gathers_the_pushed_halo_stage(loaded, halo_workers, tmp_path):  # noqa: F811
    before = sum(peer_parts(m) for _, m in halo_workers)
    stage, fallbacks, why, plan = run_pushed(loaded, halo_workers, tmp_path, "board-g", parallel_halo=False)
    assert any(b.halo_input for b in plan.parallel.blocks)  # the same kind of plan: the agent declines the exchange
    assert any(b.halo for b in stage.blocks)  # the agent holds the halo blocks and gathers them
    assert fallbacks == 0, why
    assert sum(peer_parts(m) for _, m in halo_workers) == before  # no part went worker to worker


def test_without_the_planner_flag_the_pushed_stage_has_no_halo_block(loaded, halo_workers, tmp_path):  # noqa: F811
    """The check that the first test can fail: the same set-up without --parallel-halo pushes a gathered stage."""
    before = sum(peer_parts(m) for _, m in halo_workers)
    stage, _, _, plan = run_pushed(loaded, halo_workers, tmp_path, "board-n", planner_flags=())
    assert not any(b.halo_input for b in plan.parallel.blocks) and not any(b.halo for b in stage.blocks)
    assert sum(peer_parts(m) for _, m in halo_workers) == before
