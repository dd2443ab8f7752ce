"""Queue terms of the workload (issue 11): a frame's wait for the board and the link at the camera's rate
(runtime.contracts.queueing), in the agent's result-line prediction (runtime.agent.prediction) and the
planner's ranking and breakdown (planner.compute.with_overhead, planner.workload)."""

from __future__ import annotations

import random
import statistics

import pytest
import torch

from planner import compute, workload
from runtime.agent.client import FrameResult
from runtime.agent.estimator import LinkEstimate
from runtime.agent.prediction import Prediction, line
from runtime.agent.telemetry import LinkEstimator
from runtime.contracts.costmodel import Configuration, Hop, Stage
from runtime.contracts.profile import Block, Profile, Transfer
from runtime.contracts.queueing import expected_wait
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb


def simulate(interval: float, lo: float, hi: float, window: int = 2, n: int = 20_000) -> tuple[float, float]:
    """(mean wait, dropped share) of a paced source against a resource of uniform [lo, hi] service, by event."""
    rng = random.Random(1)
    in_flight: list[float] = []
    free, waits, dropped = 0.0, [], 0
    for k in range(n):
        arrival = k * interval
        in_flight = [f for f in in_flight if f > arrival]
        if len(in_flight) >= window:
            dropped += 1
            continue
        start = max(arrival, free)
        free = start + rng.uniform(lo, hi)
        in_flight.append(free)
        waits.append(start - arrival)
    return statistics.mean(waits), dropped / n


def test_a_paced_source_on_a_steady_resource_never_waits_and_jitter_makes_it_wait():
    assert expected_wait(0.150, 0.250).seconds == 0.0  # deterministic arrivals and service: D/D/1
    w = expected_wait(0.200, 0.250, cs2=0.04)
    assert not w.saturated and w.utilisation == pytest.approx(0.8)
    assert w.seconds == pytest.approx(0.8 / 0.2 * 0.04 / 2 * 0.200)  # Kingman, ca2 = 0
    assert expected_wait(0.200, 0.250, cs2=0.04, ca2=1.0).seconds > w.seconds  # M/G/1 (P-K) waits more
    assert expected_wait(0.200, 0.0, cs2=0.04).seconds == 0.0  # unknown interval: unknown, no term


def test_near_saturation_the_window_caps_the_wait_and_beyond_it_frames_are_dropped():
    w = expected_wait(0.245, 0.250, cs2=0.04)  # Kingman alone: 0.24 s; the window of 2 holds one frame ahead
    assert w.seconds == pytest.approx(0.245 - 0.125)
    sat = expected_wait(0.260, 0.250, cs2=0.01)
    assert sat.saturated and sat.seconds == pytest.approx(0.260 - 0.125)
    assert sat.dropped_share == pytest.approx(1 - 0.250 / 0.260)
    assert expected_wait(0.260, 0.250, window=3).seconds == pytest.approx(2 * 0.260 - 0.125)


def test_the_drop_limited_wait_and_share_match_a_simulated_camera():
    """adapt_run's local phase: head 230-290 ms at --fps 4, --window 2."""
    mean, dropped = simulate(0.250, 0.230, 0.290)
    w = expected_wait(0.260, 0.250, cs2=(0.060 ** 2 / 12) / 0.260 ** 2)
    assert w.saturated
    assert w.seconds == pytest.approx(mean, rel=0.10)
    assert w.dropped_share == pytest.approx(dropped, abs=0.02)
    stable_mean, stable_dropped = simulate(0.250, 0.150, 0.210)
    assert stable_dropped == 0 and expected_wait(0.180, 0.250, cs2=0.01).seconds == pytest.approx(stable_mean, abs=0.005)


def test_the_link_jitter_is_the_relative_variance_of_its_samples_and_a_step_restarts_it():
    est = LinkEstimate()
    rng = random.Random(2)
    for i in range(200):
        est.add_bandwidth(125_000 * rng.uniform(0.8, 1.2), float(i))
    assert est.jitter == pytest.approx(0.2 ** 2 / 3, rel=0.6)  # +-20 % uniform
    for i in range(3):
        est.add_bandwidth(12_500.0, 200.0 + i)  # a 10x step
    assert est.steps >= 1 and est.jitter < 0.05


def plan_1mbit() -> ppb.Plan:
    p = ppb.Plan(version=3, split_id="input", codec="jpeg", worker_id="w1", worker_address="e:1",
                 predicted_seconds=0.216, predicted_bytes=13_000)
    p.breakdown_seconds.update({"compute:edge": 0.047, "encode:device->edge": 0.008, "rtt:device->edge": 0.010,
                                "transfer:device->edge": 0.104, "decode:device->edge": 0.002,
                                "queue:link": 0.005, "queue:board": 0.0})
    return p


