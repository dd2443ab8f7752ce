"""A source paced as a camera (``edgesplit agent --fps N``): frame ``i`` arrives at ``start + i / N``
whether or not the agent is ready for it. One that arrives while ``--window`` frames are in flight
is dropped and counted (``edgesplit_agent_dropped_frames_total``), as a camera's frame is lost when
nobody reads it, instead of queueing without end behind a slow link."""

from __future__ import annotations

from collections.abc import Callable


class Pacer:
    """Arrival times of a camera at ``fps`` (0: unpaced, ``period`` 0)."""

    def __init__(self, fps: float, clock: Callable[[], float]):
        self.period = 1.0 / fps if fps > 0 else 0.0
        self.clock = clock
        self.start: float | None = None
        self.arrived = 0  # frames that arrived (taken or dropped)
        self.dropped = 0  # frames that arrived while the agent was behind

    def wait(self) -> float:
        """Seconds until the next frame arrives (it then counts as arrived); 0 when it is already late."""
        now = self.clock()
        if self.start is None:
            self.start = now
        due = self.start + self.arrived * self.period
        self.arrived += 1
        return max(0.0, due - now)
