"""Keep the garbage collector's full scans short in a planner holding thousands of agents (issue 15).

CPython's cyclic collector scans every tracked object in its oldest generation when that
generation has grown by a quarter. A planner with 10,000 agents holds ~300,000 such objects
(records, states, plans, links); a full scan took 147 ms here, a stall of the event loop that
health checks and plan pushes wait behind, every few tens of seconds under telemetry (each
report replaces a link estimate, and the replaced ones fill the oldest generation).

:class:`GcFreezer` moves what is alive after a registration burst out of the scans
(``gc.collect()`` once, then ``gc.freeze()``): the agents' states live as long as the agents. It
does so from ``min_agents`` agents on, and again each time the agents grew by ``GROWTH`` (a
tenth: 25 times on the way to 10,000 from 1,000), so the automatic full scans only see what was
created since. The planner checks at each registration (a comparison) and in its periodic pass.

While the agents grow (a registration ramp), the automatic full collections are held off and the
freezes at each step do their work instead; once no freeze was needed for ``SETTLE_SECONDS`` the
collector's own thresholds are back. Only the first freeze runs a full collection first. During a
10,000-agent registration ramp (before this) a full collection before each freeze took up to
310 ms and found 0 objects to free, and the automatic full collections between freezes grew to
295 ms wall (up to 282 ms of CPU) each and found 11-756 objects: the event loop (health checks,
plan pushes) waited behind them. Now a freeze collects the young generations only (a few ms) and
freezes the rest: a reference cycle that became garbage in the oldest generation since the
previous freeze is frozen with it and never freed (judging by those collections, tens to hundreds
of small objects per freeze, and freezes stop when the agents stop growing). A frozen object is
still freed when its last reference goes.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

GROWTH = 1.1  # freeze again when the agents grew by this factor since the last freeze
SETTLE_SECONDS = 30.0  # no freeze for this long: the ramp is over, automatic full collections again
HELD_OFF = 1_000_000_000  # the oldest generation's threshold while a ramp holds its collections off


class GcFreezer:
    def __init__(self, min_agents: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_agents = min_agents  # 0: never
        self.frozen_at = 0  # agents at the last freeze
        self.freezes = 0
        self.clock = clock
        self.last_freeze = -float("inf")  # clock time of the last freeze
        self.held: tuple[int, int, int] | None = None  # the collector's thresholds while held off (a ramp)

    def check(self, agents: int) -> bool:
        """Freeze if ``agents`` reached the threshold (or grew by ``GROWTH`` since the last freeze);
        True when it did. Between freezes of a ramp the automatic full collections are held off; they
        are back ``SETTLE_SECONDS`` after the last freeze (checked here too: call it now and then)."""
        if not self.min_agents or agents < max(self.min_agents, self.frozen_at * GROWTH):
            if self.held is not None and self.clock() - self.last_freeze >= SETTLE_SECONDS:
                gc.set_threshold(*self.held)
                self.held = None
            return False
        t0 = time.perf_counter()
        gc.collect(2 if not self.freezes else 1)  # a full scan only the first time (see the module docstring)
        gc.freeze()
        if self.held is None:
            self.held = gc.get_threshold()
            gc.set_threshold(self.held[0], self.held[1], HELD_OFF)
        self.frozen_at, self.freezes, self.last_freeze = agents, self.freezes + 1, self.clock()
        # not gc.get_freeze_count(): it walks every frozen object (~70 ms per 4 million, on the loop)
        logger.info("%d agents: objects moved out of the garbage collector's scans in %.0f ms", agents,
                    (time.perf_counter() - t0) * 1e3)
        return True