def test_a_result_line_prices_its_own_bytes_and_the_link_queue_at_the_frame_rate():
    est = LinkEstimator(clock=lambda: 10.0)
    for v in (125_000.0, 100_000.0, 150_000.0):
        est.add_bandwidth_sample(v, "e:1")
    est.add_rtt_sample(0.010, "e:1")
    link = est.links.get("e:1")
    bw = link.bandwidth.value
    p = Prediction.of(plan_1mbit())
    assert p.queue == pytest.approx(0.005)
    small = FrameResult(0, "rocket", torch.zeros(1, 10), "edge", "input", "jpeg", 3, worker="e:1", wire_bytes=7_700)
    big = FrameResult(1, "cat", torch.zeros(1, 10), "edge", "input", "jpeg", 3, worker="e:1", wire_bytes=16_700)
    base = 0.216 - 0.010 - 0.104 - 0.005 + 0.010  # the plan less its issued link terms, with the RTT now
    # unpaced (no interval): no queue term; each frame its own bytes at the bandwidth now
    assert line(p, est, small) == pytest.approx(base + 7_700 / bw)
    assert line(p, est, big) - line(p, est, small) == pytest.approx(9_000 / bw)
    est.frame_interval, est.frame_window = 0.15, 2  # --fps 6.7: the link ~70 % busy
    wait = expected_wait(13_000 / bw, 0.15, link.jitter, window=2)
    assert 0 < wait.seconds < 0.05 and not wait.saturated
    assert line(p, est, small) == pytest.approx(base + 7_700 / bw + wait.seconds)
    # a link too slow for the camera: the drop-limited wait, one frame's worth ahead less half an interval
    for _ in range(8):
        est.add_bandwidth_sample(40_000.0, "e:1")
    slow = est.links.get("e:1").bandwidth.value
    sat = expected_wait(13_000 / slow, 0.15, est.links.get("e:1").jitter, window=2)
    assert sat.saturated and sat.seconds == pytest.approx(13_000 / slow - 0.075)
    assert line(p, est, small) == pytest.approx(base + 7_700 / slow + sat.seconds)


def test_the_agent_reports_its_workload_and_link_jitter_to_the_planner():
    est = LinkEstimator(clock=lambda: 10.0)
    est.use("e:1")
    for v in (125_000.0, 100_000.0):
        est.add_bandwidth_sample(v, "e:1")
    est.observe(FrameResult(0, "f", torch.zeros(1, 10), "local", "output", "raw", 1, times={"head": 0.2}))
    assert "source_interval" not in est.take_report()[0]  # unpaced: nothing to report
    est.frame_interval, est.frame_window = 0.25, 2
    est.observe(FrameResult(1, "f", torch.zeros(1, 10), "local", "output", "raw", 1, times={"head": 0.2}))
    stages, _ = est.take_report()
    assert stages["source_interval"] == 0.25 and stages["source_window"] == 2.0
    assert stages["link_cv2"] == pytest.approx(est.links.get("e:1").jitter) and stages["link_cv2"] > 0


def board_profile() -> Profile:
    blocks = (Block(0, "b0", 0.100, 1000, transfers=(Transfer("jpeg", 800, codec="jpeg", encode_seconds=0.004),)),
              Block(1, "b1", 0.120, 10))
    return Profile("board", "device", "m", blocks, 150_000,
                   input_transfers=(Transfer("jpeg", 13_000, codec="jpeg", encode_seconds=0.008),))


def test_the_board_wait_is_a_model_of_the_workload_for_every_configuration():
    prof = board_profile()
    ov = compute.Overhead()
    ov.observe({"overhead_local": 0.02, "source_interval": 0.25, "source_window": 2.0}, now=0.0)
    ov.apply()
    out = compute.with_overhead(prof, ov.applied)
    waits = out.settings[workload.BOARD_WAITS]
    # local: 0.22 s of blocks + 0.02 of overhead at a frame every 0.25 s: Kingman with the board's variance
    local = expected_wait(0.24, 0.25, compute.BOARD_CS2, window=2)
    assert waits["output"] == pytest.approx((local.seconds, 0.96))
    assert out.blocks[-1].seconds == pytest.approx(0.120 + 0.02 + local.seconds)
    # the JPEG at the input keeps the board 8 ms per frame: no wait, and no extra encode time
    assert waits["0/jpeg"][0] == 0.0 and out.input_transfers[0].encode_seconds == pytest.approx(0.008)
    # a faster camera saturates the local configuration: the drop-limited wait
    ov.observe({"source_interval": 0.2, "source_window": 2.0}, now=1.0)
    ov.apply()
    sat = compute.with_overhead(prof, ov.applied).settings[workload.BOARD_WAITS]["output"]
    assert sat == pytest.approx((0.24 - 0.1, 0.24 / 0.2))


