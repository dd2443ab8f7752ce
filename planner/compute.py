"""How fast the board runs now, from its telemetry: a smoothed device slowdown factor.

A device profile is a benchmark, made once; a board in service can be slower (thermal
throttling, another process, a CPU quota) or faster. Every telemetry message carries the device
stage medians since the previous one, among them ``head`` (the blocks before the split the agent
runs, timed on the board) and, for frames that fell back to the device, ``local_tail``. One report
gives one sample::

    sample = head / sum(profile block medians before the split)

For a plan with no head to time (split 0, everything on the worker) a report can still compare the
whole model when frames ran locally: ``(head + local_tail) / sum(all block medians)``; otherwise
it holds no sample and the factor stays as it was. A local plan ("output") is the first case with
the head covering every block.

Samples are smoothed with an EWMA, ``f = ALPHA * sample + (1 - ALPHA) * f`` (ALPHA = 0.3, as the
agent smooths bandwidth: a step change is 90 % absorbed after ~7 reports, ~7 s at the agent's
default 1 s telemetry interval, and one odd report moves the factor by 30 % of its distance); the
first sample sets the factor. A sample outside ``[1 / MAX_SAMPLE_RATIO, MAX_SAMPLE_RATIO]`` is
no measurement of a board (a head of 0 s, a clock jump) and is ignored; the others are clamped to
``[MIN_FACTOR, MAX_FACTOR]`` before smoothing and the smoothed factor again after it (the EWMA of two
samples at a bound can round past it: 0.3 * 0.1 + 0.7 * 0.1 is 0.09999999999999999), so the factor
always stays in that range.

The planner scales the device tier's block times (median and p95) by the factor
(:func:`scaled`); transfer encode/decode times stay as profiled. So that every report does not
re-derive profiles (and empty the search's table cache) the scaled profile is remade only when
the factor moved by more than ``APPLY_TOLERANCE`` from the one it was made with; whether the
plan then changes is the hysteresis's call, as for a link change.

The worker's compute is corrected the same way, per (agent, worker): :class:`WorkerSpeeds`, from
the worker's own ``edge_tail`` time over its profile's blocks for the plan's slice (stored with the
agent's links by the write-behind batch, table ``worker_speed``). Each factor carries its sample count and the time of its last sample; one with no sample for
``WORKER_SPEED_TTL`` seconds (default 60) is forgotten, and the worker's profile stands again. An
agent that a loaded worker sent to run locally measures that worker no more (no frame reaches its
tail), so without an age the factor of one busy minute would keep the agent off the worker for good.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

from planner.workload import BOARD_WAITS
from runtime.contracts.profile import Profile, Transfer
from runtime.contracts.queueing import DEFAULT_WINDOW, MAX_CS2, Wait, expected_wait

ALPHA = 0.3  # EWMA weight of a new sample
MIN_FACTOR, MAX_FACTOR = 0.1, 50.0  # the factor's range: 10x faster to 50x slower than profiled
MAX_SAMPLE_RATIO = 1000.0  # a sample beyond 1000x either way is no measurement: ignored
MIN_PREDICTED_SECONDS = 1e-4  # a predicted head under 0.1 ms is timer noise: no sample
APPLY_TOLERANCE = 0.02  # remake the scaled device profile when the factor moved by over 2 %


def head_ratio(stages: Mapping[str, float], profile: Profile, split_index: int) -> float | None:
    """Measured over predicted device compute for one report's ``stages`` (seconds by stage) under
    a plan cutting after ``split_index`` blocks; None when the report holds nothing to compare."""
    head = stages.get("head")
    if head is None:
        return None
    n = min(max(split_index, 0), profile.n_blocks)
    predicted = sum(b.seconds for b in profile.blocks[:n])
    measured = head
    if predicted < MIN_PREDICTED_SECONDS:  # no head to compare: the whole model, if frames ran locally
        tail = stages.get("local_tail")
        predicted = sum(b.seconds for b in profile.blocks)
        if tail is None or predicted < MIN_PREDICTED_SECONDS:
            return None
        measured = head + tail
    return measured / predicted


def tail_ratio(stages: Mapping[str, float], profile: Profile, split_index: int, end_index: int = 0) -> float | None:
    """Measured over predicted worker compute for one report's ``stages``: the worker's own tail time
    (``edge_tail``, which it reports with every result) over its ``profile``'s blocks
    ``[split_index, end_index)`` (``end_index`` 0: to the output); None when nothing compares."""
    tail = stages.get("edge_tail")
    if tail is None:
        return None
    n = profile.n_blocks
    lo, hi = min(max(split_index, 0), n), (n if end_index <= 0 else min(end_index, n))
    predicted = sum(b.seconds for b in profile.blocks[lo:hi])
    return tail / predicted if predicted >= MIN_PREDICTED_SECONDS else None


def plausible(ratio: float) -> bool:
    return math.isfinite(ratio) and 1.0 / MAX_SAMPLE_RATIO <= ratio <= MAX_SAMPLE_RATIO


@dataclass
class DeviceSpeed:
    """One agent's smoothed slowdown factor (1.0 = as profiled) and the factor decisions use."""

    factor: float = 1.0  # smoothed, in [MIN_FACTOR, MAX_FACTOR]
    samples: int = 0  # samples taken (persisted, so a restart keeps smoothing instead of starting over)
    applied: float = 1.0  # the factor the agent's device profile is scaled by now
    unsaved: bool = False  # changed since it was last written to the store
    updated: float = 0.0  # wall-clock time of the last sample taken (0: none in this process)

    def add(self, ratio: float) -> bool:
        """Take one sample; False (and no change) when it is not plausible."""
        if not plausible(ratio):
            return False
        r = min(max(ratio, MIN_FACTOR), MAX_FACTOR)
        smoothed = r if self.samples == 0 else ALPHA * r + (1 - ALPHA) * self.factor
        self.factor = min(max(smoothed, MIN_FACTOR), MAX_FACTOR)  # rounding must not leave the range
        self.samples += 1
        self.unsaved = True
        self.updated = time.time()
        return True

    def observe(self, stages: Mapping[str, float], profile: Profile, split_index: int) -> str | None:
        """Take one report (see :func:`head_ratio`): "used", "ignored" (implausible) or None (nothing to compare)."""
        ratio = head_ratio(stages, profile, split_index)
        if ratio is None:
            return None
        return "used" if self.add(ratio) else "ignored"

    def moved(self) -> bool:
        """The factor is far enough from the applied one to remake the scaled profile."""
        return abs(self.factor - self.applied) > APPLY_TOLERANCE * self.applied


