"""Active probes of links no frame measures (issue 11: estimates that never go blind).

Frames measure the link the plan uses (runtime.agent.telemetry). They measure nothing when the
plan runs locally, when frames are under the bandwidth sampler's ``min_bytes``, or for a worker
the plan does not use; and the planner never offloads to a link that was not measured. So the
agent probes the workers the planner lists (``Planner.ListProbeTargets``) with
``Inference.Probe``, a payload the worker only counts:

* **Only when a probe could change the decision**: the link the plan sends frames on is not probed
  while its figure is fresher than ``refresh_seconds`` (default 3 s: the frames measure it; when they
  stop completing, e.g. the stream breaks on a collapsed link, the probes take over); every other link
  the planner may place the agent on (all of them under a local plan) is probed within the budget,
  since only probes can show that it became worth offloading to (a step up).
* **Within a budget**: after a probe of ``b`` bytes the link is left alone for
  ``b / (budget_fraction * bandwidth)`` seconds (default 5 % of the link's estimated capacity),
  at least ``min_interval_seconds``; an unknown or failing link is retried after
  ``unknown_interval_seconds`` (doubling on failure up to 8x).
* **Sized to measure**: the payload takes about ``target_seconds`` on the estimated link, between
  ``min_bytes`` and ``max_bytes`` (``first_bytes`` on an unknown link; a slow link gets small
  payloads and so, within the same budget, more frequent probes: a step up shows sooner):
  sample = bytes / (call time - RTT floor): the floor (runtime.agent.estimator.LinkEstimate.rtt_floor), not the
  base RTT, which the agent's own CPU stalls can lift above the path's round trip (issue 11).
  When the call is too quick for that difference to mean anything (under a quarter of the
  call), bytes / call time is taken instead: a lower bound, and the next payload is 4x larger.
  The budget is taken against the larger of the estimate and the last sample (after a step up the
  estimate lags behind, and the sample is a floor of what the link carries).
  A figure ``QUICK_RATIO`` (2) or more times the estimate before it looks like a step up, and the agent's
  band switch waits for a second figure before it leaves a local plan on probes alone
  (runtime.agent.fallbacks), so the next probe comes after ``confirm_interval_seconds`` (0.5 s) instead
  of ``min_interval_seconds``, within the same budget.
  A probe with no answer within ``timeout_seconds`` is a censored sample (runtime.agent.estimator).
  A lower bound below the estimate is dropped (it is no evidence of a slower link).
* **Late frames checked at once** (:meth:`Prober.confirm`, called by the link estimator when a frame is
  ``LATE_FACTOR`` times later than its estimate, runtime.agent.inflight): a frame is late when the link
  collapsed, and also when the worker stalled on its compute. A small probe (sized to take
  ``target_seconds`` at the late frame's bound, at least ``min_bytes``) on the probe connection tells
  them apart within a few round trips: the worker answers a probe from its event loop, not its
  compute. When the probe is no faster than ``CONFIRM_RATIO`` times the bound, or times out, the link is
  that slow: the frame's bound is taken as an upper bound (a step at once when far below the estimate,
  and a band switch when below the running band: runtime.agent.fallbacks) and the probe's figure as a
  sample; otherwise the late frame is no evidence and only the probe's figure counts. Outside the
  budget, at most one at a time per link and one per ``confirm_interval_seconds``.
* **Several round trips before the first figure**: the first probes of a link time
  ``first_rtt_checks`` health checks and keep the smallest, so no plan rests on one round trip
  measured while the agent was starting (a busy loop, a cold connection).
* **Never queued behind frames**: probes use their own channel per worker, on a connection of its
  own (``TransportOptions.probe_channel``: two plain channels to one address share one TCP
  connection), so a probe waits for no frame's bytes in the agent; the base RTT is timed on it too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import grpc

from runtime.agent.estimator import LinkEstimate
from runtime.contracts.errors import EdgesplitError
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.wire.stream import time_health_check

logger = logging.getLogger(__name__)

CONFIRM_RATIO = 2.0  # a probe no faster than this many times a late frame's bound confirms it
CONFIRM_TIMEOUT_RATIO = 4.0  # a check's deadline: this many times its bytes at the late frame's bound ...
CONFIRM_MIN_TIMEOUT = 0.25  # ... and at least this (seconds), at most ProbeOptions.timeout_seconds
QUICK_RATIO = 2.0  # a probe this many times over the estimate is followed by the next one sooner (Prober._wait)


@dataclass(frozen=True)
class ProbeOptions:
    """How the agent probes links (``edgesplit agent --probe-budget``)."""

    # share of a link's estimated capacity probes may take, over time (0 disables probing)
    budget_fraction: float = 0.05
    # payload of the first probe of a link with no bandwidth figure, in bytes
    first_bytes: int = 16 * 1024
    # smallest payload on a link with a figure, in bytes
    min_bytes: int = 1024
    # largest payload, in bytes (the worker answers up to 1 MiB)
    max_bytes: int = 256 * 1024
    # a payload is sized to take about this long on the estimated link
    target_seconds: float = 0.05
    # the plan's own link is not probed while its figure is fresher than this
    refresh_seconds: float = 3.0
    # shortest wait between two probes of one link
    min_interval_seconds: float = 1.0
    # wait before probing again a link that is still unknown (doubles on failure, up to 8x)
    unknown_interval_seconds: float = 5.0
    # deadline of one probe call (and of its RTT check)
    timeout_seconds: float = 2.0
    # links probed per round; channels held (the least recently used is closed beyond this)
    max_targets: int = 16
    # shortest wait between two checks of late frames on one link (Prober.confirm)
    confirm_interval_seconds: float = 0.5
    # health checks timed per probe until a link has this many RTT samples (the smallest counts)
    first_rtt_checks: int = 3

    def __post_init__(self) -> None:
        checks = ((0 <= self.budget_fraction <= 0.5, "budget_fraction must be in [0, 0.5]"),
                  (1024 <= self.min_bytes <= self.first_bytes <= self.max_bytes <= 2**20,
                   "need 1 KiB <= min_bytes <= first_bytes <= max_bytes <= 1 MiB"),
                  (self.target_seconds > 0 and self.refresh_seconds > 0, "target_seconds and refresh_seconds must be > 0"),
                  (self.min_interval_seconds > 0 and self.unknown_interval_seconds > 0, "intervals must be > 0"),
                  (self.timeout_seconds > 0, "timeout_seconds must be > 0"),
                  (1 <= self.max_targets <= 256, "max_targets must be in [1, 256]"),
                  (self.confirm_interval_seconds > 0, "confirm_interval_seconds must be > 0"),
                  (1 <= self.first_rtt_checks <= 16, "first_rtt_checks must be in [1, 16]"))
        for ok, why in checks:
            if not ok:
                raise ValueError(why)


def _base(est: LinkEstimate) -> float:
    """The round trip a probe's call time is reduced by: the link's RTT *floor*, not its base RTT (issue 11). The
    base can stand above the path's round trip after two health checks in a row waited on the agent's own CPU
    (runtime.agent.estimator), and a probe less more than its path's round trip reads faster than the link:
    under fedback12's local plan one 5.8 KB probe on a 0.12 MB/s link read ~0.41 MB/s and took the agent to an
    offloading plan it left 6 s later. Less the floor, stalls only lengthen the call: the figure can fall short
    of the link (safe) but not exceed it."""
    floor = est.rtt_floor
    return min(est.rtt.value, floor) if floor > 0 else est.rtt.value


class Prober:
    """Probes the links of one agent (``agent.link`` holds the estimates; ``agent.metrics`` counts bytes)."""

    def __init__(self, agent: Any, options: ProbeOptions | None = None):
        self.agent = agent
        self.options = options or ProbeOptions()
        self._payload = os.urandom(self.options.max_bytes)  # incompressible, made once
        self._channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        self._next: dict[str, float] = {}  # address -> monotonic time it may be probed again
        self._failures: dict[str, int] = {}
        self._grow: dict[str, int] = {}  # address -> payload of the next probe after one too quick to measure
        self._last: dict[str, float] = {}  # address -> the last probe's bandwidth sample
        self.probes = 0
        self.probe_bytes = 0
        self._confirming: dict[str, asyncio.Task] = {}  # address -> the check of a late frame under way
        self._confirmed_at: dict[str, float] = {}  # address -> monotonic time of the last check
        self.confirmations = 0  # late frames checked by a probe
        self.confirmed = 0  # ... of which the probe found the link as slow as the frame said
        if self.options.budget_fraction > 0 and getattr(agent, "link", None) is not None:
            agent.link.confirm = self.confirm  # late frames are checked before they count (runtime.agent.telemetry)

    def due(self, address: str, now: float) -> bool:
        """Whether a probe of ``address`` could tell something new and fits the budget now."""
        if self.options.budget_fraction <= 0 or now < self._next.get(address, -1.0):
            return False
        if address != self.agent.active.worker:
            return True  # no frame measures it: only a probe can
        est = self.agent.link.links.get(address)
        return est is None or not est.bandwidth.samples or est.bandwidth.age(now) > self.options.refresh_seconds

    async def round(self, addresses: list[str]) -> int:
        """Probe each due address (at most ``max_targets``), one after another; returns how many."""
        done = 0
        for address in addresses[: self.options.max_targets]:
            if address and self.due(address, self.agent.link.clock()):
                await self.probe(address)
                done += 1
        return done

    def _size(self, address: str) -> int:
        o = self.options
        est = self.agent.link.links.get(address)
        bw = est.bandwidth.value if est is not None else 0.0
        if bw <= 0:
            return o.first_bytes
        grown = self._grow.get(address, 0)  # the last probe was too quick to measure: a larger one
        return int(min(o.max_bytes, max(o.min_bytes, bw * o.target_seconds, grown)))

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = self.agent.transport.probe_channel(address)  # not the frames' connection
            while len(self._channels) > self.options.max_targets:
                _, old = self._channels.popitem(last=False)
                asyncio.get_running_loop().create_task(old.close())
        self._channels.move_to_end(address)
        return ch

    async def probe(self, address: str) -> float | None:
        """One probe of ``address``: base RTT, then a payload; returns the bandwidth sample taken (None: none)."""
        o, link = self.options, self.agent.link
        size = self._size(address)
        channel = self._channel(address)
        sample = None
        known = link.links.get(address)
        before = known.bandwidth.value if known is not None else 0.0  # the estimate this probe is read against
        with link.timed():  # no frame's long board work holds this loop meanwhile (Agent._board_inline)
            try:
                await self._time_rtt(channel, address)
                base = _base(link.estimate(address))
                t0 = time.perf_counter()
                try:
                    await pb_grpc.InferenceStub(channel).Probe(  # type: ignore[no-untyped-call]
                        pb.ProbeRequest(payload=self._payload[:size]), timeout=o.timeout_seconds)
                finally:
                    self._spent(size)
                elapsed = time.perf_counter() - t0
                network = elapsed - base
                if network > 0.25 * elapsed:
                    sample = size / network
                    self._grow.pop(address, None)
                    link.add_bandwidth_sample(sample, address)
                else:  # mostly round trip: bytes / call time bounds the link from below; next time 4x the bytes
                    sample = size / elapsed
                    self._grow[address] = 4 * size
                    link.add_lower_bound_sample(sample, address)  # below the estimate it says nothing
                self._last[address] = sample
                self._failures.pop(address, None)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    link.observe_censored(address, size, o.timeout_seconds)
                self._failures[address] = self._failures.get(address, 0) + 1
                logger.debug("probe of %s failed: %s", address, e.code().name)
            except (EdgesplitError, asyncio.TimeoutError) as e:
                self._failures[address] = self._failures.get(address, 0) + 1
                logger.debug("probe of %s failed: %s", address, e)
        quick = sample is not None and before > 0 and sample >= QUICK_RATIO * before
        self._next[address] = link.clock() + self._wait(address, size, quick)
        return sample

    async def _time_rtt(self, channel: grpc.aio.Channel, address: str) -> None:
        """Health checks into the link's base RTT: one, or ``first_rtt_checks`` while it has fewer samples."""
        link, o = self.agent.link, self.options
        est = link.links.get(address)
        checks = 1 if est is not None and est.rtt.samples >= o.first_rtt_checks else o.first_rtt_checks
        for _ in range(checks):
            link.add_rtt_sample(await time_health_check(channel, o.timeout_seconds), address)

    def confirm(self, address: str, bound: float) -> None:
        """A frame on ``address`` is late enough to say the link carries under ``bound`` bytes/s: check it
        with a probe now (see the module docstring); at most one check at a time per link."""
        now = time.monotonic()
        running = self._confirming.get(address)
        if (running is not None and not running.done()) or now - self._confirmed_at.get(address, -math.inf) < \
                self.options.confirm_interval_seconds or not bound > 0:
            return
        self._confirmed_at[address] = now
        self._confirming[address] = asyncio.get_running_loop().create_task(self._confirm(address, bound))

    async def _confirm(self, address: str, bound: float) -> None:
        o, link = self.options, self.agent.link
        size = int(min(o.max_bytes, max(o.min_bytes, bound * o.target_seconds)))
        base = _base(link.estimate(address))
        # the probe's bytes at the frame's bound, CONFIRM_TIMEOUT_RATIO times over: a link that slow times out
        timeout = min(o.timeout_seconds, max(CONFIRM_MIN_TIMEOUT, CONFIRM_TIMEOUT_RATIO * size / bound + 2 * base))
        self.confirmations += 1
        t0 = time.perf_counter()
        try:
            with link.timed():  # as in probe()
                await pb_grpc.InferenceStub(self._channel(address)).Probe(  # type: ignore[no-untyped-call]
                    pb.ProbeRequest(payload=self._payload[:size]), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                logger.debug("check of a late frame on %s failed: %s", address, e.code().name)
                return
            self.confirmed += 1  # not even the probe's bytes in that time: the link is that slow
            link.observe_upper_bound(address, min(bound, size / timeout))
            logger.info("late frame on %s confirmed by a probe that timed out: link under %.3g MB/s", address,
                        min(bound, size / timeout) / 1e6)
            return
        except (EdgesplitError, asyncio.TimeoutError) as e:
            logger.debug("check of a late frame on %s failed: %s", address, e)
            return
        finally:
            self._spent(size)
        elapsed = time.perf_counter() - t0
        network = elapsed - base
        timed = network > 0.25 * elapsed  # else mostly round trip: bytes / call time is a lower bound only
        figure = size / network if timed else size / elapsed
        if timed and figure <= CONFIRM_RATIO * bound:
            self.confirmed += 1
            link.observe_upper_bound(address, bound)
            link.add_bandwidth_sample(figure, address)
            logger.info("late frame on %s confirmed by a probe: link under %.3g MB/s (probe %.3g MB/s)", address,
                        bound / 1e6, figure / 1e6)
        elif timed:
            link.add_bandwidth_sample(figure, address)
            logger.debug("late frame on %s not the link's doing: probe %.3g MB/s", address, figure / 1e6)
        else:
            link.add_lower_bound_sample(figure, address)
            logger.debug("late frame on %s not the link's doing: probe at least %.3g MB/s", address, figure / 1e6)

    def _wait(self, address: str, size: int, quick: bool = False) -> float:
        """Seconds until ``address`` may be probed again; ``quick``: the last figure read a step up, and the band
        switch waits for a second one (runtime.agent.fallbacks), so ``confirm_interval_seconds`` rather than
        ``min_interval_seconds`` (the budget still holds)."""
        o = self.options
        est = self.agent.link.links.get(address)
        # the budget is a share of what the link carries: at least the estimate, at least the last sample
        # (after a step up the estimate lags, and the sample is a floor of the link's capacity)
        bw = max(est.bandwidth.value if est is not None else 0.0, self._last.get(address, 0.0))
        fails = min(self._failures.get(address, 0), 3)
        if bw <= 0:
            return o.unknown_interval_seconds * 2 ** fails
        shortest = min(o.min_interval_seconds, o.confirm_interval_seconds) if quick else o.min_interval_seconds
        return max(shortest, size / (o.budget_fraction * bw)) * 2 ** fails

    async def close(self) -> None:
        if getattr(self.agent, "link", None) is not None and self.agent.link.confirm == self.confirm:
            self.agent.link.confirm = None
        tasks, self._confirming = list(self._confirming.values()), {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        channels, self._channels = list(self._channels.values()), OrderedDict()
        for ch in channels:
            await ch.close()

    def _spent(self, size: int) -> None:
        """Count one probe of ``size`` bytes, answered or not, against the budget and the metrics."""
        self.probes += 1
        self.probe_bytes += size
        self.agent.metrics.probe_bytes.inc(size)
