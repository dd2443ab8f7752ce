"""A plan's predicted latency, re-costed at the link the agent measures now (issue 11).

The planner issues a plan with the latency its cost model predicts at the link figures of that moment
(``Plan.breakdown_seconds``: per link ``rtt``, ``transfer`` = bytes / bandwidth, ``return``). A plan
kept across a bandwidth step (the same configuration stays best) is not issued again: plan versions
follow configurations and compute, not every move of the link. Its issued prediction then describes
another link. Each result line therefore carries the plan's prediction with the agent's own link terms
re-costed by the same model at the estimate the agent holds for that worker now (the figures it reports
to the planner)::

    predicted = issued - (rtt + transfer + return)_issued + rtt_now + bytes / bw_now + return_issued * bw_issued / bw_now
    bw_issued = bytes / transfer_issued          (bytes: Plan.predicted_bytes)

A fallback table's entry carries its bytes (planner.fallbacks.lean keeps them); a plan that has none
uses those the agent measured for its split and codec (runtime.agent.wirebytes). Only a plan with one
link (the agent's: no next hops, no parallel stage) is re-costed; a plan with none (local), an
unmeasured link or a figure missing keeps its issued prediction.

Two terms follow the workload rather than the plan alone (:func:`line`):

* **The frame's own bytes.** ``bytes`` above is a mean; a JPEG's size follows the picture (adapt_run's
  four photos: 7.7-16.7 KB, 62-134 ms apart at 1 Mbit/s, which alone put single frames 13 % around
  the plan's figure). A result line's prediction prices the bytes that frame put on the wire, known on
  the board before its transfer starts, at the same bandwidth: ``frame_bytes / bw_now``.
* **The link's queue.** At the camera's interval ``T`` (the agent's ``--fps``) the link is busy
  ``rho = (bytes / bw_now) / T`` of the time, and a frame waits for the one before it with the expected
  wait of runtime.contracts.queueing (Kingman, paced arrivals, the link's measured jitter as the
  service's variance; capped by the window; drop-limited at ``rho >= 1``). The plan's issued
  ``queue:link`` term (the planner's figure at the issued link) is replaced by the one at ``bw_now``; by the
  frame's own wait where the agent knows the frame sent on the link before it (:meth:`History.send`: its send,
  wait and bytes at ``bw_now``, as the board's wait is known from the frame ahead of it).
* **The link's overhead.** What a frame spends on its link outside the parts the planner measures and
  prices by themselves (its wait for the board thread, the worker's decode, queue and hand-offs:
  runtime.agent.telemetry.link_overhead; 3-5 ms of ResNet-18's 67 on adapt_run's quota-limited board,
  where the plan held 0.9 ms of decode) is measured per link (runtime.agent.estimator.Overhead: the
  median of the last 16 frames, with their count and age). From OVERHEAD_MIN_SAMPLES frames on it
  replaces the plan's issued ``decode:*`` and ``queue:board``, the terms the planner prices it in
  (planner.compute.LinkOverhead); unknown, the issued terms stand.
* **The link's worker and the board's encode.** As a local plan is re-costed at the board the agent measures,
  an offloading one is at the worker it measures on that link: the issued compute of the receiving tier by
  the worker's tail after the frame's split (the median of its last 16 frames there), and the issued
  ``encode:*`` (which holds the planner's figure of the board runtime's own time), ``decode:*`` and
  ``queue:board`` by the board's measured encode for that split and codec plus the link's ``unheld`` time (its
  overhead with the runtime's own time, the median of their sum per frame: under a CPU quota the runtime's
  time is 0.3 ms for most frames and 6-8 ms for a third of them, and a median of each apart left lines 5-8 %
  under the measured latency) (medians past the configuration's start-up). The planner follows the same drifts only through its factors, re-issued at most every 10 s
  (planner.refresh); a worker shared with other jobs moved 38 -> 60 -> 38 ms within one phase (adapt_run
  fedback9), and lines that kept the issued tail were 15-20 % off.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from runtime.agent.estimator import Figure, Overhead, log_spread
from runtime.contracts.queueing import DEFAULT_WINDOW, expected_wait
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb


@dataclass(frozen=True)
class Prediction:
    seconds: float  # as issued
    bytes: int = 0  # on the agent's link per frame (0: not in the plan)
    rtt: float = 0.0  # the issued link terms (seconds)
    transfer: float = 0.0
    ret: float = 0.0
    queue: float = 0.0  # the issued wait for the link (``queue:link``; planner.workload)
    local: bool = False  # a local plan (every block on the board)
    decode: float = 0.0  # the issued ``decode:*`` (with the planner's figure of the link's overhead in it) ...
    board_wait: float = 0.0  # ... and ``queue:board``: what the link's measured overhead stands for (:meth:`now`)
    encode: float = 0.0  # the issued ``encode:*`` (the board runtime's own time in it): measured encode + unheld
    edge: float = 0.0  # the issued compute of the receiving tier: the worker's measured tail

    @classmethod
    def of(cls, plan: ppb.Plan) -> Prediction:
        terms = {k.partition(":")[0]: v for k, v in plan.breakdown_seconds.items() if k.startswith(("rtt:", "transfer:",
                                                                                                    "return:", "decode:"))}
        if (not plan.worker_address or plan.next_hops or plan.parallel.worker_addresses
                or terms.get("transfer", 0.0) <= 0 or len([k for k in plan.breakdown_seconds if k.startswith("transfer:")]) != 1):
            return cls(plan.predicted_seconds, local=not plan.worker_address and plan.split_id == "output")
        hop = next(k for k in plan.breakdown_seconds if k.startswith("transfer:")).partition(":")[2]
        b = plan.breakdown_seconds
        return cls(plan.predicted_seconds, plan.predicted_bytes, terms.get("rtt", 0.0), terms["transfer"],
                   terms.get("return", 0.0), b.get("queue:link", 0.0), decode=terms.get("decode", 0.0),
                   board_wait=b.get("queue:board", 0.0), encode=b.get(f"encode:{hop}", 0.0),
                   edge=b.get("compute:" + hop.partition("->")[2], 0.0))

    def measured(self, link: Any, split: str, encode: float) -> float:
        """The change to the issued figure that the link's measured figures make (each from OVERHEAD_MIN_SAMPLES
        frames on; 0 where unknown): its worker's tail after ``split`` for the issued compute there; with
        ``encode`` (the board's measured encode, 0: unknown), that encode and the link's ``unheld`` time (its
        overhead with the board runtime's own time, the median of their sum per frame) for the issued encode,
        decode and board wait; without, its overhead for the issued decode and board wait."""
        out = 0.0
        tail = getattr(link, "tails", {}).get(split)
        if tail is not None and tail.samples >= OVERHEAD_MIN_SAMPLES and self.edge > 0:
            out += tail.value - self.edge
        ov, unheld = getattr(link, "overhead", None), getattr(link, "unheld", None)
        if encode > 0 and self.encode > 0 and unheld is not None and unheld.samples >= OVERHEAD_MIN_SAMPLES:
            out += encode + unheld.value - self.encode - self.decode - self.board_wait
        elif ov is not None and ov.samples >= OVERHEAD_MIN_SAMPLES:
            out += ov.value - self.decode - self.board_wait
        return out

    def now(self, link: Any, measured_bytes: float = 0.0, *, frame_bytes: int = 0, interval: float = 0.0,
            window: int = DEFAULT_WINDOW, split: str = "", encode: float = 0.0, link_wait: float | None = None) -> float:
        """Re-costed at ``link`` (a runtime.agent.estimator.LinkEstimate or :class:`LinkView`, or None: as issued);
        ``measured_bytes``: the agent's mean for the configuration (the plan's bytes when it carries none);
        ``frame_bytes``: the frame's own bytes on the wire (0: the mean); ``interval``: the source's frame
        interval in seconds (0: unknown, no queue term); ``window``: frames in flight; ``split`` and ``encode``:
        the frame's split and the board's measured encode for it (:meth:`measured`); ``link_wait``: the frame's own
        wait behind the frames ahead on the link when the agent knows it (:meth:`History.send`), for the expected one."""
        if link is None or self.transfer <= 0:
            return self.seconds
        seconds = self.seconds + self.measured(link, split, encode)
        size = self.bytes or measured_bytes
        if size <= 0 or not link.bandwidth.samples or link.bandwidth.value <= 0:
            return seconds
        bw = link.bandwidth.value
        issued_bw = size / self.transfer
        rtt = link.rtt.value if link.rtt.value > 0 else self.rtt
        mean = measured_bytes or size  # the workload's bytes per frame: what keeps the link busy
        if link_wait is None:
            link_wait = expected_wait(mean / bw, interval, getattr(link, "jitter", 0.0), window=window).seconds
        own = frame_bytes if frame_bytes > 0 else size
        return float(seconds - self.rtt - self.transfer - self.ret - self.queue
                     + rtt + own / bw + self.ret * issued_bw / bw + link_wait)


OVERHEAD_MIN_SAMPLES = 3  # frames behind a link's overhead before a line uses it (runtime.agent.estimator.Overhead)
BOARD_MIN_SAMPLES = 3  # local frames behind the board's figures before a line re-costs a local plan with them
MAX_BEFORE = 256  # frames whose "before" figures are kept for their result line (the oldest go first)


@dataclass(frozen=True)
class LinkView:
    """A link estimate's figures as they stood (runtime.agent.estimator.LinkEstimate's shape; an overhead as its
    :class:`Figure`: its value, samples and time, without its window of recent samples)."""

    bandwidth: Figure
    rtt: Figure
    jitter: float
    overhead: Figure = dataclasses.field(default_factory=Overhead)
    unheld: Figure = dataclasses.field(default_factory=Overhead)
    tails: dict[str, Figure] = dataclasses.field(default_factory=dict)


def _snap(fig: Figure) -> Figure:
    """``fig``'s value, samples and time as they stand now."""
    return Figure(fig.value, fig.samples, fig.updated)