def scaled(profile: Profile, factor: float) -> Profile:
    """``profile`` with every block's median and p95 times ``factor`` (``profile`` itself at 1.0)."""
    if factor == 1.0:
        return profile
    blocks = tuple(dataclasses.replace(b, seconds=b.seconds * factor,
                                       p95_seconds=None if b.p95_seconds is None else b.p95_seconds * factor)
                   for b in profile.blocks)
    return dataclasses.replace(profile, blocks=blocks)


MAX_WORKER_SPEEDS = 64  # workers one agent keeps a tail factor for (a sample for another one is dropped)
WORKER_SPEED_TTL = 60.0  # seconds without a sample after which a worker's tail factor is forgotten


LINK_OVERHEAD_TOLERANCE = (0.10, 0.0005)  # remake a worker's profile when its overhead moved by over 10 % and 0.5 ms
MAX_LINK_OVERHEAD = 1.0  # a reported link overhead beyond 1 s is no measurement of the runtime: ignored
MAX_LINK_OVERHEAD_SAMPLES = 1e12  # ... nor a sample count beyond this (an age beyond the TTL is simply old)


@dataclass
class LinkOverhead:
    """One (agent, worker) link's measured overhead per frame (issue 11): the agent's figure (``seconds``:
    runtime.agent.telemetry.link_overhead, the median of its last 16 offloaded frames: their wait for the board,
    the worker's decode, queue and hand-offs) with its sample count and the wall-clock time of its last sample,
    and ``extra``: what it holds beyond the parts the plan it was measured under priced for it (that transfer's
    decode on the worker, as profiled, and its modelled ``queue:board``), added to the decode of every transfer
    the worker receives from this agent (:meth:`WorkerSpeeds.profiles`). ``applied``: the extra decisions use
    (None: none yet)."""

    seconds: float
    samples: int
    updated: float
    extra: float
    applied: float | None = None

    def moved(self) -> bool:
        rel, floor = LINK_OVERHEAD_TOLERANCE
        return self.applied is None or abs(self.extra - self.applied) > max(rel * abs(self.applied), floor)


