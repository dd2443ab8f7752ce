"""Halo exchange in the planner's pushed parallel stages (issue 13): ``edgesplit planner serve
--parallel-halo [--parallel-halo-round-ms MS]`` proposes the stage ``edgesplit plan --parallel-halo``
writes for the same profiles and link, and the settings reach the re-planner's ParallelPlanner."""

from __future__ import annotations

import asyncio

import pytest

from planner.parallel_push import ParallelPlanner
from runtime.contracts.errors import InvalidInput
from runtime.parallel.plan import ParallelStage
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb
from tests.test_parallel_push import (  # noqa: F401 (loaded: a fixture)
    MODEL,
    board_and_three_workers,
    loaded,
    plan_cli_stage,
)

pytestmark = pytest.mark.timeout(240)


def test_pushed_halo_stage_equals_the_plan_clis(loaded, tmp_path):  # noqa: F811
    device, cands = board_and_three_workers(loaded)
    cli_stage = plan_cli_stage(cands, tmp_path, "--parallel-halo", "--parallel-halo-round-ms", "2")

    pushed = ParallelPlanner(halo=True, halo_round_seconds=0.002).propose(device, cands)
    assert pushed is not None
    halo = [b.halo for b in pushed.stage.blocks]
    assert any(halo) and not all(halo[1:])  # a mix: some boundaries keep the map on the workers, some gather
    assert pushed.stage.blocks == cli_stage.blocks and pushed.stage.workers == cli_stage.workers
    assert pushed.stage_seconds == pytest.approx(cli_stage.predicted_seconds)
    gathered = ParallelPlanner().propose(device, cands)  # without the option: never a halo block
    assert gathered is not None and not any(b.halo for b in gathered.stage.blocks)
    assert pushed.stage_seconds < gathered.stage_seconds

    plan = ppb.Plan(agent_id="a", model_id=MODEL, predicted_seconds=pushed.seconds * 2)
    assert ParallelPlanner(halo=True, halo_round_seconds=0.002).attach(plan, device, cands)
    back = ParallelStage.from_proto(ppb.Plan.FromString(plan.SerializeToString()).parallel, MODEL)
    assert [b.halo for b in back.blocks] == [b.halo for b in cli_stage.blocks]  # halo_input travels in the push


def test_the_planner_flags_reach_the_replanner(tmp_path):
    from planner.config import PlannerConfig
    from planner.server import serve
    from runtime.cli.main import build_parser
    from runtime.cli.planner import _config

    args = build_parser().parse_args(["planner", "serve", "--parallel-halo", "--parallel-halo-round-ms", "8"])
    config = _config(args)
    assert config.parallel_halo and config.parallel_halo_round_ms == 8.0
    assert not _config(build_parser().parse_args(["planner", "serve"])).parallel_halo  # off by default
    with pytest.raises(InvalidInput, match="parallel_halo_round_ms"):
        PlannerConfig(parallel_halo_round_ms=-1)

    async def go():
        ps = await serve(PlannerConfig(db=str(tmp_path / "a.sqlite"), listen="127.0.0.1:0", metrics_port=-1,
                                       parallel_halo=True, parallel_halo_round_ms=8.0))
        try:
            pp = ps.service.replanner.parallel
            assert pp.halo and pp.halo_round_seconds == pytest.approx(0.008)
        finally:
            await ps.drain_and_stop(1.0)

    asyncio.run(asyncio.wait_for(go(), 60))