@dataclass
class Board:
    """The local configuration's time on the board per frame, as the agent measured it: the EWMA (weight
    ALPHA) of ``head + local_tail`` (the board's service), its relative variance (``cs2``: the EWMA of
    log(sample / mean)**2, runtime.agent.estimator.log_spread, as a link's jitter), and the runtime's own
    time around it (runtime.agent.telemetry.runtime_overhead); with the samples behind them and the time
    of the last one (``updated``, the agent's monotonic clock; -inf: none)."""

    service: float = 0.0
    cs2: float = 0.0
    overhead: float = 0.0
    samples: int = 0
    updated: float = -math.inf

    def add(self, service: float, overhead: float, alpha: float = 0.3, now: float | None = None) -> None:
        if not (service > 0 and math.isfinite(service) and math.isfinite(overhead)):
            return
        if self.samples == 0:
            self.service, self.overhead = service, max(0.0, overhead)
        else:
            self.cs2 = log_spread(self.cs2, service, self.service, alpha, first=self.samples == 1)
            self.service = alpha * service + (1 - alpha) * self.service
            self.overhead = alpha * max(0.0, overhead) + (1 - alpha) * self.overhead
        self.samples += 1
        self.updated = time.monotonic() if now is None else now


@dataclass(frozen=True)
class Before:
    """What the agent held at a moment: the link estimate of its current link (``key``) and the board's figures."""

    key: str
    link: LinkView | None
    board: Board
    encode: tuple[str, str, float] = ("", "", 0.0)  # (split, codec, the board's measured encode) of the last frame sent


