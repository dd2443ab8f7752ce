"""The agent's own plan switches when its link leaves the running plan's bandwidth band (issue 11).

The planner sends with each plan a table of fallback plans keyed by bandwidth band on one link
(``Plan.fallbacks``, ``Plan.band_worker_address``; planner/fallbacks.py). The agent does not wait
for the planner when that link collapses or comes back: on every new bandwidth figure of that link
(a frame, a censored frame past its deadline, a probe; runtime.agent.estimator declares a step
after 2 samples) it looks the figure up, and when it is outside the band of the configuration it
runs, by more than ``margin`` (default 1.25, the estimator's +-25 % drift), it applies the entry
whose band holds it, under the running plan's version (``Agent.apply_plan(fallback=True)``). The
planner confirms or refines with a newer plan once its telemetry shows the new bandwidth; a
newer plan always wins (a fallback is never applied over it).

**Confirmed before leaving on probes alone.** When the running configuration sends no frames on that link
(a local plan, or another worker), only the prober's samples measure it, and a probe is one call on a
board whose own CPU stalls can mis-time it (issue 11: fedback12's local plan left for the JPEG plan on
one probe that read ~0.41 MB/s on a 0.12 MB/s link, and came back 6 s later: 2.25 switches per 40 s).
There, a figure counts toward a switch only when the estimate *and* the link's last sample
(runtime.agent.estimator.LinkEstimate.last_sample) are both past the band's edge by the margin, and the
agent switches on the ``confirm`` -th such figure in a row (default 2; any figure back within the
margin starts the count again): one outlier moves the EWMA past the edge, but the next probe's
sample does not follow it. A real step up (1 -> 50 Mbit/s) reads far past the edge on every probe, so
it costs one probe interval (about 1 s) more. Frames on the link measure it many times a second, so a
configuration that sends on it switches on the first figure, as before.

An *upper bound* of that link (a frame past its deadline or broken, a late frame a probe confirmed, a
probe that timed out: :meth:`FallbackSwitcher.on_bound`) below the running band's floor is proof on
its own: the goodput was under the floor, whatever the jitter, so the agent switches at once to the
band that holds the bound, with no margin and without waiting for the estimate to settle.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from runtime.agent.plan import pushed_tl_id
from runtime.contracts.errors import EdgesplitError
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb

logger = logging.getLogger(__name__)

MARGIN = 1.25  # how far past a band's edge a figure must be before the agent leaves it
CONFIRM = 2  # figures in a row past the edge before leaving a configuration that sends nothing on the link


def _config(split: str, worker: str, codec: str) -> tuple[str, str, str]:
    return split, worker, codec if worker else ""


def _warm(loaded: Any, splits: set) -> None:
    """Build (and cache, runtime.models.loader) the head and tail of each split; errors are the switch's to report."""
    for split in splits:
        try:
            loaded.head(split)
            loaded.tail(split)
        except (EdgesplitError, ValueError, RuntimeError) as e:
            logger.debug("fallback split %s not built ahead: %s", split, e)