def plausible_overhead(seconds: float, samples: float, age: float) -> bool:
    """Whether a reported link overhead (seconds, samples behind it, age in seconds) is a measurement."""
    return (math.isfinite(seconds) and 0 <= seconds <= MAX_LINK_OVERHEAD and math.isfinite(samples)
            and 1 <= samples <= MAX_LINK_OVERHEAD_SAMPLES and math.isfinite(age) and age >= 0)


def with_decode(profile: Profile, extra: float) -> Profile:
    """``profile`` with ``extra`` seconds on the decode of every transfer it receives (at least 0); itself at 0."""
    if extra == 0:
        return profile

    def more(transfers: tuple[Transfer, ...]) -> tuple[Transfer, ...]:
        return tuple(dataclasses.replace(t, decode_seconds=max(0.0, t.decode_seconds + extra)) for t in transfers)

    blocks = tuple(dataclasses.replace(b, transfers=more(profile.transfers_after(b.index + 1))) for b in profile.blocks)
    return dataclasses.replace(profile, blocks=blocks, input_transfers=more(profile.transfers_after(0)))


class WorkerSpeeds:
    """One agent's tail factor per worker (issue 11: a loaded worker's ResNet-18 tail took 150 ms
    against the 45 ms of its profile, and the planner kept predicting 45): the worker's ``edge_tail``
    over its profile's blocks for the slice the agent's plan gives it, smoothed and clamped as the
    device factor is (:class:`DeviceSpeed`). Per (agent, worker), since what an agent measures is the
    worker as it serves that agent (its share of a loaded machine); the worker's registered profiles
    stay shared, and an agent whose factor moved gets its own scaled copy (:meth:`profiles`)."""

    def __init__(self, ttl_seconds: float = WORKER_SPEED_TTL) -> None:
        self.ttl_seconds = ttl_seconds
        self.speeds: dict[str, DeviceSpeed] = {}  # worker id -> factor
        self.overheads: dict[str, LinkOverhead] = {}  # worker id -> the link's measured overhead (LinkOverhead)
        self._scaled: dict[str, tuple[Mapping[str, Profile], tuple[float, float], Mapping[str, Profile]]] = {}

    def observe(self, worker_id: str, stages: Mapping[str, float], profile: Profile, split_index: int,
                end_index: int = 0) -> str | None:
        """Take one report (see :func:`tail_ratio`): "used", "ignored" (implausible) or None (nothing to compare)."""
        ratio = tail_ratio(stages, profile, split_index, end_index)
        if ratio is None:
            return None
        speed = self.speeds.get(worker_id)
        if speed is None:
            if len(self.speeds) >= MAX_WORKER_SPEEDS:
                return "ignored"
            speed = self.speeds[worker_id] = DeviceSpeed()
        return "used" if speed.add(ratio) else "ignored"

    def apply(self, worker_id: str) -> bool:
        """Use the worker's factor in decisions if it moved far enough (:meth:`DeviceSpeed.moved`); True when it did."""
        speed = self.speeds.get(worker_id)
        if speed is None or not speed.moved():
            return False
        speed.applied = speed.factor
        self._scaled.pop(worker_id, None)
        return True

    def applied(self, worker_id: str) -> float:
        speed = self.speeds.get(worker_id)
        return speed.applied if speed is not None else 1.0

    def overhead(self, worker_id: str, seconds: float, samples: int, updated: float, extra: float) -> bool:
        """The agent's measured overhead on its link to ``worker_id`` (:class:`LinkOverhead`); True when the
        ``extra`` decisions use moved (it is applied then). Beyond MAX_WORKER_SPEEDS workers, a new one is dropped."""
        ov = self.overheads.get(worker_id)
        if ov is None:
            if len(self.overheads) >= MAX_WORKER_SPEEDS:
                return False
            ov = self.overheads[worker_id] = LinkOverhead(seconds, samples, updated, extra)
        else:
            ov.seconds, ov.samples, ov.updated, ov.extra = seconds, samples, updated, extra
        if not ov.moved():
            return False
        ov.applied = ov.extra
        self._scaled.pop(worker_id, None)
        return True

    def applied_overhead(self, worker_id: str) -> float:
        """The extra decode seconds decisions use for ``worker_id`` (0: its link's overhead unknown)."""
        ov = self.overheads.get(worker_id)
        return ov.applied if ov is not None and ov.applied is not None else 0.0

    def profiles(self, worker_id: str, profiles: Mapping[str, Profile], model: str) -> Mapping[str, Profile]:
        """``profiles`` (a worker's, by model) with ``model``'s block times scaled by this agent's factor for
        the worker and its decode times raised by the link's measured overhead (:class:`LinkOverhead`);
        ``profiles`` itself at 1.0 and no overhead. The same objects while both hold (the search's caches and
        the shared rankings key on them)."""
        key = (self.applied(worker_id), self.applied_overhead(worker_id))
        if key == (1.0, 0.0) or model not in profiles:
            return profiles
        hit = self._scaled.get(worker_id)
        if hit is not None and hit[0] is profiles and hit[1] == key:
            return hit[2]
        out = {**profiles, model: with_decode(scaled(profiles[model], key[0]), key[1])}
        self._scaled[worker_id] = (profiles, key, out)
        return out

    def restore(self, worker_id: str, factor: float, samples: int, updated: float) -> None:
        """A factor as the store kept it (planner.state), applied as it was; :meth:`expire` forgets it when its
        last sample is older than ``ttl_seconds``."""
        if len(self.speeds) < MAX_WORKER_SPEEDS and plausible(factor):
            f = min(max(factor, MIN_FACTOR), MAX_FACTOR)
            self.speeds[worker_id] = DeviceSpeed(f, samples, applied=f, updated=updated)
            self._scaled.pop(worker_id, None)

    def expire(self, now: float) -> bool:
        """Forget factors with no sample for ``ttl_seconds`` (the profile stands again); True when one that
        decisions used (applied != 1) went, so the agent's plan is worth a new look."""
        moved = False
        for wid in [w for w, s in self.speeds.items() if now - s.updated > self.ttl_seconds]:
            moved |= self.speeds[wid].applied != 1.0
            self.speeds.pop(wid, None)
            self._scaled.pop(wid, None)
        for wid in [w for w, o in self.overheads.items() if now - o.updated > self.ttl_seconds]:
            moved |= bool(self.overheads.pop(wid).applied)
            self._scaled.pop(wid, None)
        return moved

    def forget(self, worker_id: str) -> None:
        self.speeds.pop(worker_id, None)
        self.overheads.pop(worker_id, None)
        self._scaled.pop(worker_id, None)


