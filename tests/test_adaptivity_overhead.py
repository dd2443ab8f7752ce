"""A link's measured overhead (issue 11): what an offloaded frame spends outside the parts the planner measures
and prices by themselves (its wait for the board, the worker's decode, queue and hand-offs), measured per
(agent, worker) with its age and sample count (runtime.agent.estimator.Overhead), used by the agent's result
lines (runtime.agent.prediction) and by the planner's pricing (planner.compute.LinkOverhead); start-up frames
give no encode figure; one helper for the relative variance of the link's bandwidth and of the board."""

from __future__ import annotations

import dataclasses
import math
import time
from types import SimpleNamespace

import pytest
import torch
from planner_helpers import RPC

from planner import compute, measured
from runtime.agent.estimator import LinkEstimate, Overhead, log_spread
from runtime.agent.frame import FrameResult
from runtime.agent.prediction import OVERHEAD_MIN_SAMPLES, Board, Prediction
from runtime.agent.telemetry import LinkEstimator, link_overhead
from runtime.contracts.profile import Block, Profile, Transfer
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

pytestmark = pytest.mark.timeout(60)


def edge_frame(seq: int, *, bq: float = 0.002, held: float = 0.042, tail: float = 0.038, encode: float = 0.0015,
               worker: str = "e:1") -> FrameResult:
    times = {"board_queue": bq, "head": 0.0001, "encode": encode, "transfer_edge": 0.060, "edge_queue": 0.0002,
             "edge_decode": 0.0018, "edge_tail": tail, "edge_held": held, "total": 0.065}
    return FrameResult(seq, "f", torch.zeros(1, 10), "edge", "input", "jpeg", 2, worker=worker, wire_bytes=13_000,
                       times=times)


def test_one_helper_for_the_relative_variance_of_the_link_and_of_the_board():
    link, board = LinkEstimate(), Board()
    xs = (0.20, 0.25, 0.22, 0.30, 0.21)
    for i, x in enumerate(xs):
        link.add_bandwidth(x, 0.0)  # no ageing, as the board; a jitter within the step detector's drift
        board.add(x, 0.0, alpha=link.options.alpha, now=float(i))
    assert link.steps == 0 and link.jitter > 0
    assert board.cs2 == pytest.approx(link.jitter)
    assert board.samples == len(xs) and board.updated == 4.0
    assert log_spread(0.5, 1.0, 0.0, 0.3) == 0.5  # no mean: unchanged
    assert log_spread(0.0, math.e, 1.0, 0.3, first=True) == pytest.approx(1.0)


def test_a_links_overhead_is_a_windowed_median_with_age_and_samples():
    ov = Overhead()
    assert ov.samples == 0 and ov.value == 0.0 and ov.age(5.0) == math.inf  # unknown
    for i, x in enumerate((0.004, 0.005, 0.030, 0.004)):
        assert ov.add(x, float(i))
    assert ov.value == pytest.approx(0.0045) and ov.samples == 4 and ov.age(5.0) == 2.0  # one slow frame: no trend
    assert not ov.add(-0.001, 9.0) and not ov.add(math.nan, 9.0) and not ov.add(2.0, 9.0)
    assert ov.samples == 4
    copy = ov.copy()
    ov.add(0.1, 10.0)
    assert copy.samples == 4 and len(copy.recent) == 4


def test_the_overhead_sample_is_the_board_wait_and_the_workers_hold_beyond_its_tail():
    assert link_overhead(edge_frame(0)) == pytest.approx(0.002 + 0.004)
    no_hold = edge_frame(0)
    del no_hold.times["edge_held"]
    assert link_overhead(no_hold) == pytest.approx(0.002 + 0.0002 + 0.0018)
    local = FrameResult(0, "f", torch.zeros(1, 10), "local", "output", "", 2, times={"total": 0.2})
    chained = edge_frame(0)
    chained.times["edge_forward"] = 0.010
    assert link_overhead(local) is None and link_overhead(chained) is None


def test_start_up_frames_give_no_encode_nor_overhead_figure_and_the_link_reports_its_overhead():
    est = LinkEstimator(clock=lambda: 50.0)
    est.use("e:1")
    est.frame_interval = 0.25
    for seq in range(3):  # a configuration's first frames: 15 ms encodes, 30 ms waits (start-up)
        est.observe(edge_frame(seq, encode=0.015, bq=0.030))
    e = est.wire.entries[("input", "jpeg")]
    assert e.samples == 3 and e.encode_seconds == 0.0  # bytes counted, no encode figure
    assert est.estimate("e:1").overhead.samples == 0
    stages, _ = est.take_report()
    assert "link_overhead" not in stages
    for seq in range(3, 3 + OVERHEAD_MIN_SAMPLES):
        est.observe(edge_frame(seq))
    assert e.encode_seconds == pytest.approx(0.0015)
    ov = est.estimate("e:1").overhead
    assert ov.samples == OVERHEAD_MIN_SAMPLES and ov.value == pytest.approx(0.006)
    stages, _ = est.take_report()
    assert stages["link_overhead"] == pytest.approx(0.006) and stages["link_overhead_samples"] == OVERHEAD_MIN_SAMPLES
    assert stages["link_overhead_age"] == 0.0


