"""What the agent measures about its link to the worker, for the planner.

* Bandwidth (bytes/s) from real frame transfers, not from synthetic bulk tests: for an edge frame
  of ``b`` wire bytes, the time the bytes spent on the network is the whole send-to-result time
  minus what the worker reports it spent (queue, decode, tail, and for a chained frame the wait on
  its next tier) minus one round trip of latency::

      network = transfer_edge - edge_queue - edge_decode - edge_tail - edge_forward - rtt
      (with ``edge_held``, the worker's time from the frame's last byte to its result leaving, on
      its own clock, in place of the four worker stages: it also covers admission and send waits)
      sample  = (b + r) / network  (only when network > 0 and b >= min_bytes)

  Frames under ``min_bytes`` (default 8 KiB) are skipped: on them the transfer takes about one
  round trip plus gRPC's per-message overhead, so ``network`` is mostly timer noise and a single
  small frame would report an absurd figure. ``r`` is the result's bytes as the worker sends them
  back (the output tensor's; ResNet-18's 1000 fp32 logits are 4 KB, 32 ms at 1 Mbit/s): the network
  time holds its way back too, and the planner prices that return at the same bandwidth
  (runtime.contracts.costmodel), so leaving it out made the link look 20 % slower than it was with
  15 KB JPEG frames and the return was counted twice in predictions (issue 11).
* A frame sent while the bytes of the one ahead were still on the link waits for them: its ``network``
  holds that wait, which is the link's queue, not its rate. The answered frame ahead tells when its last
  byte left the bottleneck (its send time plus ``transfer_edge``, less its hold, one round trip and its
  result's bytes at the estimate), and the wait of a frame sent before then is taken off its ``network``.
  A link offered slightly more than it carries (DenseNet-169's 12.9 KB JPEG frames once a second on
  0.1 Mbit/s, the dynamic trace) queues a little more each frame; without this its estimate fell from
  12.0 to 9.5 KB/s over 14 frames while the link carried 12.5, and the result lines' queue term with it.
* RTT (seconds) from small probes on the same channel (``grpc.health.v1.Health/Check``, which
  every worker serves): same connection, same HTTP/2 path, negligible server work. The estimate is
  the *base* RTT, the smallest of the last ``rtt_window`` probes (default 8), not their average:
  on a busy link a probe waits in the link's queue behind the frames still being sent, so a
  probe measures the agent's own queueing as well. Subtracting that from ``transfer_edge`` made
  the bandwidth of a saturated slow link look several times faster than it was (and unbounded as
  the probe's wait approached the frame's), and the planner, which prices the transfer as
  ``bytes / bandwidth`` already, would count the queueing twice. Queueing only ever adds to a
  probe, so the minimum is the propagation part (as in BBR's min-RTT filter); a lasting change of
  the path shows after ``rtt_window`` probes.
* Per link: the figures are kept per worker address (``FrameResult.worker``; the key "" for a
  frame that names none) in a :class:`runtime.agent.estimator.LinkTable`, so a new worker starts
  unknown instead of inheriting the old worker's figures. The properties below read the link the
  agent uses now (:meth:`LinkEstimator.use`).
* Smoothing, ageing, censored samples (a frame that missed its deadline bounds the bandwidth from
  above: :meth:`LinkEstimator.observe_censored`) and the step detector are
  runtime.agent.estimator's; a probe sent while frames were in flight on the link can lower the
  base RTT but never declare a step (its queueing is not the path's).
* Stage medians and the frame count since the last report (``take_report``).

The reports built from these figures for the planner, and when they go (``ReportCadence``), are
runtime.agent.telemetry_report's.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from runtime.agent.estimator import EstimatorOptions, LinkEstimate, LinkTable
from runtime.agent.metrics import AgentMetrics
from runtime.agent.prediction import Board, History
from runtime.agent.wirebytes import WireTable
from runtime.contracts.errors import EdgesplitError
from runtime.contracts.queueing import DEFAULT_WINDOW
from runtime.wire.stream import time_health_check

MIN_BANDWIDTH_BYTES = 8 * 1024  # smaller frames say nothing about bandwidth (see the module docstring)
ALPHA = EstimatorOptions.alpha  # EWMA weight of a new sample on a fresh estimate
RTT_WINDOW = EstimatorOptions.rtt_window  # probes the base RTT is the minimum of
UNCONFIRMED_LATE = 8.0  # a late frame no probe checked counts only this many times late (see observe_late)
MAX_STAGE_SAMPLES = 4096  # per stage between reports; beyond that the oldest are dropped
OVERHEAD_WARMUP = 3  # a configuration's first frames give no overhead or encode sample (LinkEstimator.observe_overhead)
LINK_OVERHEAD_MIN_SAMPLES = 3  # frames behind a link's overhead before it is reported (stage ``link_overhead``)


class LinkEstimator:
    """Bandwidth and RTT per link to a worker, and per-stage medians since the last report."""

    def __init__(self, metrics: AgentMetrics | None = None, *, alpha: float = ALPHA,
                 min_bytes: int = MIN_BANDWIDTH_BYTES, rtt_window: int = RTT_WINDOW,
                 options: EstimatorOptions | None = None, clock: Callable[[], float] = time.monotonic):
        self.metrics = metrics
        self.min_bytes = min_bytes
        self.clock = clock
        self.links = LinkTable(options or EstimatorOptions(alpha=alpha, rtt_window=rtt_window))
        self.current = ""  # the link (worker address) the agent's plan uses now; "" = none named
        # called with (link, bandwidth estimate) after every bandwidth figure (runtime.agent.fallbacks)
        self.listeners: list[Callable[[str, float], None]] = []
        # called with (link, upper bound) for every upper bound taken as evidence: a frame past its deadline
        # or broken, a late frame a probe confirmed, a probe that timed out (runtime.agent.fallbacks)
        self.bound_listeners: list[Callable[[str, float], None]] = []
        # set by the prober (runtime.agent.prober.Prober.confirm): a late frame's bound is checked by a probe
        # before it counts; None: taken only when UNCONFIRMED_LATE times late (runtime.agent.inflight)
        self.confirm: Callable[[str, float], None] | None = None
        # network calls timed on this loop now (the prober's, probe_rtt's): meanwhile no frame's long board work holds
        # the loop, which would lengthen them (Agent._board_inline, runtime.agent.boardplace)
        self.timing = 0
        self._stages: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=MAX_STAGE_SAMPLES))
        self._stages_plan: int | None = None  # the plan version the stage samples were taken under (None: unguarded)
        self._frames = 0
        self.overhead_warmup = OVERHEAD_WARMUP
        self._overhead_run: tuple[tuple[str, str, str, str], int] = (("", "", "", ""), 0)  # configuration, frames in it
        self._warming = False  # the frame observed last is one of its configuration's first ``overhead_warmup``
        self.wire = WireTable(clock)  # bytes per frame and encode time per (split, codec), for the planner
        # the source's workload (set by the agent's run loop from --fps and --window): its frame interval in
        # seconds (0: unpaced or unknown) and the frames it keeps in flight; reported to the planner as
        # ``source_interval`` / ``source_window`` and used by the result lines' queue term (runtime.agent.prediction)
        self.frame_interval = 0.0
        self.frame_window = DEFAULT_WINDOW
        self.board = Board()  # the local configuration's time on the board (runtime.agent.prediction)
        self.history = History()  # each frame's link and board figures before its own were taken, for its line
        # whether observe() keeps that history: only the planner link's result lines read it (runtime.agent.prediction);
        # the agent turns it off until a planner link attaches (~25 us a frame on the loop, issue 14)
        self.keep_history = True
        if metrics is not None:
            metrics.registry.register(_LinkCollector(self))
            # read at scrape time, not set on every sample (two locked gauge writes a frame; issue 14)
            metrics.link_bandwidth.set_function(lambda: self.bandwidth_bytes_per_second)
            metrics.link_rtt.set_function(lambda: self.rtt_seconds)

    def use(self, key: str) -> None:
        """The agent now sends to ``key`` (a worker address): the properties and gauges follow it."""
        self.current = key

    def estimate(self, key: str | None = None) -> LinkEstimate:
        """The estimate of link ``key`` (default: the current one); unknown (no samples) if never measured."""
        return self.links.link(self.current if key is None else key)

    @property
    def bandwidth_bytes_per_second(self) -> float:
        """Smoothed bandwidth of the current link; 0.0 = unknown (no frame big enough yet)."""
        est = self.links.get(self.current)
        return est.bandwidth.value if est is not None else 0.0

    @property
    def rtt_seconds(self) -> float:
        """Base round trip of the current link (smallest of the recent probes); 0.0 = unknown."""
        est = self.links.get(self.current)
        return est.rtt.value if est is not None else 0.0

    def observe(self, result: Any, plan: int | None = None, now_plan: int | None = None) -> None:
        """Take one finished frame (a FrameResult): its stage times, and a bandwidth sample if it
        ran on the edge with enough bytes and a positive network time. ``plan``: the plan version the frame ran
        under as telemetry names it, ``now_plan`` the one the agent's reports name now (runtime.agent.client
        ``telemetry_plan_version``): a frame of another plan gives no stage sample (see :meth:`_follow_plan`)."""
        self._frames += 1
        now = self.clock()
        if self.keep_history:
            self.history.frame(result.seq, result.times.get("total", 0.0), now)
        self._follow_plan(now_plan)
        if plan is None or now_plan is None or plan == now_plan:
            for stage, seconds in result.times.items():
                self._stages[stage].append(seconds)
        other = self.observe_overhead(result)
        self.wire.observe(result, encode=not self._warming)  # a start-up frame's encode is no figure of the board's
        if other is not None and result.where == "local" and result.split == "output":  # the local plan's board
            self.board.add(result.times.get("head", 0.0) + result.times.get("local_tail", 0.0), other, now=now)
        self._observe_link(result)
        if other is not None:
            self.observe_link_overhead(result, now, other)
        if self.keep_history:
            worker = getattr(result, "worker", "") or self.current
            if result.where == "edge" and getattr(result, "sent_at", 0.0) > 0:
                self._history_send(result, worker)
            self.history.take(now, worker, self.links.get(worker) if worker else None, self.board, self._encode(result))

    def _history_send(self, result: Any, worker: str) -> None:
        """The frame's send into the history (runtime.agent.prediction.History.send), at the link's bandwidth as
        it stood when the frame arrived (what its result line is predicted from; none then: no wait known)."""
        before = self.history.at(self.history.timings[result.seq].arrival)  # History.frame took its arrival
        link = before.link if before is not None and before.key == worker else None
        bw = link.bandwidth.value if link is not None and link.bandwidth.samples else 0.0  # 0: not known then
        self.history.send(result.seq, worker, result.sent_at, result.wire_bytes, bw)

    def _encode(self, result: Any) -> tuple[str, str, float]:
        """(split, codec, the board's measured encode: the median of the configuration's recent frames past its
        start-up, 0.0 under OVERHEAD_MIN_SAMPLES of them) of ``result``'s configuration, for the result lines."""
        entry = self.wire.entries.get((result.split, result.codec))
        if entry is None or len(entry.encodes) < LINK_OVERHEAD_MIN_SAMPLES:
            return (result.split, result.codec, 0.0)
        return (result.split, result.codec, entry.encode_seconds)

    def _observe_link(self, result: Any) -> None:
        t = result.times
        if result.where != "edge" or result.wire_bytes < self.min_bytes or "transfer_edge" not in t:
            return
        key = getattr(result, "worker", "")
        held = t.get("edge_held")  # the worker's whole hold from its receive/send times (runtime.agent.edge), if it told
        if held is None:
            held = t.get("edge_queue", 0.0) + t.get("edge_decode", 0.0) + t.get("edge_tail", 0.0) + t.get("edge_forward", 0.0)
        est = self.estimate(key)
        network = t["transfer_edge"] - held - est.rtt.value  # its bytes up and down, and its wait behind the frame ahead
        sent = getattr(result, "sent_at", 0.0)
        wait = max(0.0, est.uplink_free - sent) if sent > 0 else 0.0
        down = result_bytes(result)
        if network - wait > 0:
            self.add_bandwidth_sample((result.wire_bytes + down) / (network - wait), key)
        bw = est.bandwidth.value
        if sent > 0 and bw > 0:  # when its last byte left the link's bottleneck: the next frame's bytes wait till then
            est.uplink_free = max(est.uplink_free, sent + network - down / bw)

    def observe_overhead(self, result: Any) -> float | None:
        """The frame's runtime overhead (:func:`runtime_overhead`) as stage ``overhead_local``/``overhead_edge``,
        except for the first ``overhead_warmup`` frames of a configuration (where, split, codec, worker) after
        start-up or a switch: they carry the start-up's and the switch's one-off costs (the first local frame
        of an adapt_run 111 ms against 8-9 ms after; issue 11). The first report can hold only a few frames,
        and the planner's estimate, set by its first sample, kept ~60 ms per local frame through a 40 s
        offloaded phase, so the next local phase was predicted 15-25 % slow."""
        other = runtime_overhead(result)
        self._warming = False
        if other is None:
            return None
        key = (result.where, result.split, result.codec, getattr(result, "worker", ""))
        run, count = self._overhead_run
        count = count + 1 if key == run else 1
        self._overhead_run = (key, count)
        self._warming = count <= self.overhead_warmup
        if self._warming:
            return None
        self._stages[f"overhead_{result.where}"].append(other)
        return other

    def observe_link_overhead(self, result: Any, now: float, other: float | None = None) -> bool:
        """An offloaded frame's time on its link that none of the model's measured parts holds, into that link's
        :class:`runtime.agent.estimator.Overhead` (:func:`link_overhead`), with the board runtime's own time into
        its ``unheld``, and its worker's tail into its ``tails``; True when taken. A configuration's first frames
        give none (:meth:`observe_overhead`). ``other``: the frame's :func:`runtime_overhead` when the caller has
        it (computed here otherwise)."""
        seconds = link_overhead(result)
        key = getattr(result, "worker", "")
        if seconds is None or not key:
            return False
        est = self.estimate(key)
        if other is None:
            other = runtime_overhead(result)
        if other is not None:
            est.unheld.add(seconds + other, now)
        est.add_tail(result.split, result.times["edge_tail"], now)
        return est.overhead.add(seconds, now)

    def observe_censored(self, key: str, sent_bytes: int, elapsed: float) -> bool:
        """A frame with no result after ``elapsed`` s, ``sent_bytes`` being its own bytes plus those the
        agent had in flight ahead of it on that link: an upper bound of the bandwidth (see
        runtime.agent.estimator). True when it moved the estimate."""
        bound = self.estimate(key).censored_bound(sent_bytes, elapsed)
        return bound is not None and self.observe_upper_bound(key, bound)

    def observe_upper_bound(self, key: str, bound: float) -> bool:
        """Link ``key`` carried less than ``bound`` bytes/s: into its estimate (a step at once when far
        below), and to the bound listeners (the band switch: a bound below the running band is proof
        enough). True when it moved the estimate."""
        est = self.estimate(key)
        taken = est.add_upper_bound(bound, self.clock())
        for listener in list(self.bound_listeners):  # first: a switch on proof also gives up the frames in flight
            listener(key, bound)
        if taken:
            self._notify(key, est.bandwidth.value)
        return taken

    def observe_late(self, key: str, bound: float, lateness: float) -> bool:
        """A frame still in flight on ``key`` ``lateness`` times later than its estimate says, which bounds
        the link by ``bound`` bytes/s (runtime.agent.inflight). A worker that stalls makes frames late
        too, so with a prober the bound counts only once a probe confirms the link is that slow
        (:attr:`confirm`); without one, only a frame ``UNCONFIRMED_LATE`` times late counts, as an
        ordinary sample (two in a row make a step). True when the frame was dealt with (handed to the
        prober, or taken); False: look at it again later."""
        if self.confirm is not None:
            self.confirm(key, bound)
            return True
        if lateness >= UNCONFIRMED_LATE:
            self.add_bandwidth_sample(bound, key)
            return True
        return False

    def add_lower_bound_sample(self, bytes_per_second: float, key: str) -> bool:
        """Link ``key`` carried at least this (runtime.agent.estimator.LinkEstimate.add_lower_bound)."""
        est = self.estimate(key)
        taken = est.add_lower_bound(bytes_per_second, self.clock())
        if taken:
            self._notify(key, est.bandwidth.value)
        return taken

    def add_bandwidth_sample(self, bytes_per_second: float, key: str | None = None) -> None:
        value = self.estimate(key).add_bandwidth(bytes_per_second, self.clock())
        self._notify(self.current if key is None else key, value)

    def _notify(self, key: str, value: float) -> None:
        for listener in list(self.listeners):
            listener(key, value)

    def add_rtt_sample(self, seconds: float, key: str | None = None, *, queued: bool = False) -> None:
        """One probe; ``queued``: frames were in flight on the link, so it may lower the base RTT but
        never declare a step."""
        est = self.estimate(key)
        if queued and est.rtt.samples and seconds >= est.rtt.value:
            return
        est.add_rtt(seconds, self.clock())


    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """A network call timed on this loop meanwhile (``timing``): no frame's long board work holds it then."""
        self.timing += 1
        try:
            yield
        finally:
            self.timing -= 1

    async def probe_rtt(self, target: Any, timeout: float = 1.0, key: str | None = None,
                        *, queued: bool = False) -> float | None:
        """Time one small unary call and add it to link ``key``'s RTT; returns the sample, or None
        when the peer did not answer (the estimate is then left as it was).

        ``target``: a ``grpc.aio.Channel``, or an object with ``async probe_rtt(timeout)`` (the
        agent's EdgeStream, which probes over the channel its frames use).
        """
        try:
            with self.timed():  # as the prober's calls
                if isinstance(target, grpc.aio.Channel):
                    seconds = await time_health_check(target, timeout)
                else:
                    seconds = await target.probe_rtt(timeout)
        except (EdgesplitError, grpc.RpcError):
            return None
        if seconds is None:
            return None
        self.add_rtt_sample(seconds, key, queued=queued)
        return seconds

    @property
    def frames_pending(self) -> int:
        """Frames observed since the last :meth:`take_report`."""
        return self._frames

    def _follow_plan(self, now_plan: int | None) -> None:
        """Keep the stage samples of one plan only: the planner reads a report's head against the plan its version
        names, so the samples of the plan before are dropped when the agent's plan changes (a frame's 308 ms head
        under the first plan, reported under the next, a local plan, read as a board 6x faster than profiled: the
        dynamic trace, 2026-12-05). ``None``: the caller names no plan, nothing is dropped."""
        if now_plan is not None and now_plan != self._stages_plan:
            self._stages.clear()
            self._stages_plan = now_plan

    def take_report(self, now_plan: int | None = None) -> tuple[dict[str, float], int]:
        """``(median seconds by stage, frames)`` since the previous call; resets both. ``now_plan``: the plan version
        the report names (stage samples of another plan are dropped, :meth:`_follow_plan`)."""
        self._follow_plan(now_plan)
        medians = {stage: statistics.median(v) for stage, v in self._stages.items() if v}
        if self.frame_interval > 0 and medians:  # the workload, for the planner's queue terms (planner.compute.Overhead)
            medians["source_interval"], medians["source_window"] = self.frame_interval, float(self.frame_window)
            est = self.links.get(self.current)
            if est is not None and est.bandwidth.samples >= 2:  # the link's jitter: its service's variance
                medians["link_cv2"] = est.jitter
        est = self.links.get(self.current) if self.current else None
        if medians and est is not None and est.overhead.samples >= LINK_OVERHEAD_MIN_SAMPLES:  # planner.compute.LinkOverheads
            ov = est.overhead
            medians["link_overhead"] = ov.value
            medians["link_overhead_samples"] = float(ov.samples)
            medians["link_overhead_age"] = max(0.0, ov.age(self.clock()))
        frames, self._frames = self._frames, 0
        self._stages.clear()
        return medians, frames