def test_a_measured_board_queue_belongs_to_the_local_configuration_and_ages():
    ov = compute.Overhead()
    ov.observe({"source_interval": 0.25, "source_window": 2.0, "overhead_queue": 0.09}, now=0.0)
    ov.apply()
    assert ov.applied["queue_measured"] == 1.0
    out = compute.with_overhead(board_profile(), ov.applied)
    assert out.settings[workload.BOARD_WAITS]["output"][0] == pytest.approx(0.09)  # measured stands for the model
    # offloaded reports carry no queue: QUEUE_TTL later the measured figure is gone and the model is back
    assert not ov.observe({"source_interval": 0.25, "source_window": 2.0}, now=compute.QUEUE_TTL / 2)
    assert ov.observe({"source_interval": 0.25, "source_window": 2.0}, now=compute.QUEUE_TTL + 1)
    ov.apply()
    assert ov.applied["queue_measured"] == 0.0 and ov.applied["queue"] == 0.0
    modelled = expected_wait(0.22, 0.25, compute.BOARD_CS2, window=2).seconds
    assert compute.with_overhead(board_profile(), ov.applied).settings[workload.BOARD_WAITS]["output"][0] == \
        pytest.approx(modelled)
    # a queue measured at another frame rate says nothing of this one
    ov.observe({"source_interval": 0.25, "source_window": 2.0, "overhead_queue": 0.09}, now=100.0)
    ov.observe({"source_interval": 0.5, "source_window": 2.0}, now=101.0)
    assert ov.samples["queue"] == 0
    # and the workload itself ages: no report of it for WORKLOAD_TTL, no queue terms
    ov.observe({"overhead_local": 0.01}, now=101.0 + compute.WORKLOAD_TTL + 1)
    assert ov.interval == 0.0


def config(local: bool, transfer: float = 0.1) -> Configuration:
    if local:
        return Configuration(0.24, 4.0, (Stage("device", "board", 0, 2, 0.24, 0.24),), ())
    hop = Hop("device", "board", "edge", "w", 0, "input", Transfer("jpeg", 13_000, codec="jpeg", encode_seconds=0.008),
              0.008, 0.01, transfer, 0.002, 0.0)
    return Configuration(0.008 + 0.01 + transfer + 0.002 + 0.05, 1 / transfer,
                         (Stage("device", "board", 0, 0, 0.0, 0.008), Stage("edge", "w", 0, 2, 0.05, 0.052)), (hop,))


def test_the_planner_prefers_plans_that_keep_every_utilisation_below_one_and_shows_the_waits():
    ov = compute.Overhead()
    ov.observe({"source_interval": 0.25, "source_window": 2.0, "link_cv2": 0.013, "overhead_local": 0.04}, now=0.0)
    ov.apply()
    dev = compute.with_overhead(board_profile(), ov.applied)
    local = config(True)  # 0.26 s a frame on the board at a frame every 0.25 s: saturated
    fast, slow = config(False, 0.1), config(False, 0.3)  # the link 40 % and 120 % busy
    assert workload.unstable(local, dev) and workload.unstable(slow, dev) and not workload.unstable(fast, dev)
    assert workload.rank_key(fast, dev, 0.9) < workload.rank_key(slow, dev, 0.1)  # stable first, whatever the score
    plan = ppb.Plan(predicted_seconds=fast.seconds)
    plan.breakdown_seconds.update(fast.breakdown())
    workload.annotate(plan, fast, dev)
    lw = expected_wait(0.1, 0.25, 0.013, window=2).seconds
    assert plan.breakdown_seconds["queue:link"] == pytest.approx(lw) and plan.predicted_seconds == pytest.approx(fast.seconds + lw)
    lp = ppb.Plan(predicted_seconds=0.5)
    lp.breakdown_seconds["compute:device"] = 0.5
    workload.annotate(lp, local, dev)
    wait = dev.settings[workload.BOARD_WAITS]["output"][0]
    assert wait > 0 and lp.breakdown_seconds["queue:board"] == pytest.approx(wait)
    assert lp.breakdown_seconds["compute:device"] + wait == pytest.approx(0.5) and lp.predicted_seconds == 0.5


