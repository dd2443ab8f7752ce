"""Link estimates that never go blind: per link, aged, censored-aware, with a step detector.

One :class:`LinkEstimate` per (agent, worker) link (the agent keys them by the worker's address in
:class:`LinkTable`). Each holds a bandwidth and an RTT figure, and for each the time of its last
sample and the number of samples behind it, so a reader can tell a fresh measurement from an old
one, and an unmeasured link (``samples == 0``, value 0.0) from a measured one. Unknown is unknown,
never a default.

Bandwidth (bytes/s):

* **EWMA with ageing.** A new sample ``x`` moves the estimate by ``a``: ``est = a*x + (1-a)*est``,
  where ``a = 1 - (1 - alpha) * 0.5 ** (age / half_life)``: on a fresh estimate ``a = alpha``
  (default 0.3), and the older the estimate the more a new sample replaces it (age = one half-life,
  default 10 s: ``a = 0.65``). Old samples lose weight; a long-unmeasured link is re-learnt from
  the first new sample rather than averaged with what it was.
* **Censored samples.** A frame that misses its deadline (or is abandoned) after ``elapsed``
  seconds with ``b`` bytes sent says: had the link carried ``B`` bytes/s, the bytes would have
  arrived after ``b/B`` plus one round trip, and the result would have come back; it did not, so
  ``B < b / (elapsed - rtt)``. That upper bound is information: when it is below the estimate,
  it is taken as a sample (and fed to the step detector); when it is ``censored_step`` (default 4)
  times below, it is a step on its own (an upper bound is evidence, not noise: a collapsed link
  shows on its first frame past the deadline); when it is above, it says nothing new and is only
  counted. Without it, a collapsed link produces no sample at all and the estimate freezes
  at the fast value (the failure this module exists for). The same holds for any upper bound
  (:meth:`LinkEstimate.add_upper_bound`: a late frame a probe confirmed, a probe that timed out).
* **Lower bounds.** A probe too quick to time its bytes (mostly round trip) says the link carried
  at least ``bytes / call time``: taken only when above the estimate (or the link had none); below
  it, it is no evidence of a slower link and is dropped (:meth:`LinkEstimate.add_lower_bound`).
* **Step detector.** A two-sided CUSUM on ``d = log(sample / estimate)``:
  ``g+ = max(0, g+ + d - drift)``, ``g- = max(0, g- - d - drift)``. Deviations within ``drift``
  (default 0.25: about +-25 %) never accumulate, so +-20 % jitter does not trip it; a step of 2x
  (``|d| = 0.69``) crosses ``threshold`` (default 0.6) on its second sample, 1.6x on its third.
  ``min_run`` (default 2) samples in a row on the same side are required, so one outlier alone is
  never a step. On an alarm the estimate jumps to the geometric mean of the samples of the run
  and the CUSUM restarts: the EWMA alone would need ~7 samples to absorb a step.

The relative variance of samples about their mean (the bandwidth's ``jitter``, the board's ``cs2`` in
runtime.agent.prediction) is one helper, :func:`log_spread`: an EWMA of ``log(sample / mean)**2``.

Overhead (seconds, :class:`Overhead`): per link, the frame's time that none of the model's measured parts
holds (its board wait, the worker's decode, queue and hand-offs; runtime.agent.telemetry), the median of
the last ``OVERHEAD_WINDOW`` frames with their count and the time of the last one; kept the same way, the
overhead with the board runtime's own time of each frame (``unheld``: all of a frame's time outside its head,
encode, network and tail) and the worker's tail per split (``tails``), which the agent's result lines re-cost
the plan with (runtime.agent.prediction).

RTT (seconds): the *base* RTT, the smallest of the last ``rtt_window`` probes (queueing only ever
adds to a probe; see runtime.agent.telemetry). A fall shows at once; a rise would hide behind the
window's old minimum for ``rtt_window`` probes, so an upward CUSUM on ``log(probe / base)`` (same
drift, threshold and run) clears the window to the probes of the run when the path got longer.
That CUSUM also fires when two probes in a row waited on the agent's own CPU (a board under its
cgroup quota stalls the event loop for tens of ms), so the base can stand above the path's true
round trip until the next quick probe. Whoever subtracts a round trip from a transfer to get a
bandwidth figure must not subtract more than the path takes, or the figure overshoots (issue 11:
a probe of 5.8 KB on a 0.12 MB/s link, less a base RTT inflated to ~45 ms, read ~0.41 MB/s and
took the agent off its local plan). :attr:`LinkEstimate.rtt_floor` is that safe figure: the
smallest of the last ``rtt_floor_window`` probes (default 32, at least ``rtt_window``), which no step clears. It is never
above the base; after a real rise it lags (a subtracted floor then *under*-states the bandwidth,
the safe side), after a fall it follows at once.

``last_sample``: the last bandwidth sample taken (bytes/s) and ``recent_samples`` the last few, so a
reader can tell one outlier that moved the EWMA from a link that moved (runtime.agent.fallbacks).
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict, deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EstimatorOptions:
    """How link samples become estimates (defaults explained in the module docstring)."""

    # EWMA weight of a new sample on a fresh estimate, in (0, 1]
    alpha: float = 0.3
    # seconds after which an estimate's weight against a new sample has halved
    half_life_seconds: float = 10.0
    # CUSUM slack, in log units: deviations below it (0.25: about +-25 %) never accumulate
    drift: float = 0.25
    # CUSUM alarm level, in log units
    threshold: float = 0.6
    # samples in a row on one side before a step is declared
    min_run: int = 2
    # probes the base RTT is the minimum of
    rtt_window: int = 8
    # a censored bound this many times below the estimate is a step on its own (0 < ... ; inf: never)
    censored_step: float = 4.0
    # links held; the least recently sampled is forgotten beyond this
    max_links: int = 64
    # probes the RTT floor (LinkEstimate.rtt_floor) is the minimum of; no step clears it
    rtt_floor_window: int = 32

    def __post_init__(self) -> None:
        checks = ((0 < self.alpha <= 1, "alpha must be in (0, 1]"),
                  (self.half_life_seconds > 0, "half_life_seconds must be > 0"),
                  (self.drift >= 0, "drift must be >= 0"), (self.threshold > 0, "threshold must be > 0"),
                  (1 <= self.min_run <= 64, "min_run must be in [1, 64]"),
                  (self.censored_step > 1, "censored_step must be > 1"),
                  (1 <= self.rtt_window <= 1024, "rtt_window must be in [1, 1024]"),
                  (1 <= self.max_links <= 4096, "max_links must be in [1, 4096]"),
                  (1 <= self.rtt_floor_window <= 4096, "rtt_floor_window must be in [1, 4096]"))
        for ok, why in checks:
            if not ok:
                raise ValueError(why)


class StepDetector:
    """Two-sided CUSUM on log ratios; :meth:`add` returns the run's samples when a step is declared."""

    def __init__(self, options: EstimatorOptions, *, up: bool = True, down: bool = True):
        self.options = options
        self.up, self.down = up, down
        self._g = {1: 0.0, -1: 0.0}
        self._run: dict[int, list[float]] = {1: [], -1: []}
        self.alarms = 0

    def reset(self) -> None:
        self._g = {1: 0.0, -1: 0.0}
        self._run = {1: [], -1: []}

    def add(self, sample: float, reference: float) -> list[float] | None:
        """One positive ``sample`` against the current estimate ``reference`` (> 0)."""
        d = math.log(sample / reference)
        o = self.options
        for side, on in ((1, self.up), (-1, self.down)):
            if not on:
                continue
            g = max(0.0, self._g[side] + side * d - o.drift)
            self._g[side] = g
            run = self._run[side]
            if side * d > o.drift:
                run.append(sample)
                del run[:-64]  # bounded: a step is declared long before
            else:  # "in a row": a sample within the drift ends the run
                run.clear()
            if g > o.threshold and len(run) >= o.min_run:
                out = list(run)
                self.reset()
                self.alarms += 1
                return out
        return None


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def log_spread(spread: float, sample: float, mean: float, alpha: float, first: bool = False) -> float:
    """The EWMA (weight ``alpha``) of ``log(sample / mean)**2``, the relative variance of positive samples about
    their mean (the squared coefficient of variation of runtime.contracts.queueing); ``first``: the first
    deviation sets it. ``spread`` unchanged when either figure is not positive."""
    if not (sample > 0 and mean > 0):
        return spread
    d = math.log(sample / mean)
    return d * d if first else alpha * d * d + (1 - alpha) * spread


