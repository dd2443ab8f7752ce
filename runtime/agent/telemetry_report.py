"""What the agent tells the planner about its link and its frames, and when (``ReportTelemetry``).

* :func:`link_report`: one link's estimate (bandwidth with its age and sample count, base RTT) as a
  ``LinkReport``; all 0 for a link never measured (unknown, not fast).
* :func:`wire_reports`: the bytes per frame and encode times measured per (split, codec), as ``WireReport``s.
* :class:`ReportCadence`: when a report goes (a heartbeat, or at once when the link moved).

The figures themselves are :class:`runtime.agent.telemetry.LinkEstimator`'s; the planner link
(runtime.agent.planner_link) sends the reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from runtime.agent.estimator import LinkEstimate
from runtime.agent.telemetry import LinkEstimator
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb


def link_report(worker: str, est: LinkEstimate | None, now: float) -> ppb.LinkReport:
    """One link's figures for the planner (all 0 when ``est`` is None: unknown)."""
    if est is None:
        return ppb.LinkReport(worker=worker)
    bw = est.bandwidth
    return ppb.LinkReport(worker=worker, bandwidth_bytes_per_second=bw.value, rtt_seconds=est.rtt.value,
                          bandwidth_age_seconds=max(0.0, bw.age(now)) if bw.samples else 0.0, bandwidth_samples=bw.samples)


def wire_reports(estimator: LinkEstimator) -> list[ppb.WireReport]:
    """The bytes per frame and encode times the agent measured, per (split, codec) (runtime.agent.wirebytes)."""
    return [ppb.WireReport(split_id=split, codec=codec, mean_bytes=b, encode_seconds=enc, samples=n, age_seconds=age)
            for split, codec, b, enc, n, age in estimator.wire.report()]


BAND = 0.25  # a bandwidth estimate this far (relative) from the last reported one is reported at once
HEARTBEAT_SECONDS = 10.0  # a report at least this often: compute/latency samples, a link that did not move


class ReportCadence:
    """When the agent reports to the planner (issue 15): a steady agent once per ``heartbeat``
    seconds; between heartbeats only when its link moved, i.e. the bandwidth estimate of the link it
    reports left the band around the last reported figure (``band``, +-25 %) or crossed into another
    band of the running plan's fallback table, it was unknown and is measured now (or the reverse),
    or the reported link is another worker's; or frames run again after a report that had none (the
    planner hears the board's compute at once). Never two reports within ``min_interval`` seconds.
    Device stage medians and the frame count accumulate until the next report (a heartbeat at the
    latest). Pure logic with an injectable clock; the planner link asks :meth:`due` and calls
    :meth:`sent`."""

    def __init__(self, heartbeat: float = HEARTBEAT_SECONDS, min_interval: float = 1.0, band: float = BAND,
                 clock: Callable[[], float] = time.monotonic):
        if not (heartbeat > 0 and min_interval > 0 and 0 < band < 1):
            raise ValueError(f"heartbeat and min_interval must be > 0 and band in (0, 1), got {heartbeat}, "
                             f"{min_interval}, {band}")
        self.heartbeat = max(heartbeat, min_interval)
        self.min_interval = min_interval
        self.band = band
        self.clock = clock
        self.last_sent = -float("inf")  # clock time of the last report
        self.reported: tuple[str, float] | None = None  # (link, bandwidth) of the last report
        self.edges: tuple[float, ...] = ()  # the running plan's band edges on its band link (bytes/s)
        self.edges_link = ""
        self.reported_frames = False  # the last report carried device stage times
        self.heartbeats = 0  # reports sent because the heartbeat was due
        self.changes = 0  # reports sent because the link moved

    def set_bands(self, link: str, edges: tuple[float, ...]) -> None:
        """The running plan's fallback bands: their lower edges (bytes/s) on ``link``."""
        self.edges_link, self.edges = link, tuple(sorted(e for e in edges if e > 0))

    def _band_of(self, bandwidth: float) -> int:
        return sum(1 for e in self.edges if bandwidth >= e)

    def moved(self, link: str, bandwidth: float, frames: int = 0) -> bool:
        """Whether ``bandwidth`` on ``link`` (and ``frames`` observed since the last report) differ from
        the last report enough to report now."""
        if self.reported is None or (frames > 0 and not self.reported_frames):
            return True
        old_link, old = self.reported
        if link != old_link or (old > 0) != (bandwidth > 0):
            return True
        if old > 0 and abs(bandwidth - old) > self.band * old:
            return True
        return bool(self.edges) and link == self.edges_link and self._band_of(bandwidth) != self._band_of(old)

    def due(self, link: str, bandwidth: float, frames: int = 0) -> str:
        """"heartbeat", "change" or "" (nothing to report yet)."""
        since = self.clock() - self.last_sent
        if since < self.min_interval:
            return ""
        if self.moved(link, bandwidth, frames):
            return "change"
        return "heartbeat" if since >= self.heartbeat else ""

    def wait_seconds(self, link: str, bandwidth: float, frames: int = 0) -> float:
        """How long until something may be due without a new estimate: the end of ``min_interval``
        when the link already moved, else the heartbeat."""
        since = self.clock() - self.last_sent
        if self.moved(link, bandwidth, frames):
            return max(0.0, self.min_interval - since)
        return max(0.0, self.heartbeat - since)

    def sent(self, link: str, bandwidth: float, reason: str, frames: int = 0) -> None:
        self.last_sent = self.clock()
        self.reported = (link, bandwidth)
        self.reported_frames = frames > 0
        if reason == "heartbeat":
            self.heartbeats += 1
        else:
            self.changes += 1