MAX_OVERHEAD_SECONDS = 1.0  # a reported overhead beyond this is no measurement of the runtime: ignored
OVERHEAD_TOLERANCE = (0.10, 0.001)  # remake the profile when an overhead moved by over 10 % and 1 ms
KINDS = ("local", "edge", "hold", "queue")  # board per local frame, per offloaded frame, worker hold beyond its model,
# the measured board queue of a local frame (kept QUEUE_TTL seconds; the model stands in for it otherwise)
QUEUE_TTL = 15.0  # seconds a measured board queue speaks for the board: then the workload's model (board_wait) again
WORKLOAD_TTL = 60.0  # seconds a reported source interval holds without a new report: then unknown (no queue terms)
MAX_INTERVAL = 60.0  # a source interval beyond 60 s (under one frame a minute) is no camera: ignored
MAX_WINDOW = 64  # frames in flight beyond this are no agent's window: ignored
# Squared coefficient of variation of the board's time per frame (runtime.contracts.queueing): the quota-limited
# board of the adapt_run records ran ResNet-18's head in 230-290 ms (uniform +-12 %: 0.12**2 / 3 = 0.005), doubled
# for the quota's scheduling. Only the board's Kingman term below saturation uses it.
BOARD_CS2 = 0.01
def hold_extra(stages: Mapping[str, float], breakdown: Mapping[str, float]) -> float | None:
    """The worker's hold of an offloaded frame (``edge_held``: last byte in to result out, on its clock) beyond
    what the plan's model holds for it (its decode and edge compute; the tail factor corrects the compute):
    gRPC handling, the decode's own slowness, its queue. None when the report or the plan holds nothing to compare."""
    held, tail = stages.get("edge_held"), stages.get("edge_tail")
    decode = [v for k, v in breakdown.items() if k.startswith("decode:")]
    if held is None or tail is None or len(decode) != 1:
        return None
    return max(0.0, held - tail - decode[0])


