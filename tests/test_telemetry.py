"""The agent's link estimates (runtime.agent.telemetry.LinkEstimator), on synthetic frame timings."""

from __future__ import annotations

import pytest
import torch

from runtime.agent.client import FrameResult
from runtime.agent.telemetry import LinkEstimator

RATE = 62_500.0  # bytes/s: 0.5 Mbit/s
BASE_RTT = 0.004
FRAME_BYTES = 32768


def _frame(seq: int, transfer_edge: float, wire_bytes: int = FRAME_BYTES) -> FrameResult:
    return FrameResult(seq, f"f{seq}", torch.empty(0), "edge", "stem", "raw", 1, wire_bytes=wire_bytes,
                       times={"transfer_edge": transfer_edge, "edge_queue": 0.0, "edge_decode": 0.0, "edge_tail": 0.0})


def test_saturated_link_bandwidth_is_not_inflated_by_probe_queueing():
    """Frames back to back on a slow link: each takes bytes / rate plus one base RTT, and an RTT
    probe sent meanwhile waits behind what is left of the frame being sent. Subtracting that
    (queueing included) from the transfer time made the link look ~2x faster on average and
    unboundedly faster on some frames; the estimate must stay near the real rate."""
    link = LinkEstimator()
    seconds = FRAME_BYTES / RATE
    link.add_rtt_sample(BASE_RTT)  # one probe on the idle link
    for i in range(40):
        waited = seconds * ((0.37 * i) % 1.0)  # how much of the frame was still in the queue
        link.add_rtt_sample(BASE_RTT + waited, queued=True)  # frames in flight: queued behind them
        link.observe(_frame(i, seconds + BASE_RTT))
    assert link.bandwidth_bytes_per_second == pytest.approx(RATE, rel=0.15)
    assert link.rtt_seconds < BASE_RTT + 0.15 * seconds  # the base RTT, not the queueing


def test_rtt_is_the_smallest_recent_probe_and_follows_a_lasting_change():
    link = LinkEstimator(rtt_window=4)
    assert link.rtt_seconds == 0.0  # unknown
    for rtt in (0.010, 0.030, 0.012, 0.050):
        link.add_rtt_sample(rtt)
    assert link.rtt_seconds == 0.010
    for _ in range(4):  # the path got longer: after a window of probes the estimate follows
        link.add_rtt_sample(0.040)
    assert link.rtt_seconds == 0.040


def test_stage_samples_are_reported_under_the_plan_they_ran_under_only():
    """The planner reads a report's head against the plan its version names: a frame of the plan before (observed
    before the switch, or finishing after it) gives no stage sample under the next one."""
    import torch

    from runtime.agent.frame import FrameResult

    def frame(seq: int, head: float) -> FrameResult:
        r = FrameResult(seq, "f", torch.empty(0), "local", "maxpool", "raw")
        r.times = {"head": head, "total": head}
        return r

    link = LinkEstimator()
    link.observe(frame(0, 0.308), 0, 0)  # under the agent's own split, before the planner's first plan
    stages, frames = link.take_report(1)  # reported once plan 1 is in force: its head is not plan 1's
    assert "head" not in stages and frames == 1
    link.observe(frame(1, 2.9), 1, 1)
    link.observe(frame(2, 0.3), 0, 1)  # an older plan's frame finishing after the switch
    assert link.take_report(1)[0]["head"] == 2.9
    link.observe(frame(3, 2.5), 1, 1)
    link.observe(frame(4, 0.1), 2, 2)  # plan 2 now: plan 1's samples go
    assert link.take_report(2)[0]["head"] == 0.1
    link.observe(frame(5, 0.4))  # no plan named (tests, the parallel path): kept
    assert link.take_report()[0]["head"] == 0.4


def test_small_frames_and_local_frames_give_no_bandwidth_sample():
    link = LinkEstimator()
    link.add_rtt_sample(BASE_RTT)
    link.observe(_frame(0, 0.010, wire_bytes=64))
    local = _frame(1, 0.010)
    local.where = "local"
    link.observe(local)
    assert link.bandwidth_bytes_per_second == 0.0
    link.observe(_frame(2, BASE_RTT + FRAME_BYTES / RATE))
    assert link.bandwidth_bytes_per_second == pytest.approx(RATE)
    assert link.take_report()[1] == 3 and link.take_report() == ({}, 0)