@dataclass
class Figure:
    """One estimated quantity: value (0.0 = unknown), samples behind it, time of the last one."""

    value: float = 0.0
    samples: int = 0
    updated: float = -math.inf  # monotonic seconds of the last sample taken

    def age(self, now: float) -> float:
        """Seconds since the last sample (inf when there was none)."""
        return now - self.updated


OVERHEAD_WINDOW = 16  # frames a link's overhead is the median of (one frame that waited for the GIL is no trend)
MAX_OVERHEAD_SECONDS = 1.0  # a frame's overhead beyond this is no measurement of the runtime: not taken


@dataclass
class Overhead(Figure):
    """A link's measured overhead per frame (see the module docstring): a :class:`Figure` whose ``value`` is the
    median of the last OVERHEAD_WINDOW samples (0.0 and ``samples == 0``: unknown)."""

    recent: deque[float] = field(default_factory=lambda: deque(maxlen=OVERHEAD_WINDOW))
    limit: float = MAX_OVERHEAD_SECONDS  # a sample beyond this is no measurement

    # ``value`` is the window's median, taken when read, not on every sample: three windows take a sample a frame
    # and are read only by a report, a scrape or a planner link's result line (issue 14). A value given (the
    # constructor, :meth:`copy`) stands until the next sample.
    _value = 0.0  # (not annotated: no dataclass fields)
    _stale = False

    @property  # type: ignore[misc]  # over Figure's field: dataclasses' __init__ sets it through the setter
    def value(self) -> float:
        if self._stale:
            self._value = statistics.median(self.recent) if self.recent else 0.0
            self._stale = False
        return self._value

    @value.setter
    def value(self, v: float) -> None:
        self._value, self._stale = v, False

    def add(self, seconds: float, now: float) -> bool:
        """One frame's figure; False (not taken) when it is no measurement (negative, not finite, over ``limit``)."""
        if not (math.isfinite(seconds) and 0 <= seconds <= self.limit):
            return False
        self.recent.append(seconds)
        self._stale = True
        self.samples += 1
        self.updated = now
        return True

    def copy(self) -> Overhead:
        return Overhead(self.value, self.samples, self.updated, deque(self.recent, maxlen=OVERHEAD_WINDOW), self.limit)