class FallbackSwitcher:
    """Holds the running plan's table and switches ``agent`` when its link leaves the band."""

    def __init__(self, agent: Any, margin: float = MARGIN, confirm: int = CONFIRM):
        if margin < 1:
            raise ValueError(f"margin must be >= 1, got {margin}")
        if not 1 <= confirm <= 16:
            raise ValueError(f"confirm must be in [1, 16], got {confirm}")
        self.agent = agent
        self.margin = margin
        self.confirm = confirm
        self._streak = 0  # figures in a row past the running band's edge, on probes alone (see the module docstring)
        self.plan: ppb.Plan | None = None  # the planner's plan the table came with
        self._task: asyncio.Task | None = None
        self.link = getattr(agent, "link", None)  # a runtime.agent.telemetry.LinkEstimator (None in unit tests)
        if self.link is not None:
            self.link.bound_listeners.append(self.on_bound)

    def set_plan(self, plan: ppb.Plan) -> None:
        """The planner's plan now in effect (its table replaces the previous one). The heads and tails of
        its entries are built now, off the event loop, so that a switch does not wait for them."""
        self.plan = plan
        self._streak = 0
        loaded = getattr(self.agent, "loaded", None)
        splits = {b.plan.split_id or b.plan.split_index for b in plan.fallbacks}
        if loaded is None or not splits:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.run_in_executor(None, _warm, loaded, splits)

    def _band(self, est: float) -> ppb.BandPlan | None:
        assert self.plan is not None
        return next((b for b in self.plan.fallbacks if b.min_bandwidth_bytes_per_second <= est
                     and (not b.max_bandwidth_bytes_per_second or est < b.max_bandwidth_bytes_per_second)), None)

    def _running(self) -> ppb.BandPlan | None:
        assert self.plan is not None
        a = self.agent.active
        running = _config(a.split.name, a.worker, a.codec.name)
        return next((b for b in self.plan.fallbacks
                     if _config(b.plan.split_id, b.plan.worker_address, b.plan.codec) == running), None)

    def on_estimate(self, key: str, bytes_per_second: float) -> None:
        """A new bandwidth figure of link ``key`` (called by the LinkEstimator, on the event loop)."""
        plan = self.plan
        if plan is None or not plan.fallbacks or key != plan.band_worker_address or bytes_per_second <= 0:
            return
        if self.agent.plan_version != plan.version or (self._task is not None and not self._task.done()):
            return  # a newer plan, or a switch under way
        running, target = self._running(), self._band(bytes_per_second)
        if target is None or (running is not None and target is running) or \
                (running is not None and self._within(running, bytes_per_second)):
            self._streak = 0
            return  # in the band, or near its edge: stay (jitter across a boundary does not flap)
        if getattr(self.agent.active, "worker", "") != key:  # nothing but probes measures the link: confirm
            sample = self._last_sample(key, bytes_per_second)
            if running is not None and self._within(running, sample):
                self._streak = 0
                return  # the estimate is past the edge, the last sample is not: one outlier moved the EWMA
            self._streak += 1
            if self._streak < self.confirm:
                return
        self._streak = 0
        down = running is not None and bytes_per_second < running.min_bandwidth_bytes_per_second
        self._task = asyncio.get_running_loop().create_task(self._switch(plan, target, bytes_per_second, down))

    def _within(self, band: ppb.BandPlan, bw: float) -> bool:
        """Whether ``bw`` is inside ``band`` widened by the margin on both sides."""
        lo, hi = band.min_bandwidth_bytes_per_second, band.max_bandwidth_bytes_per_second
        return lo / self.margin <= bw and (not hi or bw <= hi * self.margin)

    def _last_sample(self, key: str, estimate: float) -> float:
        """The link's last bandwidth sample (the estimate itself when the link keeps none)."""
        est = self.link.links.get(key) if self.link is not None else None
        last = getattr(est, "last_sample", 0.0) if est is not None else 0.0
        return last if last > 0 else estimate

    def on_bound(self, key: str, bound: float) -> None:
        """Link ``key`` carried less than ``bound`` bytes/s (LinkEstimator bound listener, on the event loop):
        below the running band's floor, switch now to the band that holds the bound."""
        plan = self.plan
        if plan is None or not plan.fallbacks or key != plan.band_worker_address or not bound > 0:
            return
        if self.agent.plan_version != plan.version or (self._task is not None and not self._task.done()):
            return
        running = self._running()
        if running is None or bound >= running.min_bandwidth_bytes_per_second:
            return  # within the band (or the running configuration is in no band): no proof
        target = self._band(bound)
        if target is None or target is running:
            return
        self._task = asyncio.get_running_loop().create_task(self._switch(plan, target, bound, True, give_up=True))

    async def _switch(self, plan: ppb.Plan, target: ppb.BandPlan, bw: float, down: bool, give_up: bool = False) -> None:
        """Apply ``target``; with ``give_up`` (the link proved under the band's floor) the frames still waiting
        on the old link's stream are given up, so they run on the board now, free the agent's window for
        the frames that arrive, and their bytes stop taking the collapsed link."""
        p = target.plan
        old = getattr(self.agent.active, "stream", None)
        try:
            await self.agent.apply_plan(p.split_id or p.split_index, p.codec or self.agent.codec, pushed_tl_id(p.tl_id),
                                        plan.version, p.worker_address, model_id=plan.model_id, fallback=True)
        except EdgesplitError as e:
            logger.info("fallback for %.3g MB/s not taken: %s", bw / 1e6, e)
            return
        self.agent.metrics.band_switches.labels("down" if down else "up").inc()
        if give_up and old is not None and old is not getattr(self.agent.active, "stream", None):
            n = old.give_up(f"the link to {old.address} collapsed (under {bw / 1e6:.3g} MB/s): the agent left it")
            if n:
                logger.info("%d frames waiting on %s given up: they run on the board", n, old.address)
        logger.info("link to %s at %.3g MB/s left the band of plan v%d: switched by itself to %s@%s",
                    plan.band_worker_address, bw / 1e6, plan.version, p.worker_id or "local", p.split_id)

    async def close(self) -> None:
        if self.link is not None and self.on_bound in self.link.bound_listeners:
            self.link.bound_listeners.remove(self.on_bound)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