def offloading_plan() -> pb.Plan:
    p = pb.Plan(version=2, split_id="input", worker_id="w1", worker_address="e:1", predicted_seconds=0.060,
                predicted_bytes=13_000, codec="jpeg")
    p.breakdown_seconds.update({"compute:edge": 0.035, "encode:device->edge": 0.001, "rtt:device->edge": 0.005,
                                "transfer:device->edge": 0.017, "decode:device->edge": 0.001,
                                "queue:board": 0.001})
    return p


def test_a_line_replaces_the_issued_decode_and_board_wait_by_the_links_overhead_once_measured():
    p = Prediction.of(offloading_plan())
    assert (p.decode, p.board_wait) == (0.001, 0.001)
    link = LinkEstimate()
    link.add_bandwidth(13_000 / 0.017, 1.0)  # the issued link: the link terms stay as issued
    link.add_rtt(0.005, 1.0)
    assert p.now(link) == pytest.approx(0.060)
    for i in range(OVERHEAD_MIN_SAMPLES - 1):
        link.overhead.add(0.006, 1.0 + i)
    assert p.now(link) == pytest.approx(0.060)  # too few frames: unknown, the issued terms stand
    link.overhead.add(0.006, 5.0)
    assert p.now(link) == pytest.approx(0.060 - 0.002 + 0.006)
    unmeasured = LinkEstimate()  # no bandwidth: the link terms as issued, the overhead still counts
    for i in range(OVERHEAD_MIN_SAMPLES):
        unmeasured.overhead.add(0.006, float(i))
    assert p.now(unmeasured) == pytest.approx(0.064)
    assert Prediction.of(pb.Plan(version=3, split_id="output", predicted_seconds=0.2)).now(link) == 0.2  # local


def worker_profile() -> Profile:
    blocks = (Block(0, "a", 0.020, 1000, transfers=(Transfer("jpeg", 900, 0.001, 0.002, "jpeg"),)),
              Block(1, "b", 0.020, 100))
    return Profile("xeon", "edge", "m", blocks, 5000, input_transfers=(Transfer("jpeg", 4000, 0.001, 0.0009, "jpeg"),))


def test_the_planner_prices_a_links_overhead_in_the_workers_decode_per_agent_and_worker():
    state = SimpleNamespace(workers={"w1": SimpleNamespace(profiles={"m": worker_profile()})})
    plan = offloading_plan()
    plan.model_id = "m"
    t = pb.Telemetry(agent_id="a1", worker="w1", stage_seconds={"link_overhead": 0.0059, "link_overhead_samples": 20,
                                                                "link_overhead_age": 2.0})
    got = measured.link_overhead(state, None, t, plan)
    assert got is not None
    seconds, samples, updated, extra = got
    assert (seconds, samples) == (0.0059, 20) and time.time() - updated == pytest.approx(2.0, abs=0.5)
    assert extra == pytest.approx(0.0059 - 0.0009 - 0.001)  # beyond the profile's decode and the plan's board wait
    other = pb.Telemetry(agent_id="a1", worker="w2", stage_seconds=t.stage_seconds)
    assert measured.link_overhead(state, None, other, plan) is None  # another link's report
    bad = pb.Telemetry(agent_id="a1", worker="w1", stage_seconds={"link_overhead": 5.0, "link_overhead_samples": 3})
    assert measured.link_overhead(state, None, bad, plan) is None

    speeds = compute.WorkerSpeeds(ttl_seconds=60.0)
    base = {"m": worker_profile()}
    assert speeds.profiles("w1", base, "m") is base  # unknown: the profile as it is
    assert speeds.overhead("w1", seconds, samples, updated, extra)
    mine = speeds.profiles("w1", base, "m")
    assert mine["m"].input_transfers[0].decode_seconds == pytest.approx(0.0059 - 0.001)
    assert mine["m"].blocks[0].transfers[0].decode_seconds == pytest.approx(0.002 + extra)
    assert mine["m"].blocks[1].transfers[0].decode_seconds == pytest.approx(extra)  # a raw cut too
    assert mine is speeds.profiles("w1", base, "m")  # the same object while it holds
    assert not speeds.overhead("w1", seconds, samples, updated, extra + 0.0002)  # under 0.5 ms: not remade
    assert speeds.profiles("w2", base, "m") is base  # per worker
    assert speeds.expire(updated + 61.0) and speeds.profiles("w1", base, "m") is base  # old: the profile stands again


