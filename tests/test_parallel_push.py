"""The planner's parallel stages (planner.parallel_push, issue 13): DPFP over the workers an agent may
use, attached to the plan only when predicted faster; the agent's side takes the pushed stage."""

from __future__ import annotations

import asyncio

import pytest
import torch

from planner.parallel_push import Candidate, ParallelPlanner, device_seconds
from runtime.agent.parallel_push import PushedStage
from runtime.contracts.costmodel import Link
from runtime.contracts.errors import InvalidInput
from runtime.contracts.profile import Block, Profile
from runtime.models.loader import load_model
from runtime.parallel.plan import ParallelStage
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb

pytestmark = pytest.mark.timeout(120)

MODEL = "resnet18"


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL)


def profile(loaded, machine: str, role: str, factor: float) -> Profile:
    sl = loaded.sliced
    n = len(sl.split_points) - 1
    blocks = tuple(Block(index=i, name=sl.split(i + 1).name, seconds=0.004 * factor * (1 + i % 3),
                         output_bytes=sl.split(i + 1).fp32_bytes) for i in range(n))
    return Profile(machine=machine, role=role, model=MODEL, blocks=blocks, input_bytes=sl.split(0).fp32_bytes)


def test_a_faster_stage_is_attached_and_a_slower_one_is_not(loaded):
    device = profile(loaded, "board", "device", 10.0)
    cands = [Candidate(f"w{i}", f"127.0.0.1:{5000 + i}", profile(loaded, f"w{i}", "edge", 1.0), Link(0.001, 125e6))
             for i in range(2)]
    pp = ParallelPlanner()
    prop = pp.propose(device, cands)
    assert prop is not None and prop.stage.workers == ("127.0.0.1:5000", "127.0.0.1:5001")
    assert any(sum(1 for s in b.shares if s > 0) == 2 for b in prop.stage.blocks)  # spread over both
    # the frame: the device's head before the stage and tail after it, plus the stage
    first = loaded.split(prop.stage.blocks[0].start).index
    end = loaded.split(prop.stage.blocks[-1].end).index
    tail = device_seconds(device, end, device.n_blocks)
    assert prop.seconds == pytest.approx(device_seconds(device, 0, first) + prop.stage_seconds + tail)

    slow = ppb.Plan(agent_id="a", model_id=MODEL, version=3, predicted_seconds=prop.seconds * 2, reason="registration")
    assert pp.attach(slow, device, cands)
    assert list(slow.parallel.worker_ids) == ["w0", "w1"] and slow.predicted_seconds == pytest.approx(prop.seconds)
    assert "parallel stage over 2 workers" in slow.reason
    back = ParallelStage.from_proto(ppb.Plan.FromString(slow.SerializeToString()).parallel, MODEL)
    assert back.blocks == prop.stage.blocks and back.workers == prop.stage.workers

    fast = ppb.Plan(agent_id="a", model_id=MODEL, predicted_seconds=prop.seconds * 1.05)  # gain under min_gain 10 %
    assert not pp.attach(fast, device, cands) and not fast.HasField("parallel")
    assert pp.propose(device, cands[:1]) is None  # one worker: an ordinary offload, not a parallel stage


def test_the_agent_takes_a_pushed_stage_and_refuses_one_it_cannot_run(loaded):
    async def go():
        pushed = PushedStage(loaded, prepare_timeout_seconds=1.0)
        plan = ppb.Plan(agent_id="a", model_id=MODEL, version=4, predicted_seconds=0.05)
        with pytest.raises(InvalidInput):
            bad = ppb.Plan(agent_id="a", model_id=MODEL, version=5)
            bad.parallel.worker_addresses.extend(["127.0.0.1:1"])
            bad.parallel.blocks.add(start_split="avgpool", end_split="output", shares=[1.0])  # not tileable
            await pushed.apply(bad)
        assert not pushed.active
        await pushed.apply(plan)  # no stage: nothing active
        assert not pushed.active and pushed.version == 4
        await pushed.close()

    asyncio.run(go())


def test_a_replaced_tail_stream_is_closed_when_the_stage_closes(loaded):
    """A replaced tail stream waits 30 s for its frames, but no longer than the agent: close() closes it."""
    class Stream:
        closed = 0

        async def close(self) -> None:
            self.closed += 1

    async def go():
        pushed = PushedStage(loaded, prepare_timeout_seconds=1.0)
        first, second = Stream(), Stream()
        pushed._use_tail(first)
        pushed._use_tail(second)  # a new plan's tail worker: the first is replaced, frames may still hold it
        assert first.closed == 0 and pushed.tail_stream is second
        await pushed.close()
        return first.closed, second.closed

    assert asyncio.run(go()) == (1, 1)


