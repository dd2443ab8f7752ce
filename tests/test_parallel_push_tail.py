"""The rest of the model after a parallel stage on a worker (issue 13): the stage's tail worker in the
plan formats (JSON, tiles.proto) and in the planner's cost (planner.parallel_push)."""

from __future__ import annotations

import json

import pytest

from runtime.contracts.errors import InvalidInput
from runtime.parallel.plan import MAX_NAME, ParallelStage, TiledBlock
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb

pytestmark = pytest.mark.timeout(120)


def stage(**kw) -> ParallelStage:
    return ParallelStage(("127.0.0.1:1", "127.0.0.1:2"), (TiledBlock("input", "layer1", (1.0, 1.0)),), model="m", **kw)


def test_the_tail_worker_goes_through_json_and_proto_and_old_plans_keep_the_agent_tail(tmp_path):
    s = stage(tail_worker="127.0.0.1:3", tail_worker_id="w3")
    path = tmp_path / "p.json"
    path.write_text(json.dumps(s.to_json()))
    assert ParallelStage.load(path) == s
    msg = s.to_proto(ppb.Plan().parallel)
    assert (msg.tail_worker_address, msg.tail_worker_id) == ("127.0.0.1:3", "w3")
    back = ParallelStage.from_proto(ppb.Plan.FromString(ppb.Plan(parallel=msg).SerializeToString()).parallel, "m")
    assert back == s
    assert s.with_workers(("h:1", "h:2")).tail_worker == "127.0.0.1:3"
    old = s.to_json()  # a plan written before the field: the agent runs the rest
    del old["tail_worker"], old["tail_worker_id"]
    assert ParallelStage.from_json(old).tail_worker == ""
    assert ParallelStage.from_proto(stage().to_proto(ppb.Plan().parallel), "m").tail_worker == ""


def test_a_bad_tail_worker_is_refused():
    with pytest.raises(InvalidInput, match="at most"):
        stage(tail_worker="h" * (MAX_NAME + 1))
    doc = stage().to_json()
    doc["tail_worker"] = 5
    with pytest.raises(InvalidInput, match="tail_worker"):
        ParallelStage.from_json(doc)