def test_a_reported_link_overhead_reaches_the_ranking_and_replaces_the_hold(aio, planner):
    """The hold beyond the model (planner.compute.hold_extra) is part of the link's overhead: once the agent reports
    the latter for the plan's worker, the hold is no second term."""
    from planner_helpers import EDGE_S

    async def scenario():
        v1 = await planner.register()
        assert v1.split_id == "conv2"
        before = await ranked(planner)

        async def send(stages):
            async def messages():
                yield pb.Telemetry(agent_id="a1", worker="w1", plan_version=v1.version, sent_unix=time.time(),
                                   frames=10, stage_seconds=stages)
            await planner.stub.ReportTelemetry(messages(), timeout=RPC)

        await send({"edge_held": 0.009, "edge_tail": sum(EDGE_S[2:])})
        st = planner.ps.service.agents["a1"]
        assert st.overhead.applied["hold"] == pytest.approx(0.004)
        await send({"edge_held": 0.009, "edge_tail": sum(EDGE_S[2:]), "link_overhead": 0.006,
                    "link_overhead_samples": 12, "link_overhead_age": 0.5})
        assert st.overhead.applied["hold"] == 0.0 and st.tails.applied_overhead("w1") == pytest.approx(0.006)
        now = await ranked(planner)
        assert now["output"] == pytest.approx(before["output"])
        assert now["conv2"] == pytest.approx(before["conv2"] + 0.006)

    aio.run(scenario())


async def ranked(p, agent: str = "a1") -> dict[str, float]:
    reply = await p.stub.QueryPlan(pb.PlanQuery(agent_id=agent, top_n=6), timeout=RPC)
    return {c.split_id: c.predicted_seconds for c in reply.candidates}


def test_the_summed_drift_of_a_plans_parts_re_issues_it():
    """The worker 3 ms slower and the encode 3 ms faster: the whole figure is as issued, but two parts moved by
    6 ms in all (10 % of 60 ms): stale; a 2 ms move alone (3 %) is not. ``queue:board`` counts in its part."""
    from planner import refresh
    from runtime.contracts.costmodel import Configuration, Hop, Stage

    def config(edge: float, encode: float) -> Configuration:
        hop = Hop("device", "board", "edge", "server", 0, "input", Transfer("jpeg", 13_000, encode, 0.001, "jpeg"),
                  encode, 0.005, 0.017, 0.001, 0.0)
        stages = (Stage("device", "board", 0, 0, 0.0, encode), Stage("edge", "server", 0, 4, edge, edge + 0.001))
        return Configuration(edge + encode + 0.001 + 0.022, 10.0, stages, (hop,))

    plan = offloading_plan()  # encode 1 ms + queue:board 1 ms = 2 ms in the configuration's encode
    assert refresh.drift(plan, config(0.035, 0.002)) == pytest.approx(0.0)
    assert refresh.drift(plan, config(0.038, 0.002 - 0.0015)) == pytest.approx(0.0045)
    assert not refresh.drifted(plan, config(0.037, 0.002))
    assert refresh.drifted(plan, config(0.038, 0.002 - 0.003))
    # the net figure (the whole, at the same link) moved by 0: a rule on the net change saw nothing
    assert config(0.038, 0.002 - 0.003).seconds == pytest.approx(config(0.035, 0.002).seconds)


def test_board_figures_keep_their_age():
    b = Board()
    assert b.updated == -math.inf
    b.add(0.2, 0.01, now=3.0)
    assert dataclasses.replace(b).updated == 3.0


def test_a_line_re_costs_an_offloading_plan_with_what_its_link_measured_before_the_frame():
    """The worker's tail (its median on the link for the split), the board's encode with the board runtime's own
    time, and the link's overhead replace the issued terms, each from 3 frames past the start-up on, from what
    was known when the frame arrived (runtime.agent.prediction.History): never from the frame itself."""
    from collections import OrderedDict

    from runtime.agent.planner_link import PlannerLink

    clock = [0.0]
    est = LinkEstimator(clock=lambda: clock[0], min_bytes=1 << 30)  # no bandwidth sample: the link terms as issued
    link = SimpleNamespace(predictions=OrderedDict(), agent=SimpleNamespace(link=est))
    PlannerLink._predict(link, offloading_plan())
    lines = []
    for seq in range(7):
        clock[0] = float(seq)
        r = edge_frame(seq)
        est.observe(r)
        lines.append(PlannerLink.predicted(link, r))
    assert lines[:6] == pytest.approx([0.060] * 6)  # start-up, then too few frames before each
    other = 0.065 - (0.002 + 0.0001 + 0.0015 + 0.060)  # the board runtime's own time per frame
    # overhead 6 ms for decode 1 + board wait 1; tail 38 ms for 35; encode 1.5 ms + runtime for 1
    assert lines[6] == pytest.approx(0.060 + (0.006 - 0.002) + (0.038 - 0.035) + (0.0015 + other - 0.001))


def test_the_links_overhead_is_exported_per_link():
    from runtime.agent.metrics import AgentMetrics

    metrics = AgentMetrics()
    est = LinkEstimator(metrics, clock=lambda: 50.0)
    for seq in range(3 + OVERHEAD_MIN_SAMPLES):
        est.observe(edge_frame(seq))
    get = metrics.registry.get_sample_value
    assert get("edgesplit_agent_link_estimate_overhead_seconds", {"link": "e:1"}) == pytest.approx(0.006)
    assert get("edgesplit_agent_link_estimate_overhead_samples", {"link": "e:1"}) == OVERHEAD_MIN_SAMPLES
