"""The agent's own switches from its plan's fallback table (runtime.agent.fallbacks), on a fake agent."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from runtime.agent.fallbacks import FallbackSwitcher
from runtime.agent.metrics import AgentMetrics
from runtime.contracts.errors import PreconditionFailed
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb

pytestmark = pytest.mark.timeout(30)

W = "edge:50051"
MB = 1e6


class FakeAgent:
    """What the switcher reads (active config, plan version, metrics) and calls (apply_plan)."""

    def __init__(self, split: str, worker: str, version: int = 4):
        self.metrics = AgentMetrics()
        self.plan_version = version
        self.codec = "raw"
        self.calls: list[tuple] = []
        self.refuse = False
        self._set(split, worker)

    def _set(self, split: str, worker: str) -> None:
        self.active = SimpleNamespace(split=SimpleNamespace(name=split), worker=worker,
                                      codec=SimpleNamespace(name="raw"))

    async def apply_plan(self, split, codec, tl, version, worker_address, *, model_id="", fallback=False):
        self.calls.append((split, worker_address, version, fallback))
        if self.refuse:
            raise PreconditionFailed("stale plan")
        self._set(split, worker_address)


def _plan() -> ppb.Plan:
    """local below 1 MB/s, conv4 on W in [1, 8) MB/s, conv2 on W above."""
    plan = ppb.Plan(version=4, model_id="m", split_id="conv2", worker_address=W, codec="raw", band_worker_address=W)
    for lo, hi, split, worker in ((0, 1 * MB, "output", ""), (1 * MB, 8 * MB, "conv4", W), (8 * MB, 0, "conv2", W)):
        plan.fallbacks.append(ppb.BandPlan(min_bandwidth_bytes_per_second=lo, max_bandwidth_bytes_per_second=hi,
                                           plan=ppb.Plan(split_id=split, worker_address=worker,
                                                         codec="raw" if worker else "")))
    return plan


async def _estimates(sw: FallbackSwitcher, *figures: tuple[str, float]) -> None:
    for key, bw in figures:
        sw.on_estimate(key, bw)
        await asyncio.sleep(0)
        if sw._task is not None:
            await sw._task


def test_a_collapse_and_a_recovery_switch_by_band():
    agent = FakeAgent("conv2", W)
    sw = FallbackSwitcher(agent)
    sw.set_plan(_plan())

    async def scenario():
        await _estimates(sw, (W, 12 * MB), (W, 7 * MB))  # in band, then just past its edge (within the margin)
        assert agent.calls == []
        await _estimates(sw, (W, 0.1 * MB))  # collapsed
        assert agent.calls == [("output", "", 4, True)]
        await _estimates(sw, (W, 0.9 * MB), (W, 1.2 * MB))  # jitter around the local band's edge: stay
        assert len(agent.calls) == 1
        await _estimates(sw, (W, 20 * MB))  # back: under the local plan only probes measure the link, so ...
        assert len(agent.calls) == 1
        await _estimates(sw, (W, 20 * MB))  # ... a second figure confirms it: straight to the fast band's plan
        assert agent.calls[-1] == ("conv2", W, 4, True)

    asyncio.run(scenario())
    reg = agent.metrics.registry
    assert reg.get_sample_value("edgesplit_agent_band_switches_total", {"direction": "down"}) == 1
    assert reg.get_sample_value("edgesplit_agent_band_switches_total", {"direction": "up"}) == 1


def test_other_links_newer_plans_and_refusals_take_no_switch():
    agent = FakeAgent("conv2", W)
    sw = FallbackSwitcher(agent)

    async def scenario():
        await _estimates(sw, (W, 0.1 * MB))  # no plan yet
        sw.set_plan(_plan())
        await _estimates(sw, ("other:1", 0.1 * MB))  # not the table's link
        agent.plan_version = 5  # the planner's newer plan is in effect: its own table will come
        await _estimates(sw, (W, 0.1 * MB))
        assert agent.calls == []
        agent.plan_version = 4
        agent.refuse = True
        await _estimates(sw, (W, 0.1 * MB))  # refused (e.g. a newer plan won the race): logged, nothing counted
        assert len(agent.calls) == 1

    asyncio.run(scenario())
    assert agent.metrics.registry.get_sample_value("edgesplit_agent_band_switches_total", {"direction": "down"}) in (None, 0)


def test_an_upper_bound_below_the_band_switches_at_once():
    """A censored bound (deadline, confirmed late frame) under the running band's floor is proof: no
    margin, no second sample; a bound inside the band, or of another link, is not."""
    from runtime.agent.telemetry import LinkEstimator

    agent = FakeAgent("conv2", W)
    agent.link = LinkEstimator()
    sw = FallbackSwitcher(agent)
    sw.set_plan(_plan())
    assert sw.on_bound in agent.link.bound_listeners

    async def scenario():
        for key, bound in ((W, 9 * MB), ("other:1", 0.1 * MB)):
            sw.on_bound(key, bound)
        assert agent.calls == [] and sw._task is None
        for _ in range(3):
            agent.link.add_bandwidth_sample(10 * MB, W)
        agent.link.observe_upper_bound(W, 7.5 * MB)  # within the estimator's drift, but under the band's 8 MB/s floor
        await sw._task
        assert agent.calls == [("conv4", W, 4, True)]
        await sw.close()
        assert sw.on_bound not in agent.link.bound_listeners

    asyncio.run(scenario())


def test_a_proven_collapse_gives_up_the_frames_waiting_on_the_old_link():
    """After a switch on an upper bound to a configuration without the old stream, the frames still waiting
    on it are given up (they run on the board and free the window); an estimate-driven switch keeps them."""
    from runtime.agent.telemetry import LinkEstimator

    class Stream:
        address = W

        def __init__(self):
            self.given_up: list[str] = []

        def give_up(self, reason: str) -> int:
            self.given_up.append(reason)
            return 2

    for proof in (True, False):
        agent = FakeAgent("conv2", W)
        agent.link = LinkEstimator()
        stream = agent.active.stream = Stream()
        sw = FallbackSwitcher(agent)
        sw.set_plan(_plan())

        async def scenario(sw: FallbackSwitcher, proof: bool) -> None:
            if proof:
                sw.on_bound(W, 0.1 * MB)
            else:
                sw.on_estimate(W, 0.1 * MB)
            await sw._task

        asyncio.run(scenario(sw, proof))
        assert agent.calls == [("output", "", 4, True)]
        assert len(stream.given_up) == (1 if proof else 0)
