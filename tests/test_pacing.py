"""A source paced as a camera (--fps, runtime.agent.pacing) and each result's predicted latency."""

from __future__ import annotations

import asyncio
import io
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, TINY_NET

from runtime.agent.client import FrameResult
from runtime.agent.config import AgentConfig
from runtime.agent.metrics import AgentMetrics
from runtime.agent.pacing import Pacer
from runtime.agent.planner_link import PlannerLink
from runtime.agent.run import _stream_source
from runtime.agent.telemetry import LinkEstimator
from runtime.models.loader import load_model
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb

pytestmark = pytest.mark.timeout(60)


def test_the_pacer_gives_arrival_times_and_never_waits_for_a_late_frame():
    now = [10.0]
    p = Pacer(4.0, lambda: now[0])
    assert p.period == 0.25 and p.wait() == 0.0  # the first frame arrives at once
    now[0] = 10.1
    assert p.wait() == pytest.approx(0.15)
    now[0] = 11.0  # behind: frames 2 and 3 were due at 10.5 and 10.75
    assert p.wait() == 0.0 and p.wait() == 0.0 and p.arrived == 4
    assert Pacer(0.0, lambda: 0.0).period == 0.0


class SlowAgent:
    """Its first frame takes 0.4 s; frames that arrive meanwhile (every 20 ms) find the window full."""

    def __init__(self, loaded):
        self.loaded = loaded
        self.metrics = AgentMetrics()
        self.link = LinkEstimator(self.metrics)  # the run loop sets its workload (frame interval, window) there
        self.calls = 0

    async def infer(self, x, name=""):
        self.calls += 1
        await asyncio.sleep(0.4 if self.calls == 1 else 0.0)
        return FrameResult(self.calls - 1, name, torch.zeros(1, 10), "local", "output", "raw", 1)


def test_frames_that_arrive_while_the_agent_is_behind_are_dropped_and_counted():
    loaded = load_model(str(REPO / TINY_NET))
    agent = SlowAgent(loaded)
    config = AgentConfig(source="synthetic", frames=12, window=1, fps=50.0, summary=False)
    sink = io.StringIO()
    results = asyncio.run(_stream_source(agent, config, sink, lambda r, labels: r.frame))
    dropped = agent.metrics.registry.get_sample_value("edgesplit_agent_dropped_frames_total")
    assert len(results) + dropped == 12  # every frame that arrived: one result or counted as dropped
    assert dropped >= 6  # ~20 arrivals were due during the first frame's 0.4 s
    assert sink.getvalue().count("\n") == len(results)


def test_result_lines_carry_the_plan_prediction():
    plan = ppb.Plan(version=3, split_id="conv2", worker_id="w1", worker_address="e:1", predicted_seconds=0.05)
    plan.fallbacks.append(ppb.BandPlan(plan=ppb.Plan(split_id="output", predicted_seconds=0.2)))
    plan.fallbacks.append(ppb.BandPlan(plan=ppb.Plan(split_id="conv2", worker_id="w1", worker_address="e:1",
                                                     predicted_seconds=0.09)))  # the plan's own config, another band
    link = SimpleNamespace(predictions=OrderedDict())
    PlannerLink._predict(link, plan)
    r = FrameResult(0, "f", torch.zeros(1, 10), "edge", "conv2", "raw", 3, worker="e:1")
    assert PlannerLink.predicted(link, r) == 0.05
    r.predicted_seconds = 0.05
    assert r.to_json(None)["predicted_ms"] == 50.0
    local = FrameResult(1, "f", torch.zeros(1, 10), "local", "output", "raw", 3)
    assert PlannerLink.predicted(link, local) == 0.2  # the fallback the agent took by itself
    assert PlannerLink.predicted(link, FrameResult(2, "f", torch.zeros(1, 10), "edge", "conv2", "raw", 9)) == 0.0
