"""Whether a new link estimate could change an agent's plan (issue 15: decide only on a change).

A plan carries its bandwidth bands (``Plan.fallbacks``, :mod:`planner.fallbacks`): over the link to
its band worker, the best configuration in each band, ranked with the RTT of the time it was
issued (a plan issued before its link was measured has none: the re-planner ranks them when the
first estimate comes and keeps them itself). The re-planner keeps, per agent, the band that holds
the running plan (:class:`Basis`), cut to the bandwidths that were ranked: the grid spans
``GRID[0]`` .. ``GRID[-1]`` times the bandwidth the bands were ranked around, and the table's first
band (from 0) and last (no upper bound) say nothing beyond it. A local plan ranked on a slow link
(all its grid points local: one band, 0 to no bound) must still be decided again when the link
comes back fast enough for a worker to win. A new estimate of that link needs no decision when

* its bandwidth lies in that band, within the ranked span,
* its RTT is within ``switch_gain`` (relatively, or ``switch_min_gain_seconds``) of the RTT the bands
  were ranked with, and
* it is no slower than when the plan was last decided, or slower by less than half the switch
  threshold in the plan's own upload time (the bands rank only the band worker and the board: the
  running plan becoming slower is what could let another worker's plan pass it).

Anything else (no bands yet, another worker's link, a hold pending) is decided as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.decide import plan_key
from planner.fallbacks import GRID
from planner.hysteresis import Hysteresis
from runtime.proto.edgesplit.v1 import planner_pb2 as pb


@dataclass(frozen=True)
class Basis:
    """The running plan's band, what it was ranked with, and the bandwidth at its last decision."""

    version: int  # the plan these figures belong to
    worker: str  # the band worker (its id)
    rtt_seconds: float  # RTT the bands were ranked with
    bandwidth: float  # bandwidth when the plan was last decided (kept or issued)
    low: float  # the band holding the running plan, within the ranked span: [low, high) bytes/s
    high: float
    ranked_low: float = 0.0  # the span the bands were ranked over (GRID around a bandwidth): [low, high)
    ranked_high: float = math.inf

    def ranked(self, bandwidth: float) -> bool:
        """Whether ``bandwidth`` lies in the span the bands were ranked over."""
        return self.ranked_low <= bandwidth < self.ranked_high


def band_of(plan: pb.Plan, bandwidth: float) -> pb.BandPlan | None:
    b: pb.BandPlan
    for b in plan.fallbacks:
        hi = b.max_bandwidth_bytes_per_second or math.inf
        if b.min_bandwidth_bytes_per_second <= bandwidth < hi:
            return b
    return None


def basis_of(banded: pb.Plan, version: int, worker: str, rtt: float, bandwidth: float,
             around: float) -> Basis | None:
    """The basis of plan ``version`` from ``banded`` (it, or a copy carrying the bands ranked for it,
    around the bandwidth ``around``) at the measured ``bandwidth``; None when the band holding that
    bandwidth is another configuration or lies outside the ranked span."""
    band = band_of(banded, bandwidth)
    if band is None or plan_key(band.plan) != plan_key(banded) or around <= 0:
        return None
    ranked_low, ranked_high = around * GRID[0], around * GRID[-1]
    low = max(band.min_bandwidth_bytes_per_second, ranked_low)
    high = min(band.max_bandwidth_bytes_per_second or math.inf, ranked_high)
    if not low <= bandwidth < high:
        return None
    return Basis(version, worker, rtt, bandwidth, low, high, ranked_low, ranked_high)


def in_band(plan: pb.Plan | None, basis: Basis | None, worker: str, bandwidth: float, rtt: float,
            hysteresis: Hysteresis) -> bool:
    """True when an estimate (``bandwidth``, ``rtt``) of the link to ``worker`` cannot change ``plan``
    (see the module docstring)."""
    if plan is None or basis is None or basis.version != plan.version or worker != basis.worker or bandwidth <= 0:
        return False
    if not basis.low <= bandwidth < basis.high:
        return False
    if abs(rtt - basis.rtt_seconds) > max(hysteresis.switch_gain * basis.rtt_seconds, hysteresis.min_gain_seconds):
        return False
    if bandwidth >= basis.bandwidth or basis.bandwidth <= 0:
        return True
    slower = plan.predicted_bytes * (1.0 / bandwidth - 1.0 / basis.bandwidth)
    return slower < 0.5 * hysteresis.threshold(plan.predicted_seconds)
