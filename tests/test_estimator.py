"""Link estimates that never go blind (runtime.agent.estimator, runtime.agent.telemetry): censored
samples, ageing, steps against jitter, and links that were never measured."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from runtime.agent.client import FrameResult
from runtime.agent.estimator import EstimatorOptions, LinkEstimate, LinkTable, StepDetector
from runtime.agent.telemetry import LinkEstimator

pytestmark = pytest.mark.timeout(30)

FAST = 50e6 / 8  # bytes/s: 50 Mbit/s
SLOW = 1e6 / 8  # 1 Mbit/s


def _steps_until_detected(est: LinkEstimate, value: float, now: float, limit: int = 20) -> int:
    before = est.steps
    for i in range(1, limit + 1):
        est.add_bandwidth(value, now + i)
        if est.steps > before:
            return i
    return -1


def test_a_step_down_and_up_shows_within_three_samples():
    est = LinkEstimate()
    for i in range(10):
        est.add_bandwidth(FAST, float(i))
    assert _steps_until_detected(est, SLOW, 10.0) <= 3
    assert est.bandwidth.value == pytest.approx(SLOW, rel=0.01)  # jumped to the new level, not 30 % of the way
    assert _steps_until_detected(est, FAST, 30.0) <= 3
    assert est.bandwidth.value == pytest.approx(FAST, rel=0.01)
    est2 = LinkEstimate()
    for i in range(10):
        est2.add_bandwidth(FAST, float(i))
    assert _steps_until_detected(est2, FAST / 2, 10.0) <= 3  # a 2x step too


def test_jitter_of_twenty_percent_is_never_a_step():
    rng = random.Random(11)
    est = LinkEstimate()
    for i in range(2000):
        est.add_bandwidth(FAST * rng.uniform(0.8, 1.2), i * 0.1)
    assert est.steps == 0
    assert est.bandwidth.value == pytest.approx(FAST, rel=0.2)


def test_one_outlier_is_not_a_step_but_two_in_a_row_are():
    det = StepDetector(EstimatorOptions())
    assert det.add(SLOW, FAST) is None  # min_run = 2
    assert det.add(FAST, FAST) is None  # back to normal: the run ends
    assert det.add(SLOW, FAST) is None
    assert det.add(SLOW, FAST) == [SLOW, SLOW]


def test_a_censored_frame_far_below_the_estimate_is_a_step_at_once():
    """A frame of 64 KiB with no result after 2 s: the link carries < 32 KiB/s, whatever the estimate said."""
    est = LinkEstimate()
    est.add_rtt(0.01, 0.0)
    for i in range(5):
        est.add_bandwidth(FAST, float(i))
    bound = 65536 / (2.0 - 0.01)
    assert est.add_censored(65536, 2.0, 5.0)
    assert est.bandwidth.value == pytest.approx(bound) and est.steps == 1 and est.bandwidth.samples == 6


def test_a_censored_frame_somewhat_below_the_estimate_is_a_sample():
    est = LinkEstimate()
    est.add_rtt(0.01, 0.0)
    for i in range(5):
        est.add_bandwidth(FAST, float(i))
    elapsed = 0.01 + 65536 / (FAST / 2)  # bound: half the estimate (within censored_step)
    assert est.add_censored(65536, elapsed, 5.0)
    assert FAST / 2 < est.bandwidth.value < FAST and est.steps == 0
    assert est.add_censored(65536, elapsed, 6.0)  # the second in a row: the step detector's step
    assert est.bandwidth.value == pytest.approx(FAST / 2, rel=0.01) and est.steps == 1


def test_a_censored_bound_above_the_estimate_says_nothing_new():
    est = LinkEstimate()
    est.add_bandwidth(SLOW, 0.0)
    assert not est.add_censored(10 * 2**20, 2.0, 1.0)  # < 5 MB/s: known already
    assert est.bandwidth.value == SLOW and est.censored == 1 and est.bandwidth.samples == 1
    assert not est.add_censored(0, 2.0, 1.0) and not est.add_censored(100, 0.0, 1.0)  # no bytes, no time


def test_a_censored_frame_on_an_unmeasured_link_is_its_first_figure():
    est = LinkEstimate()
    assert est.add_censored(20_000, 2.0, 0.0)
    assert est.bandwidth.value == pytest.approx(10_000) and est.bandwidth.samples == 1


def test_old_estimates_lose_weight():
    fresh, old = LinkEstimate(), LinkEstimate()
    fresh.add_bandwidth(FAST, 0.0)
    old.add_bandwidth(FAST, 0.0)
    fresh.add_bandwidth(FAST * 1.2, 0.1)  # within the drift: the EWMA, not the step detector
    old.add_bandwidth(FAST * 1.2, 60.0)  # six half-lives later
    assert fresh.bandwidth.value == pytest.approx(FAST * (1 + 0.2 * 0.3), rel=0.01)
    assert old.bandwidth.value > FAST * 1.19
    assert old.bandwidth.age(70.0) == pytest.approx(10.0)


def test_rtt_rise_is_seen_from_idle_probes_and_queued_probes_never_raise_it():
    link = LinkEstimator()
    link.use("w1")
    for _ in range(4):
        link.add_rtt_sample(0.010)
    for _ in range(5):  # queued behind frames: can only lower the base
        link.add_rtt_sample(0.300, queued=True)
    assert link.rtt_seconds == 0.010
    link.add_rtt_sample(0.060)
    link.add_rtt_sample(0.061)  # the second idle probe in a row: the path got longer
    assert link.rtt_seconds == pytest.approx(0.060)
    link.add_rtt_sample(0.005, queued=True)  # a shorter path shows at once
    assert link.rtt_seconds == 0.005


def _edge_frame(worker: str, seconds: float, nbytes: int = 65536) -> FrameResult:
    return FrameResult(0, "f", torch.empty(0), "edge", "s", "raw", 1, wire_bytes=nbytes, worker=worker,
                       times={"transfer_edge": seconds})


def test_unknown_links_stay_unknown_and_links_are_kept_apart():
    link = LinkEstimator()
    link.use("a:1")
    link.observe(_edge_frame("a:1", 65536 / SLOW))
    assert link.bandwidth_bytes_per_second == pytest.approx(SLOW)
    link.use("b:2")  # a new worker: unknown, not a's figure and not a default
    assert link.bandwidth_bytes_per_second == 0.0 and link.rtt_seconds == 0.0
    assert link.estimate("b:2").bandwidth.samples == 0
    assert link.estimate("a:1").bandwidth.samples == 1
    assert link.observe_censored("b:2", 65536, 2.0)
    assert link.bandwidth_bytes_per_second == pytest.approx(65536 / 2.0)


def test_the_link_table_is_bounded_and_names_the_freshest():
    table = LinkTable(EstimatorOptions(max_links=2))
    assert table.freshest(0.0) is None  # nothing measured
    table.link("a").add_bandwidth(1.0, 1.0)
    table.link("b").add_bandwidth(2.0, 2.0)
    table.link("c")  # unmeasured: held, never the freshest
    assert "a" not in table and "b" in table and "c" in table
    key, est = table.freshest(3.0)
    assert key == "b" and est.bandwidth.value == 2.0


def test_options_are_checked():
    for bad in ({"alpha": 0.0}, {"half_life_seconds": 0.0}, {"threshold": 0.0}, {"min_run": 0}, {"max_links": 0}):
        with pytest.raises(ValueError):
            EstimatorOptions(**bad)


def test_every_link_is_a_metric_with_its_age_and_samples():
    from runtime.agent.metrics import AgentMetrics

    now = [0.0]
    metrics = AgentMetrics()
    link = LinkEstimator(metrics, clock=lambda: now[0])
    link.add_bandwidth_sample(SLOW, "a:1")
    now[0] = 1.0
    link.add_bandwidth_sample(SLOW, "a:1")
    now[0] = 5.0
    get = metrics.registry.get_sample_value
    assert get("edgesplit_agent_link_estimate_bandwidth_bytes_per_second", {"link": "a:1"}) == pytest.approx(SLOW)
    assert get("edgesplit_agent_link_estimate_samples", {"link": "a:1"}) == 2
    assert get("edgesplit_agent_link_estimate_age_seconds", {"link": "a:1"}) == pytest.approx(4.0)


def test_frames_late_far_beyond_the_estimate_show_a_collapse_before_their_deadline():
    from runtime.agent.inflight import InFlight

    async def scenario():
        link = LinkEstimator()
        for _ in range(3):
            link.add_bandwidth_sample(FAST, "w:1")
        flight = InFlight(link, late_factor=8.0, min_late_seconds=0.1)
        flight.sent("w:1", 1, 150_000)  # 24 ms at FAST
        flight.sent("w:1", 2, 150_000)
        assert flight.bytes("w:1") == 300_000
        await asyncio.sleep(1.0)  # the watcher looks every 50 ms: both frames end up > 8x late
        await flight.close()
        est = link.estimate("w:1")
        return flight.late, est.bandwidth.value, est.steps

    late, bw, steps = asyncio.run(scenario())
    assert late == 2 and steps == 1  # two late frames in a row: a step, long before a 2 s deadline
    assert bw < FAST / 8


def test_a_frame_answered_in_time_is_no_evidence():
    from runtime.agent.inflight import InFlight

    link = LinkEstimator()
    link.add_bandwidth_sample(FAST, "w:1")
    flight = InFlight(link)
    flight._frames["w:1"][1] = [0.0, 150_000, False]  # sent at t=0 (no watcher: looked at by hand)
    assert flight.look(0.05) == 0  # 50 ms: within 8x of the expected 24 ms
    flight.done("w:1", 1, 0)
    assert flight.look(10.0) == 0 and link.estimate("w:1").bandwidth.value == FAST


def test_a_starved_worker_is_not_taken_for_a_slow_link():
    """The worker's recent hold (edge_held, from its receive/send times) is part of what a frame is
    expected to take: a frame late only by the worker's compute is no bandwidth evidence."""
    from runtime.agent.inflight import InFlight

    link = LinkEstimator()
    link.add_bandwidth_sample(FAST, "w:1")
    flight = InFlight(link)
    for held in (0.4, 0.05, 0.1):  # the worker held recent frames up to 400 ms (CPU starved)
        flight.note_hold("w:1", held)
    assert flight.hold("w:1") == 0.4
    flight._frames["w:1"][1] = [0.0, 150_000, False]
    assert flight.look(0.5) == 0 and link.estimate("w:1").bandwidth.value == FAST
    for _ in range(4):  # four quick answers since: the old hold is forgotten
        flight.note_hold("w:1", 0.0)
    assert flight.look(0.5) == 1 and link.estimate("w:1").bandwidth.value < FAST


