"""Frames sent and not yet answered, per link, and the early sign of a collapsed link (issue 11).

The agent records each frame it sends (:meth:`InFlight.sent`: its send time and the bytes ahead of
it, its own included) until its result, deadline or failure (:meth:`InFlight.done`). A watcher
looks every ``period`` seconds once a frame has been in flight ``min_late_seconds`` (no frame can be late
sooner, so the many frames answered within that are never looked at: a timer armed at the send and
cancelled with the last answer, not a task and a wake-up every 50 ms; issue 14): a frame still in flight ``late_factor`` times longer than the link's
estimate says its bytes should take (bytes ahead / bandwidth + base RTT + the longest of the worker's
holds of the last ``HOLDS`` answered frames: a starved worker is not a slow link), and at least
``min_late_seconds``, is an upper bound of the bandwidth before its deadline: the bytes ahead did
not get through in that time. It goes to the link estimator once per frame
(:meth:`runtime.agent.telemetry.LinkEstimator.observe_late`): with a prober, a small probe on a
connection of its own checks it at once (a stalled worker makes frames late too, and answers the
probe quickly; a collapsed link does not), and a confirmed bound is a step on its own; without one,
a frame 8x late is an ordinary sample (two in a row make a step). A link that collapses shows within
a few hundred milliseconds instead of a deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from typing import Any

LATE_FACTOR = 3.0  # a frame this many times later than the estimate says is evidence of a slower link (checked)
MIN_LATE_SECONDS = 0.1  # and at least this late
PERIOD = 0.05  # seconds between two looks
HOLDS = 4  # answered frames whose worker hold is remembered per link (the longest counts)


class InFlight:
    """Per link (worker address): frames in flight, and the bytes they hold."""

    def __init__(self, link: Any, late_factor: float = LATE_FACTOR, min_late_seconds: float = MIN_LATE_SECONDS,
                 period: float = PERIOD):
        self.link = link  # a runtime.agent.telemetry.LinkEstimator
        self.late_factor, self.min_late_seconds, self.period = late_factor, min_late_seconds, period
        self._frames: dict[str, dict[int, list]] = defaultdict(dict)  # address -> seq -> [sent at, ahead, seen late]
        self._bytes: dict[str, int] = defaultdict(int)
        # the worker's holds (last byte in -> result out, from its own clock) of the latest answered frames,
        # per address (runtime.agent.edge reports them): time the link is not to blame for
        self._holds: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=HOLDS))
        self._timer: asyncio.TimerHandle | None = None  # the watcher's next look, while frames are in flight
        self._count = 0  # frames in flight, all links
        self.late = 0  # frames taken as early upper bounds

    def note_hold(self, address: str, seconds: float) -> None:
        """The worker held an answered frame of link ``address`` this long (from its receive/send times)."""
        self._holds[address].append(seconds)

    def hold(self, address: str) -> float:
        """The longest recent worker hold on link ``address`` (0.0 when none is known)."""
        holds = self._holds.get(address)
        return max(holds) if holds else 0.0

    def bytes(self, address: str) -> int:
        """Bytes sent on ``address`` and not yet answered."""
        return self._bytes.get(address, 0)

    def sent(self, address: str, seq: int, nbytes: int) -> int:
        """Frame ``seq`` of ``nbytes`` is being sent; returns the bytes ahead of it, its own included."""
        self._bytes[address] += nbytes
        ahead = self._bytes[address]
        frames = self._frames[address]
        self._count += seq not in frames
        frames[seq] = [time.perf_counter(), ahead, False]
        if self._timer is None:  # the first look when this frame could first be late (an earlier one stays)
            self._timer = asyncio.get_running_loop().call_later(self.min_late_seconds, self._fire)
        return ahead

    def done(self, address: str, seq: int, nbytes: int) -> None:
        self._bytes[address] -= nbytes
        if self._frames[address].pop(seq, None) is not None:
            self._count -= 1
        if not self._count and self._timer is not None:  # none left to look at
            self._timer.cancel()
            self._timer = None

    def look(self, now: float) -> int:
        """One look at every frame in flight; returns how many were taken as late."""
        taken = 0
        for address, frames in self._frames.items():
            est = self.link.links.get(address)
            if est is None or est.bandwidth.value <= 0:
                continue
            for entry in frames.values():
                sent_at, ahead, seen = entry
                elapsed = now - sent_at
                held = self.hold(address)
                expected = ahead / est.bandwidth.value + est.rtt.value + held
                if not seen and elapsed > max(self.min_late_seconds, self.late_factor * expected):
                    bound = ahead / max(elapsed - est.rtt.value - held, 1e-6)
                    if self.link.observe_late(address, bound, elapsed / max(expected, 1e-9)):
                        entry[2] = True
                        taken += 1
        self.late += taken
        return taken

    def _fire(self) -> None:
        """The watcher: a look, and the next one ``period`` later while frames are in flight."""
        self._timer = None
        if self._count:
            self.look(time.perf_counter())
            self._timer = asyncio.get_running_loop().call_later(self.period, self._fire)

    async def close(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
