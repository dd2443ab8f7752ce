"""Link-aware liveness of one stream (issue 10): a stream is dead when its bytes stop making progress
for longer than the link could need to carry what is outstanding.

gRPC keep-alive cannot tell a partition from a slow link: its ping queues behind the frames already
sent, so a timeout short enough to notice a partition quickly (2 s) kills every stream that carries a
400 KB frame over 1.6 Mbit/s. Here the allowance follows the link::

    allowance = max(floor, slack * outstanding bytes / bandwidth + RTT)

where *outstanding* is the bytes of frames sent and not yet answered, and *progress* is anything the
peer sends back: a result, or the answer to a probe sent on the same connection (it queues behind
the same bytes, so its answer proves they moved). The clock starts when the first frame becomes
outstanding and restarts at each progress; an idle stream is never declared dead here (keep-alive
covers it: nothing queues ahead of its ping). ``slack`` covers estimate error and the worker's compute
time, which the allowance does not know. Without a bandwidth estimate (a link never measured) the
allowance is unknown: the stream then relies on keep-alive only ("unknown is unknown").

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


@dataclass(frozen=True)
class LivenessOptions:
    """When a stream with frames outstanding is declared dead (documented defaults)."""

    floor_seconds: float = 2.0  # never sooner than this after the last progress (the <= 2 s detection target)
    slack: float = 1.5  # times the bytes' transfer time at the estimated bandwidth (estimate error, compute)
    probe_after_seconds: float = 0.5  # with no progress this long, ask the peer (a probe on the same connection)
    tick_seconds: float = 0.1  # how often the watchdog looks

    def __post_init__(self) -> None:
        if not (self.floor_seconds > 0 and self.slack >= 1 and self.probe_after_seconds > 0 and self.tick_seconds > 0):
            raise ValueError(f"liveness options out of range: {self}")


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
        """Seconds of no progress after which the stream is dead; None: unknown (no bandwidth estimate)."""
        if self.hint is None:
            return None
        bandwidth, rtt = self.hint()
        if not bandwidth > 0:
            return None
        o = self.options
        return max(o.floor_seconds, o.slack * self.outstanding_bytes / bandwidth + max(rtt, 0.0))

    def stalled(self) -> float:
        """Seconds without progress while something is outstanding (0.0 when idle)."""
        return self.clock() - self.progress_at if self.outstanding else 0.0

    def verdict(self) -> str:
        """Why the stream is dead, or "" while it is alive (or idle, or the allowance unknown)."""
        stalled = self.stalled()
        if stalled <= self.options.floor_seconds:
            return ""
        allowance = self.allowance()
        if allowance is None or stalled <= allowance:
            return ""
        return (f"no progress for {stalled:.1f}s with {self.outstanding_bytes} bytes outstanding "
                f"(allowed {allowance:.1f}s at the link's estimated bandwidth)")

    def wants_probe(self) -> bool:
        return self.stalled() > self.options.probe_after_seconds