def test_a_line_is_predicted_from_the_figures_before_its_own_frame():
    """A frame's own bandwidth sample (taken when its result comes, before its line is written) is no part of
    its prediction: the estimate as it stood before it is."""
    now = [10.0]
    est = LinkEstimator(clock=lambda: now[0])
    est.use("e:1")
    est.add_rtt_sample(0.010, "e:1")
    p = Prediction.of(plan_1mbit())

    def frame(seq: int, transfer: float) -> FrameResult:
        return FrameResult(seq, "cat", torch.zeros(1, 10), "edge", "input", "jpeg", 3, worker="e:1", wire_bytes=16_700,
                           times={"transfer_edge": transfer, "edge_held": 0.050, "total": transfer + 0.01})

    est.observe(frame(5, 0.190))  # 16.7 KB in 0.13 s: ~128 KB/s
    now[0] = 10.25
    est.observe(frame(6, 0.150))  # faster
    before = line(p, est, frame(7, 0.400))  # frame 7 arrives at 10.09, after frame 5's result, before frame 6's
    now[0] = 10.5
    r = frame(7, 0.400)
    est.observe(r)  # its own sample: 16.7 KB in ~0.34 s, far below the estimate
    after = line(p, est, r)
    assert after != pytest.approx(before)  # the estimate as frame 7 arrived: after frame 5 only
    frame5 = est.history.at(10.0)
    assert frame5 is not None and frame5.link.bandwidth.samples == 1
    assert after == pytest.approx(p.now(frame5.link, est.wire.mean("input", "jpeg"), frame_bytes=16_700))


def local_frame(seq: int, head: float) -> FrameResult:
    return FrameResult(seq, "f", torch.zeros(1, 10), "local", "output", "raw", 4,
                       times={"board_queue": 0.0, "head": head, "local_tail": 0.0, "total": head + 0.005})


def test_a_local_frames_wait_is_predicted_from_the_board_at_its_arrival():
    """Lindley's recursion on what the agent knew when the frame arrived: the frame ahead of it took the board
    at a known time and holds it for the board's measured service."""
    now = [0.0]
    est = LinkEstimator(clock=lambda: now[0])
    est.frame_interval, est.frame_window = 0.25, 2
    p = Prediction.of(ppb.Plan(version=4, split_id="output", predicted_seconds=0.4))
    t = 0.0
    for seq in range(12):  # a board of 0.26 s at a frame every 0.25 s, each frame admitted once the one ahead is done
        arrival = seq * 0.25
        start = max(arrival, t)
        t = start + 0.26
        now[0] = t + 0.005
        r = FrameResult(seq, "f", torch.zeros(1, 10), "local", "output", "raw", 4,
                        times={"board_queue": start - arrival, "head": 0.26, "total": now[0] - arrival})
        est.observe(r)
    wait = r.times["board_queue"]
    assert wait > 0.03
    # the frame ahead took the board at its recorded start; this one arrived 0.25 s after it, into the 0.26 s
    got = line(p, est, r)
    assert got == pytest.approx(est.history.at(r.times and now[0] - r.times["total"]).board.service
                                + est.history.at(now[0] - r.times["total"]).board.overhead + wait, abs=0.006)


def test_a_local_plan_is_re_costed_at_the_board_and_its_wait_at_the_frame_rate():
    est = LinkEstimator(clock=lambda: 10.0)
    p = Prediction.of(ppb.Plan(version=4, split_id="output", predicted_seconds=0.398))
    assert p.local
    probe = local_frame(99, 0.2)
    assert line(p, est, probe) == pytest.approx(0.398)  # the board unmeasured: as issued
    for i in range(3 + 5):  # the configuration's first 3 frames are start-up (OVERHEAD_WARMUP)
        est.observe(local_frame(i, 0.215))
    assert est.board.samples == 5 and est.board.overhead == pytest.approx(0.005)
    assert line(p, est, probe) == pytest.approx(0.215 + 0.005)  # unpaced: no wait term
    est.frame_interval, est.frame_window = 0.25, 2
    assert line(p, est, probe) == pytest.approx(0.220)  # steady board at 86 %: D/D/1, no wait
    for i in range(8, 40):
        est.observe(local_frame(i, 0.26 if i % 2 else 0.24))  # 25 % quota, head 240-260 ms: saturated
    b = est.board
    assert b.cs2 > 0 and b.service == pytest.approx(0.25, abs=0.012)
    wait = expected_wait(b.service, 0.25, b.cs2, window=2)
    assert line(p, est, probe) == pytest.approx(b.service + b.overhead + wait.seconds)
    if wait.saturated:  # the drop-limited latency
        assert wait.seconds == pytest.approx(b.service - 0.125)


