"""Link-aware liveness of one stream (issue 10): a stream is dead when its bytes stop making progress
and the path to its peer falls silent, when they stop making progress for longer than the link could
need to carry what is outstanding, or, when nothing is outstanding, when the peer stops answering probes.

gRPC keep-alive cannot tell a partition from a slow link: its ping queues behind the frames already
sent, so a timeout short enough to notice a partition quickly (2 s) kills every stream that carries a
400 KB frame over 1.6 Mbit/s. Here a stream with frames outstanding is dead when either holds::

    no progress for floor, and no answer on the path for floor           (the path is silent)
    no progress for max(floor, slack * outstanding bytes / bandwidth + RTT)   (the link estimate's allowance)

and an idle stream when no progress for floor (nothing queues on it: a probe answers in a round trip).

*Progress* is anything the peer sends back on the stream's connection: a result, or the answer to a
probe sent on that connection (it queues behind the same bytes, so its answer proves they moved). On an idle
stream whose worker advertised it, that probe is a ``StreamProbe`` message on the stream itself, echoed by the
worker (runtime.wire.streamprobe; issue 14: one write where a unary Health/Check was a new call); otherwise, and
with frames outstanding, a Health/Check on the same connection. The rules and the floor are the same for both. The
*path* is a second connection to the same peer (``TransportOptions.probe_channel``: a TCP connection of
its own, opened with the stream's first frame), on which nothing bulky is ever sent: a probe there
(grpc.health.v1 Health/Check) queues behind no frame in the sender, so its answer within the floor
proves the peer and the network between are alive, however long the frames' bytes take. A probe goes,
on each, after ``probe_after_seconds`` without an answer on it, so on a live link the answers never stop
for longer than that plus a round trip. The clocks restart at each answer and when the first frame
becomes outstanding.

So a silent partition (every byte swallowed, no RST) of a busy stream is declared ``floor`` after the
last answer, whatever the link's estimate: with no estimate at all (a link never measured, e.g. a
statically configured agent's first frames), and with a large one (a slow link); a slow but live link
is never killed by it, since its path answers (tests/test_liveness.py: 401 KB at 1.6 Mbit/s, never
measured). The second rule catches what the path cannot: a connection that died alone (a middlebox
dropping its state) while a new connection works; with no estimate that case is left to keep-alive
(10 s + 60 s on frame channels), "unknown is unknown".

The allowance uses the link's estimate as it was at the last progress (``hint`` read when the clock
restarts), never one taken during the stall: a frame that misses its deadline during a partition
becomes a censored sample (an upper bound on the link's bandwidth, runtime.agent.estimator) which
would otherwise stretch the allowance of the very stall it came from (9.0 s was measured so).

``floor`` (1.5 s) is the whole detection: from the last answer to the verdict, the probe's round trip
included; the watchdog wakes at the instant a verdict is due, so a silent partition is declared within
floor + one wake-up, under the 2 s target (an answer or a new frame that brings a probe forward moves the
watchdog's wake-up: it never polls). A live link has ``floor - probe_after`` (1 s) for a probe's
answer. ``slack`` covers estimate error and the worker's compute time, which the allowance does not
know. Time the sender's own event loop could not run (the watchdog woke late: a CPU-starved process, a
blocked loop) is not counted against the peer (:meth:`Liveness.excuse`): an answer that arrived meanwhile
could not be read.

The estimate lags a step down: right after a link drops, a frame larger than ``floor`` seconds at the
new rate can be declared dead on the old estimate by the second rule. That is taken as evidence, not
hidden: the frames in flight run locally, their bytes become censored samples (the link did not carry
them in that time), and the stream reopens within the reconnect back-off (<= 2 s). In steady state the
estimate knows the rate and such a frame is waited for.

Limits: the path probe queues behind nothing in the sender, but on a shared bottleneck it does queue
behind the frames' bytes in the router's buffer; a buffer holding more than ``floor - probe_after``
(1 s) of the link would make a live link look silent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# (bandwidth bytes/s or 0.0 when unknown, base RTT seconds or 0.0) of the link a stream runs on
LinkHint = Callable[[], tuple[float, float]]

# why a stream was declared dead (the ``reason`` label of the stream-death counters)
NO_PROGRESS = "no_progress"  # frames outstanding, nothing back (and the path silent, or past the allowance)
PROBE_UNANSWERED = "probe_unanswered"  # idle, and the peer did not answer a probe within the floor

LAG_TOLERANCE_SECONDS = 0.02  # a watchdog wake-up later than this is the sender's loop stalling (excused)


@dataclass(frozen=True)
class LivenessOptions:
    """When a stream is declared dead (documented defaults; README "Liveness")."""

    # dead after this long without an answer (no progress, and the path silent too when frames are
    # outstanding; idle: no probe answered): the whole detection, a probe's round trip included,
    # within the 2 s target with room for one wake-up
    floor_seconds: float = 1.5
    slack: float = 1.5  # times the bytes' transfer time at the estimated bandwidth (estimate error, compute)
    # with no answer this long, ask the peer (a probe on the same connection and, frames outstanding, one
    # on the path's own connection); a live link has floor - probe_after for the answer
    probe_after_seconds: float = 0.5
    idle_probes: bool = True  # probe an idle stream too (False: keep-alive alone watches it, 70 s)
    # frames outstanding: probe the peer on a connection of its own too, and declare the stream dead when
    # that path is silent for the floor, estimate or not (False: the estimate's allowance alone; a link
    # never measured then relies on its frames' deadlines and keep-alive)
    path_probes: bool = True
    # the watchdog's longest sleep, a backstop: it wakes when a probe or the verdict is due, and an answer or a
    # new frame that brings one forward moves its wake-up (runtime.wire.stream; was 0.25 s, 4 wake-ups a
    # second busy or idle: ~1 ms/s of the agent's CPU; issue 14)
    tick_seconds: float = 1.0

    def __post_init__(self) -> None:
        if not (self.floor_seconds > 0 and self.slack >= 1 and 0 < self.probe_after_seconds < self.floor_seconds
                and self.tick_seconds > 0):
            raise ValueError(f"liveness options out of range (probe_after_seconds must be below floor_seconds): {self}")


class Liveness:
    """Progress bookkeeping for one stream epoch; the stream calls ``sent``/``answered``/``probe_answered``
    and, when it has a path (a second connection to the peer), ``path_answered``."""

    def __init__(self, hint: LinkHint | None, options: LivenessOptions | None = None,
                 clock: Callable[[], float] = time.monotonic, path: bool = False):
        self.hint = hint
        self.options = options or LivenessOptions()
        self.clock = clock
        self.path = path and self.options.path_probes  # whether path probes are asked (the stream has a path)
        self.outstanding: dict[int, int] = {}  # seq -> bytes sent and not answered
        self.abandoned: dict[int, float] = {}  # seq -> when the sender gave up on it (it may never be answered)
        self.progress_at = clock()
        self.path_at = self.progress_at  # the last answer on the path (or progress: the stream's own answer)
        self.estimate = self._read_hint()  # the link's (bandwidth, RTT) at the last progress
        self.excused = 0.0  # seconds of the sender's own loop stalls not counted against the peer
        self.path_answers = 0  # path probes answered (for tests and logs)
        self.reason = ""  # NO_PROGRESS or PROBE_UNANSWERED once verdict() found the stream dead

    def _read_hint(self) -> tuple[float, float]:
        return self.hint() if self.hint is not None else (0.0, 0.0)

    def _restart(self) -> None:
        """Progress: the clocks restart, and the allowance takes the link's estimate as it is now."""
        self.progress_at = self.path_at = self.clock()
        self.estimate = self._read_hint()

    @property
    def outstanding_bytes(self) -> int:
        return sum(self.outstanding.values())

    def sent(self, seq: int, nbytes: int) -> None:
        if not self.outstanding:
            self._restart()  # the wait starts with the first outstanding frame
        self.outstanding[seq] = nbytes

    def answered(self, seq: int) -> None:
        """A result for ``seq`` arrived: progress, and its bytes are through."""
        self.outstanding.pop(seq, None)
        self.abandoned.pop(seq, None)
        self._restart()

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
        """A probe sent at ``sent_at`` on the stream's connection was answered: the bytes sent before it got
        through (one connection, in order), so frames abandoned before then are no longer waited for."""
        for seq, when in list(self.abandoned.items()):
            if when <= sent_at:
                self.forget(seq)
        self._restart()

    def path_answered(self) -> None:
        """A probe on the path's own connection was answered: the peer and the network are alive (the
        stream's bytes may still be on their way: no progress)."""
        self.path_at = max(self.path_at, self.clock())
        self.path_answers += 1

    def excuse(self, seconds: float) -> None:
        """The sender's own loop could not run for ``seconds`` (an answer that came meanwhile was not read):
        not counted against the peer; the clocks move forward by it, never past now."""
        if seconds <= 0:
            return
        now = self.clock()
        self.progress_at = min(now, self.progress_at + seconds)
        self.path_at = min(now, self.path_at + seconds)
        self.excused += seconds

    def allowance(self) -> float | None:
        """Seconds of no progress after which the stream is dead by the link estimate's rule; None: unknown
        (frames outstanding and no bandwidth estimate at the last progress, or an idle stream not probed)."""
        o = self.options
        if not self.outstanding:
            return o.floor_seconds if o.idle_probes else None
        bandwidth, rtt = self.estimate
        if not bandwidth > 0:
            return None
        return max(o.floor_seconds, o.slack * self.outstanding_bytes / bandwidth + max(rtt, 0.0))

    def stalled(self) -> float:
        """Seconds without progress (busy or idle)."""
        return self.clock() - self.progress_at

    def silent(self) -> float:
        """Seconds without an answer on the stream or, frames outstanding, on the path."""
        return self.clock() - max(self.progress_at, self.path_at)

    def verdict(self) -> str:
        """Why the stream is dead, or "" while it is alive (or the allowance unknown); sets ``reason``."""
        o = self.options
        stalled = self.stalled()
        if stalled <= o.floor_seconds:
            return ""
        if not self.outstanding:
            if not o.idle_probes:
                return ""
            self.reason = PROBE_UNANSWERED
            return f"idle, and no answer to a probe for {stalled:.1f}s (allowed {o.floor_seconds:.1f}s)"
        if self.path and self.silent() > o.floor_seconds:
            self.reason = NO_PROGRESS
            return (f"no progress for {stalled:.1f}s with {self.outstanding_bytes} bytes outstanding, and no answer "
                    f"on a connection of its own for {self.silent():.1f}s (allowed {o.floor_seconds:.1f}s)")
        allowance = self.allowance()
        if allowance is None or stalled <= allowance:
            return ""
        self.reason = NO_PROGRESS
        return (f"no progress for {stalled:.1f}s with {self.outstanding_bytes} bytes outstanding "
                f"(allowed {allowance:.1f}s at the link's estimated bandwidth)")

    def wants_probe(self) -> bool:
        """Whether to ask the peer on the stream's connection."""
        if not (self.outstanding or self.options.idle_probes):
            return False
        return self.stalled() > self.options.probe_after_seconds

    def wants_path_probe(self) -> bool:
        """Whether to ask the peer on the path's own connection (frames outstanding, no answer for a while)."""
        return bool(self.path and self.outstanding) and self.silent() > self.options.probe_after_seconds

    def next_check(self) -> float:
        """Seconds until a probe or the verdict may be due (the watchdog sleeps this long, at most a tick)."""
        o = self.options
        stalled, silent = self.stalled(), self.silent()
        due = [o.tick_seconds]
        dues = [(stalled, o.probe_after_seconds), (stalled, self.allowance())]
        if self.path and self.outstanding:
            dues += [(silent, o.probe_after_seconds), (silent, o.floor_seconds)]
        for elapsed, at in dues:
            if at is not None and at > elapsed:
                due.append(at - elapsed + 0.005)  # just past the instant, so the check sees it due
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