def test_a_late_frame_without_a_prober_counts_only_when_very_late():
    link = LinkEstimator()
    link.add_bandwidth_sample(FAST, "w:1")
    assert not link.observe_late("w:1", SLOW, 3.5)  # 3.5x late, nothing to check it with: look again later
    assert link.estimate("w:1").bandwidth.samples == 1
    assert link.observe_late("w:1", SLOW, 9.0)  # 8x and more: an ordinary sample
    assert link.estimate("w:1").bandwidth.samples == 2
    checked: list[tuple[str, float]] = []
    link.confirm = lambda key, bound: checked.append((key, bound))
    assert link.observe_late("w:1", SLOW, 3.5) and checked == [("w:1", SLOW)]  # a prober checks it first


def test_upper_and_lower_bounds():
    est = LinkEstimate()
    for i in range(3):
        est.add_bandwidth(FAST, float(i))
    assert not est.add_upper_bound(2 * FAST, 3.0) and est.censored == 1  # above: nothing new
    assert not est.add_lower_bound(FAST / 10, 3.0)  # below: nothing new
    assert est.add_upper_bound(FAST / 10, 3.0) and est.steps == 1 and est.bandwidth.value == FAST / 10
    assert est.add_lower_bound(FAST / 5, 4.0) and est.bandwidth.value > FAST / 10


def test_a_lower_bound_far_above_the_estimate_is_a_step_up_at_once():
    """After 0.1 -> 50 Mbit/s a 1 KiB probe bounds the link at ~90 KB/s from below: the estimate of 12.5 KB/s
    cannot stand, so it goes there at once (the agent's band switch sees it), as an upper bound far below does."""
    slow = 0.1e6 / 8
    est = LinkEstimate()
    for i in range(5):
        est.add_bandwidth(slow, float(i))
    assert est.add_lower_bound(2 * slow, 5.0) and slow < est.bandwidth.value < 2 * slow  # near: an ordinary sample
    before = est.bandwidth.value
    assert est.add_lower_bound(90_000.0, 6.0) and est.bandwidth.value == 90_000.0 and est.steps == 1
    assert not est.add_lower_bound(80_000.0, 6.5) and est.bandwidth.value == 90_000.0
    assert before < est.bandwidth.value