def result_bytes(result: Any) -> int:
    """Bytes of a frame's result as the worker returns it: its output tensor's (0 when it has none)."""
    out: Any = getattr(result, "output", None)
    try:
        return int(out.numel() * out.element_size())
    except AttributeError:
        return 0


BOARD_STAGES = ("board_queue", "head", "tl_encode", "encode", "transfer_edge", "local_tail", "refine")


def runtime_overhead(result: Any) -> float | None:
    """A frame's time on the board outside the stages it times (``total`` less them): the runtime's own
    cost (executor hand-offs, gRPC, the event loop), reported as stage ``overhead_local`` or
    ``overhead_edge`` (issue 11: 10-50 ms per local frame on a quota-limited board, which no profile
    holds; the planner adds it to the configurations of that kind, planner.compute.Overhead). None
    when the frame has no total, or ran locally though its plan sent it (a fallback: its wait is no overhead)."""
    t: dict[str, float] = result.times
    if "total" not in t or not (result.where == "edge" or (result.where == "local" and result.split == "output")):
        return None
    timed = 0.0
    for stage in BOARD_STAGES:
        timed += t.get(stage, 0.0)
    return max(0.0, t["total"] - timed)


def link_overhead(result: Any) -> float | None:
    """An offloaded frame's time that none of the model's measured parts holds (issue 11): its wait for the board
    (``board_queue``) and the worker's hold beyond its tail (``edge_held - edge_tail``: decode, the worker's
    queue, admission and hand-offs; the sum of the worker's stages when it sent no hold). What is measured end
    to end less the parts the planner measures and prices by themselves: the board's head and encode, the
    link's network time (its bandwidth and RTT), the worker's tail (its factor), the board runtime's own time
    (``overhead_edge``, :func:`runtime_overhead`). The planner's model holds a decode time and a modelled board
    wait in their place (runtime.agent.prediction, planner.compute.LinkOverheads). None for a frame that did
    not run on one worker as its plan said (local, chained, no worker stages)."""
    t: dict[str, float] = result.times
    if result.where != "edge" or "edge_tail" not in t or "edge_forward" in t:
        return None
    held = t.get("edge_held")
    if held is None:
        held = t.get("edge_queue", 0.0) + t.get("edge_decode", 0.0) + t["edge_tail"]
    return t.get("board_queue", 0.0) + max(0.0, held - t["edge_tail"])