@dataclass
class Overhead:
    """The board runtime's own time per frame, outside every stage it times (issue 11: 10-50 ms per local
    frame on a quota-limited board, under 1 ms per offloaded one; no profile holds it): the agent's
    ``overhead_local`` / ``overhead_edge`` stage medians (runtime.agent.telemetry.runtime_overhead), and the
    worker's hold beyond the model (``overhead_hold``, :func:`hold_extra`: 2-3 ms of ResNet-18's 50), smoothed
    as the slowdown factor is (ALPHA; the first sample sets it). :func:`with_overhead` adds the local one to
    the configuration that runs every block on the board and the edge and hold ones to every transfer's encode
    (each offloading configuration sends once from the board), so both its ranking and its prediction hold them.

    The board's queue belongs to the board and to the workload, not to a phase: the agent reports its source's
    frame interval and window (``source_interval`` / ``source_window``, kept WORKLOAD_TTL seconds), and
    :func:`with_overhead` prices every configuration's wait for the board from them and that configuration's
    board time (:func:`board_wait`). Under a local plan the board's measured queue (``overhead_queue``: the
    ``board_queue`` median, planner.measured.queue_sample) stands in for the local configuration's modelled
    one while it is fresh (QUEUE_TTL seconds) and measured at the interval in force; older, it is forgotten
    (it held through a 40 s offloaded phase before, so the next local phase started with an old figure)."""

    seconds: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    samples: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    applied: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    interval: float = 0.0  # the source's frame interval (s; 0: unknown or unpaced)
    window: int = DEFAULT_WINDOW  # the source's frames in flight
    updated: dict[str, float] = dataclasses.field(default_factory=dict)  # "queue" / "interval" -> clock time
    queue_interval: float = 0.0  # the interval the measured queue was measured at
    link_cv2: float = 0.0  # the relative variance of the agent's link's bandwidth samples (its ``link_cv2``)

    def observe(self, stages: Mapping[str, float], now: float | None = None) -> bool:
        """Take one report's overhead medians and workload; True when a figure it holds now is far from the applied one."""
        now = time.monotonic() if now is None else now
        self._workload(stages, now)
        if "queue" in self.updated and (now - self.updated["queue"] > QUEUE_TTL or self.queue_interval != self.interval):
            self.seconds["queue"], self.samples["queue"] = 0.0, 0  # old, or of another workload: the model again
            del self.updated["queue"]
        for kind in KINDS:
            v = stages.get(f"overhead_{kind}")
            if v is None or not (math.isfinite(v) and 0 <= v <= MAX_OVERHEAD_SECONDS):
                continue
            old = self.seconds[kind]
            self.seconds[kind] = v if self.samples[kind] == 0 else ALPHA * v + (1 - ALPHA) * old
            self.samples[kind] += 1
            if kind == "queue":
                self.updated["queue"], self.queue_interval = now, self.interval
        rel, floor = OVERHEAD_TOLERANCE
        return (any(abs(self.seconds[k] - self.applied[k]) > max(rel * self.applied[k], floor) for k in KINDS)
                or self.applied.get("queue_measured", 0.0) != float(self.samples["queue"] > 0)
                or self.applied.get("interval", 0.0) != self.interval or self.applied.get("window") != self.window
                or abs(self.applied.get("link_cv2", 0.0) - self.link_cv2) > max(0.5 * self.applied.get("link_cv2", 0.0), 0.01))

    def forget(self, kind: str) -> None:
        """``kind``'s figure is unknown again (the hold, once the link's measured overhead holds it: LinkOverhead)."""
        self.seconds[kind], self.samples[kind] = 0.0, 0

    def _workload(self, stages: Mapping[str, float], now: float) -> None:
        interval, window = stages.get("source_interval"), stages.get("source_window", float(DEFAULT_WINDOW))
        if (interval is not None and math.isfinite(interval) and 0 < interval <= MAX_INTERVAL
                and math.isfinite(window) and 1 <= window <= MAX_WINDOW):
            self.interval, self.window, self.updated["interval"] = interval, int(window), now
            cv2 = stages.get("link_cv2")
            if cv2 is not None and math.isfinite(cv2) and 0 <= cv2 <= MAX_CS2:
                self.link_cv2 = cv2
        elif "interval" in self.updated and now - self.updated["interval"] > WORKLOAD_TTL:
            self.interval, self.window, self.link_cv2 = 0.0, DEFAULT_WINDOW, 0.0  # unknown again
            del self.updated["interval"]

    def apply(self) -> None:
        self.applied = {**self.seconds, "queue_measured": float(self.samples["queue"] > 0), "interval": self.interval,
                        "window": self.window, "link_cv2": self.link_cv2}


