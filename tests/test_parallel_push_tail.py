"""The rest of the model after a parallel stage on a worker (issue 13): the stage's tail worker in the
plan formats (JSON, tiles.proto) and in the planner's cost (planner.parallel_push)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from planner.parallel_push import Candidate, ParallelPlanner, candidates, device_seconds
from planner.store import LinkRecord
from runtime.contracts.costmodel import Link
from runtime.contracts.errors import InvalidInput
from runtime.contracts.profile import Block, Profile
from runtime.models.loader import load_model
from runtime.parallel.plan import MAX_NAME, ParallelStage, TiledBlock
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb

pytestmark = pytest.mark.timeout(120)

MODEL = "resnet18"


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL)


def profile(loaded, machine: str, role: str, factor: float, tail_factor: float | None = None) -> Profile:
    sl = loaded.sliced
    n = len(sl.split_points) - 1
    tail_factor = factor if tail_factor is None else tail_factor
    blocks = tuple(Block(index=i, name=sl.split(i + 1).name,
                         seconds=0.004 * (factor if i < n - 3 else tail_factor) * (1 + i % 3),
                         output_bytes=sl.split(i + 1).fp32_bytes) for i in range(n))
    return Profile(machine=machine, role=role, model=MODEL, blocks=blocks, input_bytes=sl.split(0).fp32_bytes)


FAST = Link(0.001, 125e6)


def workers(loaded, measured: tuple[Link | None, ...]) -> list[Candidate]:
    return [Candidate(f"w{i}", f"127.0.0.1:{5000 + i}", profile(loaded, f"w{i}", "edge", 1.0), FAST, m)
            for i, m in enumerate(measured)]


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


def test_a_slow_device_has_the_rest_run_on_a_measured_worker_and_the_total_is_the_sum_of_its_parts(loaded):
    device = profile(loaded, "board", "device", 10.0, tail_factor=50.0)  # a weak board's classifier
    slow_link = Link(0.002, 20e6)
    cands = workers(loaded, (slow_link, FAST))
    prop = ParallelPlanner().propose(device, cands)
    assert prop is not None and prop.tail_worker is cands[1]  # the faster measured link wins
    assert (prop.stage.tail_worker, prop.stage.tail_worker_id) == ("127.0.0.1:5001", "w1")
    end = loaded.split(prop.stage.blocks[-1].end).index
    n = device.n_blocks
    assert end < n
    expected_tail = (FAST.rtt_seconds + (device.blocks[end - 1].output_bytes + device.blocks[n - 1].output_bytes)
                     / FAST.bandwidth_bytes_per_second + device_seconds(cands[1].profile, end, n))
    assert prop.tail_seconds == pytest.approx(expected_tail) and prop.tail_seconds < device_seconds(device, end, n)
    first = loaded.split(prop.stage.blocks[0].start).index
    assert prop.head_seconds == pytest.approx(device_seconds(device, 0, first))
    assert prop.seconds == pytest.approx(prop.head_seconds + prop.stage_seconds + prop.tail_seconds)

    plan = ppb.Plan(agent_id="a", model_id=MODEL, predicted_seconds=prop.seconds * 3, reason="registration")
    assert ParallelPlanner().attach(plan, device, cands)
    assert (plan.parallel.tail_worker_address, plan.parallel.tail_worker_id) == ("127.0.0.1:5001", "w1")
    assert "the rest on w1" in plan.reason and plan.predicted_seconds == pytest.approx(prop.seconds)
    # a codec of fewer bytes a map element prices the map so
    fp16 = ParallelPlanner(codec="fp16").propose(device, cands)
    assert fp16 is not None and fp16.tail_worker is cands[1]
    end16 = loaded.split(fp16.stage.blocks[-1].end).index
    assert fp16.tail_seconds == pytest.approx(
        FAST.rtt_seconds + (device.blocks[end16 - 1].output_bytes // 2 + device.blocks[n - 1].output_bytes)
        / FAST.bandwidth_bytes_per_second + device_seconds(cands[1].profile, end16, n))


def test_an_unmeasured_link_or_no_usable_profile_keeps_the_rest_on_the_device(loaded):
    device = profile(loaded, "board", "device", 10.0, tail_factor=50.0)
    prop = ParallelPlanner().propose(device, workers(loaded, (None, None)))  # assumed links only: never for the rest
    assert prop is not None and prop.tail_worker is None and prop.stage.tail_worker == ""
    end = loaded.split(prop.stage.blocks[-1].end).index
    assert prop.tail_seconds == pytest.approx(device_seconds(device, end, device.n_blocks))
    assert prop.seconds == pytest.approx(prop.head_seconds + prop.stage_seconds + prop.tail_seconds)
    # profiles without the model's last block (of another model version): the rest is not priced on them
    other = [Candidate(c.worker_id, c.address, Profile(machine=c.worker_id, role="edge", model=MODEL,
                                                       blocks=c.profile.blocks[:-1], input_bytes=c.profile.input_bytes),
                       c.link, c.measured) for c in workers(loaded, (FAST, FAST))]
    prop = ParallelPlanner().propose(device, other)
    assert prop is not None and prop.tail_worker is None
    fast_board = profile(loaded, "board", "device", 10.0, tail_factor=0.001)  # the board's own rest is faster
    prop = ParallelPlanner().propose(fast_board, workers(loaded, (FAST, FAST)))
    assert prop is not None and prop.tail_worker is None


def test_the_planners_candidates_carry_only_measured_links_and_only_workers_with_a_profile(loaded):
    prof = profile(loaded, "w", "edge", 1.0)
    measured = {"w0": LinkRecord(0.002, 50e6, 1.0), "w1": None, "w2": LinkRecord(0.002, 50e6, 1.0)}
    state = SimpleNamespace(
        workers={wid: SimpleNamespace(profiles={MODEL: prof} if wid != "w2" else {},
                                      record=SimpleNamespace(address=f"h:{i}")) for i, wid in enumerate(measured)},
        link=lambda st, wid: measured[wid] or LinkRecord(0.005, 50e6, 0.0),  # w1: the configured assumption
        measured_link=lambda st, wid: measured[wid])
    st = SimpleNamespace(record=SimpleNamespace(workers=(), constraints=ppb.Constraints(), model=MODEL))
    got = candidates(state, st)
    assert [c.worker_id for c in got] == ["w0", "w1"]  # w2 has no profile of the model
    assert got[0].measured == Link(0.002, 50e6) and got[1].measured is None


def test_a_link_becoming_measured_has_the_stage_planned_again(loaded):
    """A stage attached while the links were only assumed is reconsidered once the agent measures one
    (its frames' tiles feed the link): only then may a worker run the rest."""
    prof = profile(loaded, "w", "edge", 1.0)
    measured: dict[str, LinkRecord | None] = {"w0": None, "w1": None}
    state = SimpleNamespace(
        workers={wid: SimpleNamespace(profiles={MODEL: prof}, record=SimpleNamespace(address=f"h:{i}"))
                 for i, wid in enumerate(measured)},
        link=lambda st, wid: measured[wid] or LinkRecord(0.001, 125e6, 0.0),
        measured_link=lambda st, wid: measured[wid])
    plan = ppb.Plan(agent_id="a", model_id=MODEL)
    plan.parallel.blocks.add(start_split="input", end_split="layer1", shares=[1.0, 1.0])
    st = SimpleNamespace(record=SimpleNamespace(id="a", workers=(), constraints=ppb.Constraints(), model=MODEL),
                         plan=plan, device=profile(loaded, "board", "device", 10.0))
    pp = ParallelPlanner()
    pp._remember("a", candidates(state, st))  # what consider() does when the plan is issued

    async def changed() -> bool:
        return await pp.changed(state, st, None)  # a plan with a stage: no trial, the executor is not used

    assert not asyncio.run(changed())  # nothing new
    measured["w1"] = LinkRecord(0.002, 50e6, 1.0)
    assert asyncio.run(changed())  # w1's link measured: the stage is planned again (w1 may run the rest)
    assert not asyncio.run(changed())
