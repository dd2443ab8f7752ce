"""Adaptivity end to end (issue 11): a real planner, worker and agent on loopback, the agent's link
through the project's relay (runtime.tools.netem) stepping 50 Mbit/s -> 1 Mbit/s -> 50 Mbit/s.

Asserted is the order of events, with generous time bounds: an offloading plan on the fast link
(measured by probes first: an unmeasured link is never offloaded to), a plan fit for the slow link
after the drop (here: local), an offloading plan again after the rise; every frame exactly one
result, none duplicated. The figures themselves (how long each switch took) are printed, and
measured properly by the recorded run, not asserted here.

Profiles are hand-made so the best plan flips with the link: the board runs a block in 4 ms (36 ms
for the model), the edge in 0.5 ms; the relay adds 5 ms each way. At 50 Mbit/s sending the 48 KiB
input (8 ms) and computing on the edge beats the board; at 1 Mbit/s every cut that sends more than
a few hundred bytes takes over 100 ms, and the cut after `pool` (64 B) still pays the 10 ms RTT:
the board alone is best. The planner plans with these profiles as given (``compute_telemetry`` off:
the tiny model really runs in well under a millisecond here, and the planner would otherwise scale
the board's profile to that and never offload).
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from conftest import REPO, TINY_NET

from planner.config import PlannerConfig
from planner.server import serve as serve_planner
from runtime.agent.client import Agent
from runtime.agent.config import AgentOptions, InitialPlan
from runtime.agent.planner_link import PlannerLink, PlannerLinkOptions
from runtime.agent.sources import open_source
from runtime.contracts.profile import Block, Profile
from runtime.models.loader import load_model
from runtime.tools.netem import DelayProxy, LinkShape
from runtime.wire.codec import get_codec
from runtime.worker.config import WorkerConfig
from runtime.worker.server import serve as serve_worker

pytestmark = [pytest.mark.timeout(150), pytest.mark.usefixtures("one_torch_thread")]

TINY = f"{REPO / TINY_NET.split(':')[0]}:build"
FAST = 50e6 / 8  # bytes/s
SLOW = 1e6 / 8
DELAY = 0.005  # one way


def _profile(loaded, role: str, seconds: float) -> Profile:
    points = loaded.sliced.split_points[1:]
    blocks = tuple(Block(i, sp.name, seconds, sp.fp32_bytes) for i, sp in enumerate(points))
    return Profile(machine=role, role=role, model=loaded.name, model_digest=loaded.digest, blocks=blocks,
                   input_bytes=loaded.sliced.split_points[0].fp32_bytes)


async def _until(predicate, timeout: float, what: str, state=lambda: "") -> float:
    """Seconds until ``predicate()`` holds (polled every 20 ms); fails after ``timeout`` with ``state()``."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}; {state()}")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


class Pump:
    """Frames at ``fps``, at most ``window`` in flight (a frame due while the window is full is skipped)."""

    def __init__(self, agent: Agent, x: torch.Tensor, fps: float = 5.0, window: int = 4):
        self.agent, self.x, self.period, self.window = agent, x, 1.0 / fps, window
        self.results: list[tuple[float, object]] = []
        self.inflight: set[asyncio.Task] = set()
        self.skipped = 0
        self._task: asyncio.Task | None = None

    async def _one(self) -> None:
        r = await self.agent.infer(self.x)
        self.results.append((time.monotonic(), r))

    async def _run(self) -> None:
        while True:
            if len(self.inflight) < self.window:
                t = asyncio.create_task(self._one())
                self.inflight.add(t)
                t.add_done_callback(self.inflight.discard)
            else:
                self.skipped += 1
            await asyncio.sleep(self.period)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.wait_for(asyncio.gather(*self.inflight), 30)