def board_wait(service: float, applied: Mapping[str, float]) -> Wait:
    """A frame's expected wait for the board (runtime.contracts.queueing) when a configuration keeps it ``service``
    seconds per frame, at the workload in ``applied`` (:meth:`Overhead.apply`); none when the interval is unknown."""
    window = int(applied.get("window", DEFAULT_WINDOW))
    return expected_wait(service, applied.get("interval", 0.0), BOARD_CS2, window=window)


def with_overhead(profile: Profile, applied: Mapping[str, float]) -> Profile:
    """``profile`` with ``applied["local"]`` seconds and the local configuration's board wait on its last block
    (run on the board only by the local configuration), and ``applied["edge"]`` (and ``"hold"``) with the board
    wait of the configuration that sends it on every transfer's encode; ``profile`` itself when all are 0.
    A board wait is the measured queue (``applied["queue"]``) for the local configuration while one is
    fresh, else :func:`board_wait` of the configuration's board time (its blocks on the board, with the
    overhead, and the transfer's encode). The waits added are listed in ``settings[BOARD_WAITS]`` ("output"
    and "CUT/TRANSFER" -> (seconds, utilisation)) so a plan's breakdown can show them as ``queue:board`` (planner.workload)."""
    local, edge = applied.get("local", 0.0), applied.get("edge", 0.0) + applied.get("hold", 0.0)
    interval = applied.get("interval", 0.0)
    if local <= 0 and edge <= 0 and interval <= 0 and applied.get("queue", 0.0) <= 0:
        return profile
    waits: dict[str, tuple[float, float]] = {}  # configuration key -> (wait, utilisation) (planner.workload)
    head = [0.0]
    for b in profile.blocks:
        head.append(head[-1] + b.seconds)

    def enc(cut: int, transfers: tuple[Transfer, ...]) -> tuple[Transfer, ...]:
        out = []
        for t in transfers:
            w = board_wait(head[cut] + t.encode_seconds + edge, applied)
            wait = w.seconds
            if w.utilisation > 0:
                waits[f"{cut}/{t.name}"] = (wait, w.utilisation)
            out.append(dataclasses.replace(t, encode_seconds=t.encode_seconds + edge + wait) if edge + wait > 0 else t)
        return tuple(out)

    blocks = [dataclasses.replace(b, transfers=enc(b.index + 1, profile.transfers_after(b.index + 1))) for b in profile.blocks]
    modelled = board_wait(head[-1] + local, applied)
    queue = applied.get("queue", 0.0) if applied.get("queue_measured") else modelled.seconds
    if queue > 0 or modelled.utilisation > 0:
        waits["output"] = (queue, modelled.utilisation)
    if local + queue > 0 and blocks:
        last, extra = blocks[-1], local + queue
        blocks[-1] = dataclasses.replace(last, seconds=last.seconds + extra,
                                         p95_seconds=None if last.p95_seconds is None else last.p95_seconds + extra)
    settings = {**profile.settings, BOARD_WAITS: waits, "frame_interval": interval,
                "frame_window": int(applied.get("window", DEFAULT_WINDOW)), "link_cv2": applied.get("link_cv2", 0.0)}
    return dataclasses.replace(profile, blocks=tuple(blocks), input_transfers=enc(0, profile.transfers_after(0)),
                               settings=settings)
