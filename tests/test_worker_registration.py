"""A worker started with --planner registers itself (address, tier, profiles, TLs), keeps serving
while the planner is away, and registers again once it is back."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import REPO, TINY_NET

from planner.config import PlannerConfig
from planner.server import serve as serve_planner
from runtime.contracts.errors import InvalidInput
from runtime.contracts.profile import load
from runtime.measure.profiler import profile_model
from runtime.worker.config import WorkerConfig
from runtime.worker.server import serve as serve_worker

TINY = f"{REPO / TINY_NET.split(':')[0]}:build"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def edge_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("profiles") / "tiny-edge.json"
    profile_model(TINY, "edge", "edge-1", runs=1, warmup=0, inputs=1, progress=False).save(path)
    return path


async def _until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def test_worker_registers_and_comes_back_after_a_planner_restart(edge_profile, tmp_path):
    async def main():
        planner = await serve_planner(PlannerConfig(listen="127.0.0.1:0", db=str(tmp_path / "p.sqlite")))
        port = planner.port
        cfg = WorkerConfig(listen="127.0.0.1:0", models=(TINY,), planner=f"127.0.0.1:{port}", worker_id="edge-1",
                           profiles=(str(edge_profile),), planner_refresh_seconds=0.2, next_tiers=("127.0.0.1:1",))
        worker = await serve_worker(cfg)
        try:
            await _until(lambda: "edge-1" in planner.service.workers, 10, "the worker's registration")
            rec = planner.service.workers["edge-1"].record
            assert rec.address == f"127.0.0.1:{worker.port}" and rec.tier == "edge"
            assert rec.next_tiers == ("127.0.0.1:1",)  # its --next-tier allowlist: the planner chains only there
            assert list(planner.service.workers["edge-1"].profiles) == [load(edge_profile).model]
            await planner.drain_and_stop(0.1)
            # a new planner on a new database knows nothing; the worker's refresh tells it
            planner = await serve_planner(PlannerConfig(listen=f"127.0.0.1:{port}", db=str(tmp_path / "q.sqlite")))
            await _until(lambda: "edge-1" in planner.service.workers, 15, "registration after the planner restart")
        finally:
            await worker.drain_and_stop(0.1)
            await planner.drain_and_stop(0.1)

    asyncio.run(main())


def test_a_worker_with_a_planner_needs_profiles_of_its_own_role(tmp_path):
    async def main():
        with pytest.raises(InvalidInput, match="needs --profiles"):
            await serve_worker(WorkerConfig(listen="127.0.0.1:0", planner="127.0.0.1:1"))
        dev = tmp_path / "dev.json"
        profile_model(TINY, "device", "pi", runs=1, warmup=0, inputs=1, progress=False).save(dev)
        with pytest.raises(InvalidInput, match="role device"):
            await serve_worker(WorkerConfig(listen="127.0.0.1:0", planner="127.0.0.1:1", profiles=(str(dev),)))

    asyncio.run(main())
