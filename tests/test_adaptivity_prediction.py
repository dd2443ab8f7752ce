"""A kept plan's prediction follows the link (issue 11 (c)): result lines carry the plan's prediction
re-costed at the link the agent measures now (runtime.agent.prediction), without a new plan version."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch

from runtime.agent.client import FrameResult
from runtime.agent.planner_link import PlannerLink
from runtime.agent.prediction import Prediction
from runtime.agent.telemetry import LinkEstimator
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb


def plan(**kw) -> ppb.Plan:
    p = ppb.Plan(version=4, split_id="input", worker_id="w1", worker_address="e:1", predicted_seconds=0.100,
                 predicted_bytes=250_000, **kw)
    p.breakdown_seconds.update({"compute:edge": 0.070, "encode:device->edge": 0.002, "rtt:device->edge": 0.005,
                                "transfer:device->edge": 0.020, "return:device->edge": 0.001, "decode:device->edge": 0.002})
    return p


def test_a_kept_plan_is_re_costed_at_the_link_measured_now():
    est = LinkEstimator(clock=lambda: 10.0)
    link = SimpleNamespace(predictions=OrderedDict(), agent=SimpleNamespace(link=est))
    PlannerLink._predict(link, plan())
    r = FrameResult(0, "f", torch.zeros(1, 10), "edge", "input", "jpeg40", 4, worker="e:1")
    assert PlannerLink.predicted(link, r) == pytest.approx(0.100)  # link unmeasured: as issued
    est.add_bandwidth_sample(1_250_000.0, "e:1")  # 12.5 MB/s when issued (250 KB in 20 ms), 1.25 MB/s now
    est.add_rtt_sample(0.010, "e:1")
    # 100 - (5 + 20 + 1) + 10 + 250 KB / 1.25 MB/s + 1 ms x 10
    assert PlannerLink.predicted(link, r) == pytest.approx(0.100 - 0.026 + 0.010 + 0.200 + 0.010)


def test_plans_without_one_measured_link_keep_their_issued_prediction():
    est = LinkEstimator(clock=lambda: 10.0)
    est.add_bandwidth_sample(1_000.0, "e:1")
    lk = est.estimate("e:1")
    local = ppb.Plan(version=4, split_id="output", predicted_seconds=0.3)
    assert Prediction.of(local).now(lk) == 0.3
    chained = plan()
    chained.next_hops.add(worker_id="w2", address="c:1")
    assert Prediction.of(chained).now(lk) == pytest.approx(0.100)
    no_bytes = plan()
    no_bytes.predicted_bytes = 0
    assert Prediction.of(no_bytes).now(lk) == pytest.approx(0.100)
    assert Prediction.of(plan()).now(None) == pytest.approx(0.100)


def test_a_fallback_entry_is_re_costed_with_the_bytes_the_agent_measured():
    """Band entries carry no bytes (planner.fallbacks.lean): the agent's own figure for the split and codec stands in."""
    est = LinkEstimator(clock=lambda: 10.0)
    link = SimpleNamespace(predictions=OrderedDict(), agent=SimpleNamespace(link=est))
    running = ppb.Plan(version=5, split_id="output", predicted_seconds=0.2)
    entry = plan()
    entry.predicted_bytes = 0
    running.fallbacks.append(ppb.BandPlan(min_bandwidth_bytes_per_second=30_000, plan=entry))
    PlannerLink._predict(link, running)
    r = FrameResult(0, "f", torch.zeros(1, 10), "edge", "input", "jpeg40", 5, worker="e:1", wire_bytes=250_000,
                    times={"transfer_edge": 0.5, "encode": 0.002})
    est.add_bandwidth_sample(1_250_000.0, "e:1")
    est.add_rtt_sample(0.005, "e:1")
    assert PlannerLink.predicted(link, r) == pytest.approx(0.100)  # nothing measured for input/jpeg40 yet
    est.wire.observe(r)
    assert PlannerLink.predicted(link, r) == pytest.approx(0.100 - 0.026 + 0.005 + 0.200 + 0.010)