def test_the_plan_follows_a_link_that_drops_and_comes_back(tmp_path):
    loaded = load_model(TINY)
    x = next(iter(open_source(loaded.spec, "synthetic", 1))).tensor
    edge_profile = tmp_path / "edge.json"
    _profile(loaded, "edge", 0.0005).save(edge_profile)
    device = _profile(loaded, "device", 0.004)

    async def scenario():
        relay = await DelayProxy("127.0.0.1:1", LinkShape(DELAY, FAST), buffer_bytes=64 * 1024).start()
        ps = await serve_planner(PlannerConfig(listen="127.0.0.1:0", db=str(tmp_path / "p.sqlite"), metrics_port=-1,
                                               hold_seconds=1.0, replan_interval_seconds=0.1,
                                               telemetry_max_rate_hz=20.0, compute_telemetry=False))
        planner = f"127.0.0.1:{ps.port}"
        worker = await serve_worker(WorkerConfig(listen="127.0.0.1:0", models=(TINY,), torch_threads=1, planner=planner,
                                                 worker_id="edge-1", advertise=relay.address,
                                                 profiles=(str(edge_profile),)))
        relay.target = ("127.0.0.1", worker.port)  # the agent reaches the worker only through the relay
        agent = Agent(loaded, InitialPlan(loaded.split("output"), get_codec("raw")),
                      AgentOptions(agent_id="board-1", deadline_seconds=2.0, connect_timeout=2.0))
        link = PlannerLink(agent, PlannerLinkOptions(planner, device, "board-1", telemetry_interval_seconds=0.25,
                                                     probe_targets_seconds=0.5, backoff_initial=0.1, backoff_max=0.5))
        pump = Pump(agent, x)

        def state() -> str:
            est = agent.link.estimate(relay.address)
            return (f"plan v{agent.plan_version} worker {agent.active.worker or 'none'}; link estimate "
                    f"{est.bandwidth.value / 1e6:.3f} MB/s from {est.bandwidth.samples} samples, "
                    f"{est.bandwidth.age(agent.link.clock()):.1f} s old, {est.steps} steps; "
                    f"{link.prober.probes} probes ({link.prober.probe_bytes} B); "
                    f"table {[(round(b.min_bandwidth_bytes_per_second), b.plan.split_id) for b in link.switcher.plan.fallbacks] if link.switcher.plan else None}")
        events = {}
        try:
            await asyncio.wait_for(worker.registration.registered.wait(), 20)
            await link.start()
            events["offload"] = await _until(lambda: agent.active.worker == relay.address, 30, "a first offloading plan")
            pump.start()
            await asyncio.sleep(3.0)
            relay.set_shape(rate_bytes_per_second=SLOW)
            events["drop"] = time.monotonic()
            events["local_after_drop"] = await _until(lambda: agent.active.worker == "", 30,
                                                      "a plan fit for the slow link", state)
            await asyncio.sleep(3.0)
            relay.set_shape(rate_bytes_per_second=FAST)
            events["rise"] = time.monotonic()
            events["offload_after_rise"] = await _until(lambda: agent.active.worker == relay.address, 40,
                                                        "an offloading plan after the rise", state)
            await asyncio.sleep(2.0)
            await pump.stop()
            return pump, events, link
        finally:
            await link.close()
            await agent.close()
            await worker.drain_and_stop(1.0)
            await ps.drain_and_stop(1.0)
            await relay.close()

    pump, events, link = asyncio.run(scenario())
    seqs = sorted(r.seq for _, r in pump.results)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a frame was lost or duplicated"
    assert len(set(seqs)) == len(pump.results)
    drop, rise = events["drop"], events["rise"]
    wheres = [(t, r.where) for t, r in pump.results]
    assert any(w == "edge" for t, w in wheres if t < drop), "offloaded before the drop"
    assert any(w == "edge" for t, w in wheres if t > rise + events["offload_after_rise"]), "offloaded after the rise"
    print(f"\nfirst offload {events['offload']:.1f} s after start; local {events['local_after_drop']:.1f} s after "
          f"the drop; offload {events['offload_after_rise']:.1f} s after the rise; {len(pump.results)} frames, "
          f"{pump.skipped} skipped; probe bytes {link.prober.probe_bytes}; plans applied {link.plans_applied}")
