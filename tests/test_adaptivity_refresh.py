"""A kept plan's prediction is re-issued when its model parts moved, the link terms left out (issue 11:
planner.refresh.drifted), and the board's overhead skips a configuration's first frames
(runtime.agent.telemetry)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from planner import refresh
from runtime.contracts.costmodel import Configuration, Hop, Stage
from runtime.contracts.profile import Transfer
from runtime.proto.edgesplit.v1 import planner_pb2 as pb


def issued(rtt: float = 0.020) -> pb.Plan:
    """Issued at 20 ms RTT, 10 KB in 10 ms: 60 ms predicted."""
    p = pb.Plan(version=3, split_id="input", worker_id="w1", predicted_seconds=0.060, predicted_bytes=10_000)
    p.breakdown_seconds.update({"compute:edge": 0.028, "encode:device->edge": 0.001, "rtt:device->edge": rtt,
                                "transfer:device->edge": 0.010, "decode:device->edge": 0.001})
    return p


def config(edge: float, rtt: float, transfer: float, size: int = 10_000) -> Configuration:
    hop = Hop("device", "board", "edge", "server", 0, "input", Transfer("jpeg", size, 0.001, 0.001, "jpeg"),
              0.001, rtt, transfer, 0.001, 0.0)
    stages = (Stage("device", "board", 0, 0, 0.0, 0.001), Stage("edge", "server", 0, 4, edge, edge + 0.001))
    return Configuration(edge + 0.002 + rtt + transfer, 10.0, stages, (hop,))


def test_a_lower_rtt_and_a_slower_model_do_not_cancel():
    """RTT 20 -> 5 ms and the worker 15 ms slower: the whole figure is the issued 60 ms, but the model's part
    moved by 25 %: stale (the agent's lines re-cost the link at 5 ms and would say 45 ms against 60 measured)."""
    now = config(edge=0.043, rtt=0.005, transfer=0.010)
    assert now.seconds == pytest.approx(0.060)
    assert refresh.drift(issued(), now) == pytest.approx(0.015)
    assert refresh.drifted(issued(), now)


def test_a_link_move_alone_is_not_stale():
    """The same model at another link (RTT 5 ms, half the bandwidth): nothing to re-issue."""
    now = config(edge=0.028, rtt=0.005, transfer=0.020)
    assert refresh.drift(issued(), now) == pytest.approx(0.0)
    assert not refresh.drifted(issued(), now)


def test_measured_bytes_are_the_links_part_not_the_models():
    """Twice the bytes (measured per frame) at 4x the bandwidth: a transfer term, which the agent's result lines
    re-cost with the frame's own bytes at the link now (runtime.agent.prediction), so no model part drifted."""
    now = config(edge=0.028, rtt=0.005, transfer=0.005, size=20_000)  # at 4x the bandwidth now
    assert refresh.drift(issued(), now) == pytest.approx(0.0)
    assert not refresh.drifted(issued(), now)


def test_due_uses_the_model_part():
    clock = [100.0]
    r = refresh.Refresh(hold_seconds=1.0, clock=lambda: clock[0])
    st = SimpleNamespace(record=SimpleNamespace(id="a1"), plan=issued(), speed=SimpleNamespace(samples=0),
                         tails=SimpleNamespace(speeds={"w1": SimpleNamespace(samples=2)}))
    now = config(edge=0.043, rtt=0.005, transfer=0.010)
    assert not r.due(st, "compute", now)  # stale from now on, not yet held
    clock[0] += 2.0
    assert r.due(st, "compute", now)
    assert not r.due(st, "telemetry", now)  # a link cause alone re-issues nothing


def test_a_local_frames_board_queue_is_part_of_the_local_configuration():
    """A saturated board (the camera's rate at the board's speed): the board_queue median under a local plan is
    added to the local configuration (planner.compute.Overhead 'queue'); under an offloading plan it is not."""
    from planner import compute, measured
    from runtime.contracts.profile import Block, Profile

    local, offload = pb.Plan(version=4, split_id="output"), pb.Plan(version=5, split_id="input", worker_id="w1")
    stages = {"board_queue": 0.040, "head": 0.240}
    assert measured.queue_sample(stages, local) == pytest.approx(0.040)
    assert measured.queue_sample(stages, offload) is None and measured.queue_sample(stages, None) is None
    o = compute.Overhead()
    assert o.observe({"overhead_queue": 0.040, "overhead_local": 0.005})
    o.apply()
    prof = Profile("board", "device", "m", (Block(0, "a", 0.1, 100), Block(1, "b", 0.1, 10)), 1000)
    out = compute.with_overhead(prof, o.applied)
    assert out.blocks[-1].seconds == pytest.approx(0.145) and out.blocks[0].seconds == pytest.approx(0.1)