def test_tiles_of_a_pushed_stage_feed_the_link_estimate():
    from runtime.agent.parallel import TileReport
    from runtime.agent.parallel_push import feed_link
    from runtime.agent.telemetry import LinkEstimator

    link = LinkEstimator()
    link.add_rtt_sample(0.002, "w1:1")
    reports = [TileReport(0, (0, 8), "w1:1", ran_on="w1:1", seconds=0.052, worker_seconds=0.030, sent_bytes=600_000,
                          received_bytes=400_000, answered_at=1.0),  # network 0.052 - 0.030 - 0.002 = 0.020 s
               TileReport(0, (8, 16), "w2:1", ran_on="local", seconds=0.03, compute_seconds=0.03),  # no link
               TileReport(0, (16, 24), "w2:1", ran_on="w2:1", seconds=0.01, worker_seconds=0.009, sent_bytes=100,
                          received_bytes=100, answered_at=1.0),  # under min_bytes
               TileReport(0, (24, 32), "w3:1", ran_on="w3:1", seconds=0.01, worker_seconds=0.011, sent_bytes=90_000,
                          received_bytes=90_000, answered_at=1.0)]  # no network time left
    assert feed_link(link, reports) == 1
    assert link.estimate("w1:1").bandwidth.value == pytest.approx(1_000_000 / 0.020)
    assert link.estimate("w2:1").bandwidth.samples == 0 and link.estimate("w3:1").bandwidth.samples == 0


def board_and_three_workers(loaded) -> tuple[Profile, list[Candidate]]:
    """A board 10x slower than worker w0 (w1 2x, w2 3x), each worker on its own 1 ms, 1 Gbit/s link."""
    cands = [Candidate(f"w{i}", f"127.0.0.1:{5000 + i}", profile(loaded, f"w{i}", "edge", 1.0 + i),
                       Link.from_mbps(1, 1000)) for i in range(3)]
    return profile(loaded, "board", "device", 10.0), cands


def plan_cli_stage(cands: list[Candidate], tmp_path, *flags: str) -> ParallelStage:
    """The stage ``edgesplit plan --parallel --parallel-link 1,1000 FLAGS`` writes for ``cands``' profiles (each
    written to a file) and addresses."""
    import subprocess
    import sys

    paths = []
    for c in cands:
        p = tmp_path / f"{c.worker_id}.json"
        p.write_text(c.profile.to_json())
        paths += ["--profile", str(p)]
    out = tmp_path / "stage.json"
    res = subprocess.run([sys.executable, "-m", "runtime.cli.main", "plan", "--parallel", "--parallel-link", "1,1000",
                          "--parallel-workers", ",".join(c.address for c in cands), "--parallel-out", str(out),
                          *flags, *paths], capture_output=True, text=True, timeout=200)
    assert res.returncode == 0, res.stderr
    return ParallelStage.load(out)


def test_pushed_stages_price_tiles_by_the_factors_as_the_plan_cli_does(loaded, tmp_path):
    """The planner given a model's tile-compute factors (--parallel-tile-factors, planner.dpfp_factors.load_many)
    proposes the stage ``edgesplit plan --parallel --parallel-tile-factors`` writes for the same profiles and
    link; without them it prices by area and predicts otherwise."""
    import json

    from planner import dpfp_factors as F

    device, cands = board_and_three_workers(loaded)
    names = ParallelPlanner().geometry(MODEL).names[1:]
    factors = tmp_path / "factors.json"
    factors.write_text(json.dumps({"format": F.FORMAT, "version": 1, "model": MODEL, "runs": 3, "measured_at": "x",
                                   "units": [{"name": n, "samples": [{"fraction": 0.25, "factor": 1.3},
                                                                     {"fraction": 0.5, "factor": 1.15}]} for n in names]}))
    cli_stage = plan_cli_stage(cands, tmp_path, "--parallel-tile-factors", str(factors))

    pushed = ParallelPlanner(tile_factors=F.load_many([factors])).propose(device, cands)
    by_area = ParallelPlanner().propose(device, cands)
    assert pushed is not None and by_area is not None
    assert pushed.stage.blocks == cli_stage.blocks and pushed.stage.workers == cli_stage.workers
    assert pushed.stage_seconds == pytest.approx(cli_stage.predicted_seconds)
    assert by_area.stage_seconds < pushed.stage_seconds  # small tiles cost more than their area share

    plan = ppb.Plan(agent_id="a", model_id=MODEL, predicted_seconds=pushed.seconds * 2)
    assert ParallelPlanner(tile_factors=F.load_many([factors])).attach(plan, device, cands)
    assert [b.predicted_seconds for b in plan.parallel.blocks] == pytest.approx(
        [b.predicted_seconds for b in cli_stage.blocks])  # the pushed plan carries the CLI's per-block prices


