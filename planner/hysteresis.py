"""When to replace a running plan: a predicted gain that is large enough, for long enough.

Pure logic with an injectable clock. The planner re-evaluates an agent whenever its conditions
change (telemetry, workers) and on a timer; each evaluation calls :meth:`Hysteresis.update` with
the running plan's predicted per-frame seconds *under the new conditions* and the best
candidate's. A switch happens only when

    current - best >= max(switch_gain * current, switch_min_gain_seconds)

has held at every evaluation for ``hold_seconds``. One evaluation below the threshold resets the
hold, so a link jittering around a break-even point never flaps between two plans. A running plan
that became infeasible (``current is None``: its worker left, was excluded, or a constraint now
rules it out) is replaced at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    switch: bool
    reason: str
    gain_seconds: float = 0.0  # current - best (negative: the candidate is worse)
    threshold_seconds: float = 0.0
    held_seconds: float = 0.0  # how long the gain has held so far


class Hysteresis:
    """Per-key (agent) hold timers; the keys are whatever the caller uses to name agents."""

    def __init__(self, switch_gain: float, min_gain_seconds: float, hold_seconds: float,
                 clock: Callable[[], float] = time.monotonic):
        self.switch_gain = switch_gain
        self.min_gain_seconds = min_gain_seconds
        self.hold_seconds = hold_seconds
        self.clock = clock
        self._since: dict[Hashable, float] = {}  # key -> when the gain first crossed the threshold

    def threshold(self, current_seconds: float) -> float:
        return max(self.switch_gain * current_seconds, self.min_gain_seconds)

    def holding(self, key: Hashable) -> bool:
        """A gain is above the threshold but has not held long enough yet (re-evaluate soon)."""
        return key in self._since

    def update(self, key: Hashable, current_seconds: float | None, best_seconds: float) -> Verdict:
        if current_seconds is None:
            self._since.pop(key, None)
            return Verdict(True, "the running plan is no longer feasible")
        gain = current_seconds - best_seconds
        threshold = self.threshold(current_seconds)
        if gain < threshold:
            self._since.pop(key, None)
            return Verdict(False, "gain below the switch threshold", gain, threshold)
        now = self.clock()
        since = self._since.setdefault(key, now)
        held = now - since
        if held >= self.hold_seconds:
            self._since.pop(key, None)
            return Verdict(True, f"predicted gain {gain * 1e3:.2f} ms >= {threshold * 1e3:.2f} ms held "
                                 f"{held:.1f} s", gain, threshold, held)
        return Verdict(False, "gain not held long enough yet", gain, threshold, held)

    def reset(self, key: Hashable) -> None:
        """Forget a pending hold (after a switch, or when the best candidate is the running plan)."""
        self._since.pop(key, None)
