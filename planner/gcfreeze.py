"""Keep the garbage collector's full scans short in a planner holding thousands of agents (issue 15).

CPython's cyclic collector scans every tracked object in its oldest generation when that
generation has grown by a quarter. A planner with 10,000 agents holds ~300,000 such objects
(records, states, plans, links); a full scan took 147 ms here, a stall of the event loop that
health checks and plan pushes wait behind, every few tens of seconds under telemetry (each
report replaces a link estimate, and the replaced ones fill the oldest generation).

:class:`GcFreezer` moves what is alive after a registration burst out of the scans
(``gc.collect()`` once, then ``gc.freeze()``): the agents' states live as long as the agents. It
does so from ``min_agents`` agents on, and again each time the agents grew by a quarter (ten
times on the way to 10,000 from 1,000), so later full scans only see what was created since.
A frozen object is still freed when its last reference goes; only a reference cycle among
frozen objects outlives its use (after one collection nothing alive is such garbage).
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger(__name__)

GROWTH = 1.25  # freeze again when the agents grew by this factor since the last freeze


class GcFreezer:
    def __init__(self, min_agents: int) -> None:
        self.min_agents = min_agents  # 0: never
        self.frozen_at = 0  # agents at the last freeze
        self.freezes = 0

    def check(self, agents: int) -> bool:
        """Freeze if ``agents`` reached the threshold (or grew by a quarter since the last freeze);
        True when it did."""
        if not self.min_agents or agents < max(self.min_agents, self.frozen_at * GROWTH):
            return False
        t0 = time.perf_counter()
        gc.collect()
        gc.freeze()
        self.frozen_at, self.freezes = agents, self.freezes + 1
        logger.info("%d agents: %d objects moved out of the garbage collector's scans in %.0f ms", agents,
                    gc.get_freeze_count(), (time.perf_counter() - t0) * 1e3)
        return True