def test_bytes_per_frame_and_encode_time_are_reported_per_split_and_codec():
    """runtime.agent.wirebytes: what the planner prices transfers with (Telemetry.wire)."""
    from runtime.agent.telemetry_report import wire_reports

    now = [100.0]
    est = LinkEstimator(clock=lambda: now[0])
    for i, (b, enc) in enumerate(((10_000, 0.010), (20_000, 0.030), (20_000, 0.008))):
        f = _frame(i, 0.05, wire_bytes=b)
        f.times["encode"] = enc
        est.observe(f)
    local = FrameResult(9, "f9", torch.empty(0), "local", "output", "raw", 1, times={"head": 0.2})
    est.observe(local)  # a local frame sends nothing
    jpeg = FrameResult(10, "f10", torch.empty(0), "edge", "input", "jpeg40", 1, wire_bytes=12_900, times={"encode": 0.009})
    est.observe(jpeg)
    now[0] = 102.0
    reports = {(w.split_id, w.codec): w for w in wire_reports(est)}
    assert set(reports) == {("stem", "raw"), ("input", "jpeg40")}
    stem = reports[("stem", "raw")]
    assert stem.mean_bytes == pytest.approx(0.3 * 20_000 + 0.7 * (0.3 * 20_000 + 0.7 * 10_000))  # EWMA, first sets it
    assert (stem.samples, stem.encode_seconds, stem.age_seconds) == (3, pytest.approx(0.010), pytest.approx(2.0))
    assert (reports[("input", "jpeg40")].mean_bytes, reports[("input", "jpeg40")].samples) == (12_900, 1)
    now[0] = 102.0 + 301.0  # older than the table's max age: not reported
    assert wire_reports(est) == []


def test_runtime_overhead_is_the_frames_time_outside_its_timed_stages():
    from runtime.agent.telemetry import runtime_overhead

    est = LinkEstimator()
    est.overhead_warmup = 0  # every frame counts here (the warm-up: the next test)
    local = FrameResult(1, "f", torch.empty(0), "local", "output", "raw", 1,
                        times={"board_queue": 0.001, "head": 0.200, "encode": 0.0, "local_tail": 0.0, "total": 0.231})
    edge = _frame(2, 0.05)
    edge.times.update(head=0.0, encode=0.002, total=0.0535)
    fallback = FrameResult(3, "f", torch.empty(0), "local", "stem", "raw", 1, fallback_reason="deadline",
                           times={"head": 0.01, "local_tail": 0.1, "total": 2.2})
    assert runtime_overhead(local) == pytest.approx(0.030)
    assert runtime_overhead(edge) == pytest.approx(0.0015)
    assert runtime_overhead(fallback) is None  # its plan sent it: the wait is no runtime overhead
    for r in (local, edge, fallback):
        est.observe(r)
    medians, frames = est.take_report()
    assert (medians["overhead_local"], medians["overhead_edge"], frames) == (pytest.approx(0.030), pytest.approx(0.0015), 3)


def test_a_configurations_first_frames_give_no_overhead_sample():
    """After start-up and after each switch, the first OVERHEAD_WARMUP frames of a configuration carry one-off
    costs (111 ms against 8 ms after, in an adapt_run record): a short first report must not set the figure."""
    from runtime.agent.telemetry import OVERHEAD_WARMUP

    est = LinkEstimator()

    def local(seq: int, other: float) -> FrameResult:
        return FrameResult(seq, "f", torch.empty(0), "local", "output", "raw", 1,
                           times={"head": 0.200, "total": 0.200 + other})

    for i in range(OVERHEAD_WARMUP):
        est.observe(local(i, 0.100))
    est.observe(local(10, 0.008))
    medians, frames = est.take_report()
    assert medians["overhead_local"] == pytest.approx(0.008) and frames == OVERHEAD_WARMUP + 1
    edge = _frame(20, 0.05)
    edge.times.update(head=0.0, encode=0.002, total=0.0535)
    est.observe(edge)  # a switch: the local configuration's first frames are skipped again
    for i in range(OVERHEAD_WARMUP):
        est.observe(local(30 + i, 0.100))
    medians, _ = est.take_report()
    assert "overhead_local" not in medians and "overhead_edge" not in medians


def test_the_results_way_back_counts_in_the_bandwidth_sample():
    """15 KB up and 4 KB of logits back over 125 KB/s take 152 ms beyond the RTT: the link is 125 KB/s, not 99."""
    est = LinkEstimator()
    est.add_rtt_sample(0.010)
    r = FrameResult(0, "f", torch.zeros(1, 1000), "edge", "input", "jpeg", 1, wire_bytes=15_000,
                    times={"transfer_edge": 0.010 + 19_000 / 125_000, "edge_held": 0.0})
    est.observe(r)
    assert est.bandwidth_bytes_per_second == pytest.approx(125_000)