def test_the_planner_link_re_costs_a_local_plans_line_at_the_board():
    from collections import OrderedDict
    from types import SimpleNamespace

    from runtime.agent.planner_link import PlannerLink

    est = LinkEstimator(clock=lambda: 10.0)
    link = SimpleNamespace(predictions=OrderedDict(), agent=SimpleNamespace(link=est))
    PlannerLink._predict(link, ppb.Plan(version=4, split_id="output", predicted_seconds=0.40957))
    for i in range(8):
        est.observe(local_frame(i, 0.19))
    assert PlannerLink.predicted(link, local_frame(50, 0.19)) == pytest.approx(0.19 + 0.005)


def _overfull_link(n: int, correct: bool = True) -> tuple[LinkEstimator, list[FrameResult], list[float]]:
    """12.9 KB frames once a second up a link that carries 12.5 KB/s each way (4 KB of logits back, 20 ms RTT, the
    worker holding each 0.1 s): each frame waits 32 ms longer than the one before for the bytes ahead of it (the
    dynamic trace's 0.1 Mbit/s step, DenseNet-169 as JPEG). Returns the estimator, the frames and their waits."""
    now = [0.0]
    est = LinkEstimator(clock=lambda: now[0])
    est.use("e:1")
    est.add_rtt_sample(0.020, "e:1")
    est.frame_interval, est.frame_window = 1.0, 2
    rate, up, down, held, rtt = 12_500.0, 12_900, 4_000, 0.1, 0.020
    free, frames, waits = 0.0, [], []
    for seq in range(n):
        sent = 100.0 + seq
        start = max(sent, free)
        free = start + up / rate
        finish = free + held + down / rate + rtt
        now[0] = finish + 0.001
        r = FrameResult(seq, "f", torch.zeros(1, down // 4), "edge", "input", "jpeg40", 3, worker="e:1",
                        wire_bytes=up, sent_at=sent if correct else 0.0,
                        times={"transfer_edge": finish - sent, "edge_held": held, "total": finish - sent + 0.001})
        est.observe(r)
        frames.append(r)
        waits.append(start - sent)
    return est, frames, waits


def test_a_frames_wait_behind_the_one_ahead_on_the_link_is_not_taken_for_a_slower_link():
    """A frame sent while the bytes ahead of it were still on the link waited for them: that wait is the link's
    queue, not its rate. Taken for the rate, the estimate fell from 12.0 to 9.5 KB/s in the dynamic trace while the
    link carried 12.5 (runtime.agent.telemetry)."""
    est, _, waits = _overfull_link(14)
    assert waits[-1] == pytest.approx(13 * 0.032)
    assert est.bandwidth_bytes_per_second == pytest.approx(12_500, rel=0.01)
    naive, _, _ = _overfull_link(14, correct=False)  # frames with no send time: their wait counts as transfer
    assert naive.bandwidth_bytes_per_second < 11_500


def test_a_result_line_holds_the_frames_own_wait_behind_the_one_ahead_on_the_link():
    """Lindley's recursion on the link (runtime.agent.prediction.History.send): each frame's wait from the frame
    sent before it, its wait and its bytes at the bandwidth known then; one expected wait for every frame (the
    drop-limited one of a link busy over 100 % of the time) priced the same 0 to 0.4 s as 0.57 s and more."""
    est, frames, waits = _overfull_link(14)
    p = Prediction.of(plan_1mbit())
    assert est.history.link_wait(1) is None  # the link not measured yet when it was sent
    for r, wait in zip(frames[2:], waits[2:], strict=True):
        assert est.history.link_wait(r.seq) == pytest.approx(wait, abs=0.002)
    first, last = line(p, est, frames[2]), line(p, est, frames[-1])
    assert last - first == pytest.approx(waits[-1] - waits[2], abs=0.003)
    # a frame with no known frame ahead on its link (the first, another link's) gets the expected wait
    assert est.history.link_wait(0) is None and est.history.send(99, "e:2", 500.0, 12_900, 12_500.0) == 0.0
    bw = est.links.get("e:1").bandwidth.value
    assert p.now(est.links.get("e:1"), 12_900, frame_bytes=12_900, interval=1.0, window=2) == pytest.approx(
        p.now(est.links.get("e:1"), 12_900, frame_bytes=12_900, link_wait=expected_wait(12_900 / bw, 1.0, est.links.get("e:1").jitter, window=2).seconds))
