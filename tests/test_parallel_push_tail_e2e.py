"""The rest of the model after a pushed parallel stage on a worker (issue 13), over real workers on loopback.

Two real worker processes serving ResNet-18 and a real :class:`runtime.agent.client.Agent`: the plan's
stage tiles the model's tileable range on worker A and names worker B its tail worker
(``ParallelStage.tail_worker``). Each frame's stitched map goes to B as an edge frame on the agent's
stream; the output equals the unsplit model's. With B killed, the agent runs the rest itself: the frame
is kept, its ``fallback_reason`` says why.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from runtime.agent.client import Agent
from runtime.agent.config import AgentOptions, InitialPlan
from runtime.agent.sources import open_source
from runtime.models.loader import load_model
from runtime.parallel.plan import ParallelStage, TiledBlock
from runtime.parallel.tiled import tileable_end
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb
from runtime.wire.codec import get_codec

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(180)]

MODEL = "resnet18"


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL)


def close_to(out: torch.Tensor, want: torch.Tensor) -> bool:
    return float((out - want).abs().max() / want.abs().max()) <= 1e-5 and int(out.argmax()) == int(want.argmax())


def test_the_rest_runs_on_the_tail_worker_and_locally_once_it_is_gone(loaded, start_worker):
    (_, port_a), (proc_b, port_b) = (start_worker("--preload", MODEL, "--torch-threads", "1") for _ in range(2))
    tiles, rest = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
    end = loaded.split(tileable_end(loaded.sliced, 0))
    assert end.name != "output"  # there is a rest after the stage
    stage = ParallelStage((tiles,), (TiledBlock("input", end.name, (1.0,)),), "raw", MODEL,
                          tail_worker=rest, tail_worker_id="edge-b")
    plan = ppb.Plan(agent_id="board-t", model_id=MODEL, version=2, split_id="output", predicted_seconds=0.1)
    stage.to_proto(plan.parallel)
    frames = [f.tensor for f in open_source(loaded.spec, "synthetic", 3)]
    with torch.inference_mode():
        expected = [loaded.full(x) for x in frames]

    async def scenario():
        agent = Agent(loaded, InitialPlan(loaded.split("output"), get_codec("raw")),
                      AgentOptions(agent_id="board-t", deadline_seconds=10.0, connect_timeout=2.0))
        try:
            await agent.parallel.apply(plan)
            assert agent.parallel.active and agent.parallel.tail_stream is not None
            on_worker = [await agent.infer(x, f"f{i}") for i, x in enumerate(frames[:2])]
            proc_b.kill()
            proc_b.wait(10)
            gone = await asyncio.wait_for(agent.infer(frames[2], "f2"), 30)
            return on_worker, gone
        finally:
            await agent.close()

    on_worker, gone = asyncio.run(scenario())
    for r, want in zip(on_worker, expected[:2], strict=True):
        assert r.where == "parallel" and not r.fallback_reason, r.fallback_reason
        assert r.worker == rest and "edge_tail" in r.times and "local_tail" not in r.times
        assert r.times["edge_tail"] > 0 and set(r.tile_seconds) == {tiles}
        assert close_to(r.output, want)
    assert gone.where == "parallel" and gone.fallback_reason and gone.worker == ""
    assert "local_tail" in gone.times and "edge_tail" not in gone.times
    assert close_to(gone.output, expected[2])