@dataclass(frozen=True)
class Timing:
    """A frame on the agent's monotonic clock: its arrival (the result's time less its ``total``), when its
    result came, and when the board took it (its arrival, or the previous frame's result if later)."""

    arrival: float
    finish: float
    start: float


@dataclass(frozen=True)
class Send:
    """A frame handed to a link: the link, when (time.perf_counter()), its bytes, and its wait behind the frames
    ahead of it there (:meth:`History.send`)."""

    key: str
    at: float
    nbytes: int
    wait: float | None  # None: the link's bandwidth was not known when it was sent


class History:
    """What the agent held after each frame's result (:class:`Before`, by time) and each frame's :class:`Timing`
    (by seq), the last MAX_BEFORE of each: a result line is predicted from what was known at its frame's
    arrival, never from the frame itself or a frame that ended after it arrived."""

    def __init__(self) -> None:
        self.states: deque[tuple[float, Before]] = deque(maxlen=MAX_BEFORE)
        self.timings: OrderedDict[int, Timing] = OrderedDict()
        self.sends: OrderedDict[int, Send] = OrderedDict()

    def frame(self, seq: int, total: float, now: float) -> None:
        arrival = now - max(0.0, total)
        prev = self.timings.get(seq - 1)
        self.timings[seq] = Timing(arrival, now, max(arrival, prev.finish) if prev is not None else arrival)
        while len(self.timings) > MAX_BEFORE:
            self.timings.popitem(last=False)

    def send(self, seq: int, key: str, at: float, nbytes: int, bandwidth: float) -> float | None:
        """Frame ``seq``, handed to link ``key`` at ``at`` with ``nbytes``: its wait behind the frames ahead on that
        link from what was known when it was sent (Lindley's recursion): the frame sent on that link before it left
        its bytes there from its own send and wait on, ``nbytes / bandwidth`` seconds (``bandwidth``: the link's
        estimate then, bytes/s). The link is one queue per direction: a frame's result does not hold the next frame's
        bytes up. None without an estimate (the send is kept: the frames after it wait for it, its own wait taken
        from the frames ahead of it at their bandwidth); 0.0 when no frame ahead on the link is known. A link
        offered slightly more than it carries (12.9 KB JPEG frames once a second at 0.1 Mbit/s) queues a little
        more each frame until the pacing drops one: 0 to 0.57 s, which one expected wait for every frame priced
        as 0.57-1.4 s (the dynamic trace, DenseNet-169, 3795672)."""
        wait: float | None = None
        if bandwidth > 0 and math.isfinite(bandwidth):
            chain: list[Send] = []  # the frames ahead on the link back to the latest whose wait is known, newest first
            for ahead in reversed(self.sends.values()):
                if ahead.key == key and ahead.at < at:
                    chain.append(ahead)
                    if ahead.wait is not None:
                        break
            free = 0.0  # when the bytes of the frame before it had left the link
            for ahead in reversed(chain):
                free = (ahead.at + ahead.wait if ahead.wait is not None else max(ahead.at, free)) + ahead.nbytes / bandwidth
            wait = max(0.0, free - at)
        self.sends[seq] = Send(key, at, nbytes, wait)
        while len(self.sends) > MAX_BEFORE:
            self.sends.popitem(last=False)
        return wait

    def link_wait(self, seq: int) -> float | None:
        """Frame ``seq``'s wait for its link (:meth:`send`); None when not known."""
        sent = self.sends.get(seq)
        return sent.wait if sent is not None else None

    def take(self, now: float, key: str, link: Any, board: Board, encode: tuple[str, str, float] = ("", "", 0.0)) -> None:
        """The figures after a frame: each as a :class:`Figure` (value, samples, time), which is all a line reads;
        an overhead's window of recent samples is not copied (it was: 5.9 us of 20 a frame in telemetry, issue 14)."""
        view = None if link is None else LinkView(_snap(link.bandwidth), _snap(link.rtt), link.jitter,
                                                   _snap(link.overhead), _snap(link.unheld),
                                                   {k: _snap(v) for k, v in link.tails.items()})
        b = board
        self.states.append((now, Before(key, view, Board(b.service, b.cs2, b.overhead, b.samples, b.updated), encode)))

    def at(self, t: float) -> Before | None:
        """The figures as they stood at ``t`` (None: none that old is kept). From the newest back: a frame's
        arrival is a few results old, and each frame's line and its send (:meth:`send`) ask for it."""
        for when, state in reversed(self.states):
            if when <= t:
                return state
        return None

    def board_wait(self, seq: int, service: float) -> float | None:
        """Frame ``seq``'s wait for the board from the state at its arrival (Lindley's recursion): the frame ahead
        of it, still on the board when it arrived, took the board at a known time and holds it ``service``
        seconds; 0 when the board was free; None when the frames' timings are not known."""
        me, ahead = self.timings.get(seq), self.timings.get(seq - 1)
        if me is None or ahead is None:
            return None
        if ahead.finish <= me.arrival:
            return 0.0
        before = self.timings.get(seq - 2)
        if before is not None and before.finish > me.arrival:
            return None  # two frames ahead: beyond this recursion (the window is larger than 2)
        return max(0.0, ahead.start + service - me.arrival)


