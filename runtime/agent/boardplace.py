"""Where a lone frame's board work runs: on the event loop's own thread, or handed to the board thread and back
(issue 14).

Handing the head to the board thread keeps the loop free (stream probes, the local API, the planner link) while it
runs, for the price of waking the loop's thread again when it ends: 0.07-0.2 ms on a free CPU. Under a CFS CPU
quota (a container's CPU limit, the headline benchmark's emulated board) that wake-up can wait for the quota's next
period: measured on the emulated board (3.3 ms per 50 ms period, MobileNetV2's head after ``features_7_conv_3``,
2026-12-05 03:44 UTC), 12 of 20 frames waited 44-49 ms between the end of their encode and the loop taking them up,
while the work the board thread did after the head and the loop's own next steps never waited; with a
``torch.mm`` job of 9 ms CPU in a loop, 26-28 of 30 hand-offs waited (p50 95 ms), 15-23 of 30 with every thread
pinned to one CPU, and 0-1 of 30 with the job on the loop's thread (runtime/measure/results/board_handoff.md).

So the agent times every hand-off back (``board_return``, an agent stage) and, once the recent ones are measured to
stall (the lower median of the last :data:`HANDOFF_WINDOW` over :data:`HANDOFF_STALL_SECONDS`, at least two
of them), runs a lone frame's board work of up to :data:`STALLED_INLINE_SECONDS` on the loop's thread. The loop
is then held for the head (the liveness watchdog excuses a held loop, runtime.wire.liveness), and every
:data:`HANDOFF_RECHECK_FRAMES`-th such frame still goes through the board thread, so that a quota lifted (or a
stall gone) is seen again. Frames in flight together always use the board thread: it is what overlaps them. So
does a lone frame while the prober is timing a call on the loop (runtime.agent.prober's RTT checks and payloads,
``LinkEstimator.timing``): held for the head, the loop would take the answer up late and the probe would read the
link slower than it is (a 50 ms probe under a 0.3 s head: ~7x).
"""

from __future__ import annotations

import logging
import statistics
from collections import deque

logger = logging.getLogger(__name__)

INLINE_BOARD_SECONDS = 0.02  # a lone frame whose board work took at most this runs on the loop's thread (0: never)
HANDOFF_STALL_SECONDS = 0.005  # a hand-off back slower than this waited for something (a free CPU: 0.07-0.2 ms)
HANDOFF_WINDOW = 8  # the recent hand-offs judged
STALLED_INLINE_SECONDS = 0.5  # the longest board work run on the loop's thread while hand-offs stall
HANDOFF_RECHECK_FRAMES = 16  # while they stall, one lone frame in this many still goes through the board thread


class BoardPlacement:
    """The agent's choice, frame by frame, between its loop's thread and its board thread for a lone frame's board
    work, from the board time of the plan's last frame and the hand-offs measured so far."""

    def __init__(self, window: int = HANDOFF_WINDOW, stall_seconds: float = HANDOFF_STALL_SECONDS,
                 stalled_inline_seconds: float = STALLED_INLINE_SECONDS, recheck: int = HANDOFF_RECHECK_FRAMES):
        self.handoffs: deque[float] = deque(maxlen=window)  # seconds, board job's end -> the loop running its frame
        self.stall_seconds = stall_seconds
        self.stalled_inline_seconds = stalled_inline_seconds
        self.recheck = recheck
        self._since_check = 0  # lone frames run on the loop because hand-offs stall, since the last one handed off
        self._stalled = False

    @property
    def stalled(self) -> bool:
        """Whether the recent hand-offs back to the loop are measured to wait (at least two of them)."""
        return self._stalled

    def handed_back(self, seconds: float) -> None:
        """One hand-off measured: a board job's end to its frame running on the loop again."""
        self.handoffs.append(max(0.0, seconds))
        stalled = len(self.handoffs) >= 2 and statistics.median_low(self.handoffs) > self.stall_seconds
        if stalled != self._stalled:
            self._stalled = stalled
            lower = statistics.median_low(self.handoffs) * 1e3
            if stalled:
                logger.info("hand-offs from the board thread back to the loop wait %.1f ms (lower median of the last "
                            "%d; a CPU quota?): a lone frame's board work up to %.2f s now runs on the loop's thread",
                            lower, len(self.handoffs), self.stalled_inline_seconds)
            else:
                logger.info("hand-offs from the board thread back to the loop take %.2f ms again: board work over "
                            "the inline bound goes to the board thread", lower)

    def inline(self, board_seconds: float, inline_seconds: float, hold: bool = True) -> bool:
        """Whether a lone frame runs its board work on the loop's thread, its plan's last frame having taken
        ``board_seconds`` there; ``inline_seconds``: the bound for a board whose hand-offs do not stall (0: never);
        ``hold``: whether the loop may be held past that bound now (not while a network call is timed on it: the
        prober's probes, which a held loop would read slower than the link)."""
        if inline_seconds <= 0:
            return False
        if board_seconds <= inline_seconds:
            return True
        if not hold or not self._stalled or board_seconds > self.stalled_inline_seconds:
            return False
        self._since_check += 1
        if self._since_check >= self.recheck:  # this one through the board thread: is the hand-off still slow?
            self._since_check = 0
            return False
        return True
