"""Link-aware liveness of one stream (issue 10): a stream is dead when its bytes stop making progress
for longer than the link could need to carry what is outstanding, or, when nothing is outstanding, when
the peer stops answering probes.

gRPC keep-alive cannot tell a partition from a slow link: its ping queues behind the frames already
sent, so a timeout short enough to notice a partition quickly (2 s) kills every stream that carries a
400 KB frame over 1.6 Mbit/s. Here the allowance follows the link::

    allowance = max(floor, slack * outstanding bytes / bandwidth + RTT)    (frames outstanding)
    allowance = floor                                                       (idle: nothing queues)

where *outstanding* is the bytes of frames sent and not yet answered, and *progress* is anything the
peer sends back: a result, or the answer to a probe sent on the same connection (it queues behind
the same bytes, so its answer proves they moved). A probe goes after ``probe_after_seconds`` without
progress, busy or idle, so on a live link progress never stops for longer than that plus a probe's
round trip. The clock restarts at each progress and when the first frame becomes outstanding.

``floor`` (1.5 s) is the whole detection: from the last progress to the verdict, the probe's round trip
included; the watchdog wakes at the instant the verdict is due, so a silent partition is declared
within floor + one wake-up (measured 1.5-1.6 s, tests/test_liveness.py), under the 2 s target. A live
link has ``floor - probe_after`` (1 s) for a probe's answer. ``slack`` covers estimate error and the
worker's compute time, which the allowance does not know. With frames outstanding and no bandwidth
estimate (a link never measured) the allowance is unknown: such a stream relies on its frames'
deadline (their censored samples then give the link an estimate) and on keep-alive ("unknown is
unknown").

The estimate lags a step down: right after a link drops, a frame larger than ``floor`` seconds at the
new rate can be declared dead on the old estimate. That is taken as evidence, not hidden: the frames
in flight run locally, their bytes become censored samples (the link did not carry them in that
time), and the stream reopens within the reconnect back-off (<= 2 s). In steady state the estimate
knows the rate and such a frame is waited for (tests/test_liveness.py: 401 KB at 1.6 Mbit/s).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# (bandwidth bytes/s or 0.0 when unknown, base RTT seconds or 0.0) of the link a stream runs on
LinkHint = Callable[[], tuple[float, float]]

# why a stream was declared dead (the ``reason`` label of the stream-death counters)
NO_PROGRESS = "no_progress"  # frames outstanding, nothing back for longer than the link needs
PROBE_UNANSWERED = "probe_unanswered"  # idle, and the peer did not answer a probe within the floor


@dataclass(frozen=True)
class LivenessOptions:
    """When a stream is declared dead (documented defaults; README "Liveness")."""

    # dead after this long without progress (frames outstanding on a fast link, or idle): the whole
    # detection, a probe's round trip included, within the 2 s target with room for one wake-up
    floor_seconds: float = 1.5
    slack: float = 1.5  # times the bytes' transfer time at the estimated bandwidth (estimate error, compute)
    # with no progress this long, ask the peer (a probe on the same connection), busy or idle; a live
    # link has floor - probe_after for the answer
    probe_after_seconds: float = 0.5
    idle_probes: bool = True  # probe an idle stream too (False: keep-alive alone watches it, 11 s)
    tick_seconds: float = 0.25  # the watchdog's longest sleep (it also wakes when a probe or verdict is due)

    def __post_init__(self) -> None:
        if not (self.floor_seconds > 0 and self.slack >= 1 and 0 < self.probe_after_seconds < self.floor_seconds
                and self.tick_seconds > 0):
            raise ValueError(f"liveness options out of range (probe_after_seconds must be below floor_seconds): {self}")


class Liveness:
    """Progress bookkeeping for one stream epoch; the stream calls ``sent``/``answered``/``progress``."""

    def __init__(self, hint: LinkHint | None, options: LivenessOptions | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.hint = hint
        self.options = options or LivenessOptions()
        self.clock = clock
        self.outstanding: dict[int, int] = {}  # seq -> bytes sent and not answered
        self.abandoned: dict[int, float] = {}  # seq -> when the sender gave up on it (it may never be answered)
        self.progress_at = clock()
        self.reason = ""  # NO_PROGRESS or PROBE_UNANSWERED once verdict() found the stream dead

    @property
    def outstanding_bytes(self) -> int:
        return sum(self.outstanding.values())

    def sent(self, seq: int, nbytes: int) -> None:
        if not self.outstanding:
            self.progress_at = self.clock()  # the wait starts with the first outstanding frame
        self.outstanding[seq] = nbytes

    def answered(self, seq: int) -> None:
        """A result for ``seq`` arrived: progress, and its bytes are through."""
        self.outstanding.pop(seq, None)
        self.abandoned.pop(seq, None)
        self.progress_at = self.clock()

    def forget(self, seq: int) -> None:
        """``seq`` was not sent whole (cut short at its deadline): the peer owes it no answer."""
        self.outstanding.pop(seq, None)
        self.abandoned.pop(seq, None)

    def abandon(self, seq: int) -> None:
        """The sender gave up on ``seq`` (sent whole): its answer may never come, so it stays outstanding
        only until a probe proves the link carried it (``probe_answered``)."""
        if seq in self.outstanding:
            self.abandoned[seq] = self.clock()

    def probe_answered(self, sent_at: float) -> None:
        """A probe sent at ``sent_at`` was answered: the bytes sent before it got through (one
        connection, in order), so frames abandoned before then are no longer waited for."""
        for seq, when in list(self.abandoned.items()):
            if when <= sent_at:
                self.forget(seq)
        self.progress_at = self.clock()

    def allowance(self) -> float | None:
        """Seconds of no progress after which the stream is dead; None: unknown (frames outstanding and
        no bandwidth estimate, or an idle stream that is not probed)."""
        o = self.options
        if not self.outstanding:
            return o.floor_seconds if o.idle_probes else None
        if self.hint is None:
            return None
        bandwidth, rtt = self.hint()
        if not bandwidth > 0:
            return None
        return max(o.floor_seconds, o.slack * self.outstanding_bytes / bandwidth + max(rtt, 0.0))

    def stalled(self) -> float:
        """Seconds without progress (busy or idle)."""
        return self.clock() - self.progress_at

    def verdict(self) -> str:
        """Why the stream is dead, or "" while it is alive (or the allowance unknown); sets ``reason``."""
        stalled = self.stalled()
        if stalled <= self.options.floor_seconds:
            return ""
        allowance = self.allowance()
        if allowance is None or stalled <= allowance:
            return ""
        if not self.outstanding:
            self.reason = PROBE_UNANSWERED
            return f"idle, and no answer to a probe for {stalled:.1f}s (allowed {allowance:.1f}s)"
        self.reason = NO_PROGRESS
        return (f"no progress for {stalled:.1f}s with {self.outstanding_bytes} bytes outstanding "
                f"(allowed {allowance:.1f}s at the link's estimated bandwidth)")

    def wants_probe(self) -> bool:
        if not (self.outstanding or self.options.idle_probes):
            return False
        return self.stalled() > self.options.probe_after_seconds

    def next_check(self) -> float:
        """Seconds until a probe or the verdict may be due (the watchdog sleeps this long, at most a tick)."""
        o = self.options
        stalled = self.stalled()
        due = [o.tick_seconds]
        allowance = self.allowance()
        for at in (o.probe_after_seconds, allowance):
            if at is not None and at > stalled:
                due.append(at - stalled + 0.005)  # just past the instant, so the check sees it due
        return min(due)


def death_kind(reason: str) -> str:
    """The ``reason`` label for a stream or connection that ended by ``reason`` (a log or error text):
    the liveness verdicts are labelled where they are made; here gRPC's own endings."""
    text = reason.lower()
    if "keepalive" in text or "ping timeout" in text:
        return "keepalive"  # gRPC keep-alive: a ping unanswered within its timeout
    if text.startswith("write failed"):
        return "write_failed"
    if "unavailable" in text:
        return "unavailable"  # connection reset or refused, or the peer going away
    if "closed by" in text or "ended" in text:
        return "closed_by_peer"  # the peer ended the stream
    return "error"  # another gRPC status