def line(p: Prediction, estimator: Any, result: Any) -> float:
    """The prediction a result line carries for ``result`` (a FrameResult) under ``p``, by ``estimator`` (the
    agent's runtime.agent.telemetry.LinkEstimator): its link estimate and board figures as they stood when the
    frame arrived (:class:`History`), measured bytes and source interval.

    A local plan (``p.local``) is re-costed at the board the agent measures, as an offloading one is at the
    link: the board's service (``head + local_tail``, its EWMA) and the runtime's own time around it, plus the
    frame's wait for the board: from the state at its arrival when the agent knows it (the frame ahead of it
    took the board at a known time; :meth:`History.board_wait`), else its expected value at the source's
    interval with the service's measured variance (Kingman; drop-limited at a utilisation >= 1:
    runtime.contracts.queueing). The planner prices the same configuration with its device slowdown factor
    and the expected wait (planner.compute), re-issued only when 10 % stale and at most every 10 s; at
    --fps 4 a quota-limited board sits near utilisation 1, where a 10 % slower board turns no wait into
    130 ms, and a saturated one's wait runs from 0 to a whole head time frame by frame."""
    timing = estimator.history.timings.get(result.seq)
    before = estimator.history.at(timing.arrival) if timing is not None else None
    if not result.worker:
        board = before.board if before is not None else estimator.board
        if not (p.local and result.where == "local" and result.split == "output" and board.samples >= BOARD_MIN_SAMPLES):
            return p.seconds
        wait = estimator.history.board_wait(result.seq, board.service)
        if wait is None:
            wait = expected_wait(board.service, estimator.frame_interval, board.cs2, window=estimator.frame_window).seconds
        return float(board.service + board.overhead + wait)
    link = before.link if before is not None and before.key == result.worker else estimator.links.get(result.worker)
    encode = before.encode[2] if before is not None and before.encode[:2] == (result.split, result.codec) else 0.0
    return p.now(link, estimator.wire.mean(result.split, result.codec),
                 frame_bytes=int(getattr(result, "wire_bytes", 0) or 0), interval=estimator.frame_interval,
                 window=estimator.frame_window, split=result.split, encode=encode,
                 link_wait=estimator.history.link_wait(result.seq))