class _LinkCollector:
    """Prometheus figures of every link the agent holds (label ``link``: the worker's address, at most
    ``EstimatorOptions.max_links``): bandwidth estimate, its age and its sample count, base RTT, the link's
    measured overhead and its sample count (:func:`link_overhead`)."""

    def __init__(self, estimator: LinkEstimator):
        self.estimator = estimator

    def describe(self) -> list[Any]:
        return []  # collected at scrape time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        fams = {k: GaugeMetricFamily(f"edgesplit_agent_link_estimate_{k}", h, labels=["link"]) for k, h in (
            ("bandwidth_bytes_per_second", "Bandwidth estimate per link (0: unknown)"),
            ("age_seconds", "Seconds since the link's last bandwidth sample (-1: none yet)"),
            ("samples", "Bandwidth samples behind the link's estimate (frames, censored frames, probes)"),
            ("rtt_seconds", "Base RTT per link (0: unknown)"),
            ("overhead_seconds", "Per offloaded frame, the time on the link no modelled part holds (median of 16; 0: unknown)"),
            ("overhead_samples", "Frames behind the link's overhead figure"))}
        est = self.estimator
        now = est.clock()
        for key in est.links:
            lk = est.links.get(key)
            if lk is None:
                continue
            bw = lk.bandwidth
            fams["bandwidth_bytes_per_second"].add_metric([key], bw.value)
            fams["age_seconds"].add_metric([key], bw.age(now) if bw.samples else -1.0)
            fams["samples"].add_metric([key], bw.samples)
            fams["rtt_seconds"].add_metric([key], lk.rtt.value)
            fams["overhead_seconds"].add_metric([key], lk.overhead.value)
            fams["overhead_samples"].add_metric([key], lk.overhead.samples)
        yield from fams.values()