RECENT_SAMPLES = 8  # bandwidth samples a link keeps (LinkEstimate.recent_samples)
MAX_TAIL_SECONDS = 60.0  # a worker's tail beyond a minute per frame is no measurement
MAX_TAIL_SPLITS = 8  # splits a link keeps its worker's tail for (the least recent goes)


@dataclass
class LinkEstimate:
    """Bandwidth and RTT of one link (see the module docstring)."""

    options: EstimatorOptions = field(default_factory=EstimatorOptions)
    bandwidth: Figure = field(default_factory=Figure)
    rtt: Figure = field(default_factory=Figure)
    censored: int = 0  # deadline-missed frames whose upper bound said nothing new
    steps: int = 0  # steps declared on bandwidth or RTT
    # relative variance of the bandwidth samples about the estimate: an EWMA (weight ``alpha``) of
    # log(sample / estimate)**2, restarted by a step; the squared coefficient of variation of a frame's time
    # on the link (runtime.contracts.queueing); 0 until a second sample
    jitter: float = 0.0
    overhead: Overhead = field(default_factory=Overhead)  # the frame's time no modelled part holds, on this link
    unheld: Overhead = field(default_factory=Overhead)  # the overhead with the board runtime's own time, per frame
    tails: OrderedDict[str, Overhead] = field(default_factory=OrderedDict)  # by split: the worker's tail compute
    # the last bandwidth samples taken (newest last; a step's or a bound's figure included), bytes/s
    recent_samples: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_SAMPLES))
    # when (time.perf_counter()) the bytes of the latest answered frame had left the link's bottleneck, as its result
    # tells (runtime.agent.telemetry LinkEstimator._observe_link): a frame sent before then waited for them; 0: none
    uplink_free: float = 0.0

    def add_tail(self, split: str, seconds: float, now: float) -> bool:
        """The worker's tail time (its compute after ``split``) of one frame; True when taken."""
        fig = self.tails.pop(split, None) or Overhead(limit=MAX_TAIL_SECONDS)
        self.tails[split] = fig
        while len(self.tails) > MAX_TAIL_SPLITS:
            self.tails.popitem(last=False)
        return fig.add(seconds, now)

    def __post_init__(self) -> None:
        self._bw_steps = StepDetector(self.options)
        self._rtt_steps = StepDetector(self.options, down=False)
        self._probes: deque[float] = deque(maxlen=self.options.rtt_window)
        self._floor: deque[float] = deque(maxlen=max(self.options.rtt_window, self.options.rtt_floor_window))

    @property
    def last_sample(self) -> float:
        """The last bandwidth sample taken, bytes/s (0.0: none)."""
        return self.recent_samples[-1] if self.recent_samples else 0.0

    @property
    def rtt_floor(self) -> float:
        """The smallest of the last ``rtt_floor_window`` RTT probes, seconds (0.0: none); see the module docstring."""
        return min(self._floor) if self._floor else 0.0

    def add_bandwidth(self, bytes_per_second: float, now: float) -> float:
        """One bandwidth sample from a completed transfer; returns the new estimate."""
        if not (bytes_per_second > 0 and math.isfinite(bytes_per_second)):
            return self.bandwidth.value
        bw = self.bandwidth
        self.recent_samples.append(bytes_per_second)
        if bw.samples == 0:
            bw.value = bytes_per_second
        else:
            run = self._bw_steps.add(bytes_per_second, bw.value)
            if run is not None:
                bw.value = _geomean(run)
                self.steps += 1
                self.jitter = 0.0
            else:
                self.jitter = log_spread(self.jitter, bytes_per_second, bw.value, self.options.alpha, first=bw.samples == 1)
                keep = (1 - self.options.alpha) * 0.5 ** (max(0.0, bw.age(now)) / self.options.half_life_seconds)
                bw.value = (1 - keep) * bytes_per_second + keep * bw.value
        bw.samples += 1
        bw.updated = now
        return bw.value

    def add_censored(self, sent_bytes: int, elapsed: float, now: float) -> bool:
        """A frame of ``sent_bytes`` with no result after ``elapsed`` seconds: ``sent / (elapsed - rtt)``
        bounds the bandwidth from above. True when it was taken as a sample (below the estimate, or
        the link had none)."""
        bound = self.censored_bound(sent_bytes, elapsed)
        return bound is not None and self.add_upper_bound(bound, now)

    def censored_bound(self, sent_bytes: int, elapsed: float) -> float | None:
        """The upper bound (bytes/s) that ``sent_bytes`` not answered after ``elapsed`` s puts on the link
        (None when the time is within one round trip: no bound)."""
        network = elapsed - self.rtt.value
        if sent_bytes <= 0 or not network > 0:
            return None
        return sent_bytes / network

    def add_upper_bound(self, bound: float, now: float) -> bool:
        """The link carried less than ``bound`` bytes/s (a censored frame, a confirmed late frame, a probe
        that timed out). True when it was taken (below the estimate, or the link had none); a bound
        ``censored_step`` times below the estimate is a step on its own."""
        if not (bound > 0 and math.isfinite(bound)):
            return False
        if self.bandwidth.samples and bound >= self.bandwidth.value:
            self.censored += 1
            return False
        if self.bandwidth.samples and bound * self.options.censored_step < self.bandwidth.value:
            # hard evidence, not noise: the link cannot be as fast as the estimate says; a step at once
            self._bw_steps.reset()
            self.recent_samples.append(bound)
            self.bandwidth.value, self.bandwidth.updated = bound, now
            self.bandwidth.samples += 1
            self.steps += 1
            return True
        self.add_bandwidth(bound, now)
        return True

    def add_lower_bound(self, bound: float, now: float) -> bool:
        """The link carried at least ``bound`` bytes/s (a probe too quick to time its bytes: bytes / call
        time). Taken as a sample only when the link had none or it is above the estimate: a lower bound
        below the estimate says nothing (it is no evidence of a slower link). A bound ``censored_step``
        times above the estimate is a step on its own, as an upper bound that far below is: the link
        proved faster than the estimate can be (issue 11: after a step up from 0.1 to 50 Mbit/s the
        estimate took 3 probes, 2.6 s, to leave the slow band). True when taken."""
        if not (bound > 0 and math.isfinite(bound)):
            return False
        bw = self.bandwidth
        if bw.samples and bound <= bw.value:
            return False
        if bw.samples and bound > self.options.censored_step * bw.value:
            self._bw_steps.reset()
            self.recent_samples.append(bound)
            bw.value, bw.updated = bound, now
            bw.samples += 1
            self.steps += 1
            return True
        self.add_bandwidth(bound, now)
        return True

    def add_rtt(self, seconds: float, now: float) -> float:
        """One probe's round trip; returns the base RTT."""
        if not (seconds > 0 and math.isfinite(seconds)):
            return self.rtt.value
        if self._probes:
            run = self._rtt_steps.add(seconds, min(self._probes))
            if run is not None:  # the path got longer: forget the probes from before
                self._probes.clear()
                self._probes.extend(run[-self.options.rtt_window:])
                self.steps += 1
        self._probes.append(seconds)
        self._floor.append(seconds)
        self.rtt.value = min(self._probes)
        self.rtt.samples += 1
        self.rtt.updated = now
        return self.rtt.value


class LinkTable:
    """The agent's links by key (the worker's address), at most ``options.max_links``."""

    def __init__(self, options: EstimatorOptions | None = None):
        self.options = options or EstimatorOptions()
        self._links: OrderedDict[str, LinkEstimate] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._links

    def __iter__(self):
        return iter(list(self._links))

    def get(self, key: str) -> LinkEstimate | None:
        return self._links.get(key)

    def link(self, key: str) -> LinkEstimate:
        """The estimate of ``key``, made (unknown) if new; the least recently used beyond the bound goes."""
        est = self._links.get(key)
        if est is None:
            est = self._links[key] = LinkEstimate(self.options)
            while len(self._links) > self.options.max_links:
                self._links.popitem(last=False)
        self._links.move_to_end(key)
        return est

    def freshest(self, now: float) -> tuple[str, LinkEstimate] | None:
        """The link whose bandwidth was sampled last (None when none was)."""
        best = None
        for key, est in self._links.items():
            if est.bandwidth.samples and (best is None or est.bandwidth.updated > best[1].bandwidth.updated):
                best = (key, est)
        return best