def test_the_planners_factors_files_are_checked(tmp_path):
    import json

    from planner import dpfp_factors as F
    from planner.config import PlannerConfig

    def write(name: str, model: str):
        p = tmp_path / name
        p.write_text(json.dumps({"format": F.FORMAT, "version": 1, "model": model,
                                 "units": [{"name": "u", "samples": [{"fraction": 0.5, "factor": 1.2}]}]}))
        return p

    a, b, c = write("a.json", MODEL), write("b.json", "vgg16"), write("c.json", MODEL)
    assert set(F.load_many([a, b])) == {MODEL, "vgg16"}
    with pytest.raises(InvalidInput, match="two tile-factors files for model 'resnet18'"):
        F.load_many([a, c])
    with pytest.raises(InvalidInput, match="names no model"):
        F.load_many([write("d.json", "")])
    with pytest.raises(InvalidInput, match="at most"):
        F.load_many([a] * (F.MAX_FILES + 1))
    assert PlannerConfig(parallel_tile_factors=(str(a),)).parallel_tile_factors == (str(a),)


def test_the_planner_daemon_loads_the_factors_and_refuses_a_bad_file(tmp_path):
    """edgesplit planner serve --parallel-tile-factors FILE: the re-planner's ParallelPlanner holds them."""
    import json

    from planner import dpfp_factors as F
    from planner.config import PlannerConfig
    from planner.server import serve

    good = tmp_path / "f.json"
    good.write_text(json.dumps({"format": F.FORMAT, "version": 1, "model": MODEL,
                                "units": [{"name": "add", "samples": [{"fraction": 0.5, "factor": 1.2}]}]}))
    bad = tmp_path / "bad.json"
    bad.write_text("{")

    async def go():
        base = dict(listen="127.0.0.1:0", metrics_port=-1)
        ps = await serve(PlannerConfig(db=str(tmp_path / "a.sqlite"), parallel_tile_factors=(str(good),), **base))
        try:
            assert set(ps.service.replanner.parallel.tile_factors) == {MODEL}
        finally:
            await ps.drain_and_stop(1.0)
        with pytest.raises(InvalidInput, match="not readable JSON"):
            await serve(PlannerConfig(db=str(tmp_path / "b.sqlite"), parallel_tile_factors=(str(bad),), **base))

    asyncio.run(asyncio.wait_for(go(), 60))


def test_a_frames_tile_times_are_kept_per_stage_worker_and_summarized_per_worker(loaded):
    """PushedStage's frames carry each tile's round trip by the worker that computed it, bounded by the
    stage's workers (and "local"), and failed attempts by worker; the agent's summary prints them."""
    from runtime.agent.client import FrameResult
    from runtime.agent.parallel_maps import TileReport
    from runtime.agent.parallel_push import tile_times
    from runtime.agent.summary import summarize

    a, b = "127.0.0.1:5000", "127.0.0.1:5001"
    reports = [TileReport(0, (0, 4), a, ran_on=a, seconds=0.010), TileReport(0, (4, 8), b, ran_on=b, seconds=0.030),
               TileReport(1, (0, 4), a, ran_on="local", seconds=0.050, failures=[f"{a}: UNAVAILABLE", f"{b}: DEADLINE_EXCEEDED"]),
               TileReport(1, (4, 8), b, ran_on="10.9.9.9:1", seconds=9.0, failures=["10.9.9.9:1: INTERNAL"]),
               TileReport(1, (8, 9), b)]  # a stray address (never one of the stage's) and a tile never computed
    seconds, failed = tile_times(reports, (a, b))
    assert seconds == {a: [0.010], b: [0.030], "local": [0.050]} and failed == {a: 1, b: 1}

    x = torch.zeros(1, 10)
    frames = [FrameResult(i, f"f{i}", x, "parallel", "s", "raw", tile_seconds=seconds, tile_failures=failed)
              for i in range(3)] + [FrameResult(3, "f3", x, "local", "output", "raw")]
    text = summarize(frames, loaded.split("output"), "raw", MODEL)
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[text.splitlines().index(
        "parallel stage tiles by worker (round trip)") + 2:]}
    assert rows == {a: ["3", "3", "10.00", "10.00"], b: ["3", "3", "30.00", "30.00"], "local": ["3", "0", "50.00", "50.00"]}
    assert frames[0].to_json(None)["tile_ms"] == {a: [10.0], b: [30.0], "local": [50.0]}
    assert "parallel stage tiles" not in summarize(frames[3:], loaded.split("output"), "raw", MODEL)
