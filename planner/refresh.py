"""When a kept plan is issued again only for its prediction (issue 11: predictions that follow what was measured).

The agent writes the running plan's predicted latency beside each measured one. A plan is issued with
the prediction of its moment; when the compute factors (planner.compute: the board's head time, the
worker's tail time, each over its profile) move afterwards and the same configuration stays (the best
one, or kept by the hysteresis with no switch pending), that figure goes stale. The re-planner then
issues the same configuration again with the figure the model gives now (reason "prediction"), when:

* the summed drift of the plan's model parts (:func:`drift`: ``sum |part now - part issued|`` over its
  compute, encode, decode and board wait, the link terms left as issued) is more than ``PREDICTION_REFRESH``
  (5 %, and 1 ms) of the issued prediction at every decision for ``hold_seconds`` (as a switch must hold: a
  spike of a factor re-issues nothing). It was the net change of the whole figure at 10 %: a 6 % tail drift
  and 3-4 ms of overhead no term held then never re-issued a plan whose lines were 10-17 % off (issue 11,
  adapt_run fedback8), and a part that drifted up with another that drifted down re-issued nothing either;
* the factor behind it is settled: ``REFRESH_SAMPLES`` (2) samples behind the device's or the plan worker's (was 5: at
  the agent's 10 s heartbeat a local phase of 40 s kept its old prediction throughout, issue 11);
* at most once per ``REFRESH_SECONDS`` per agent.

A link that moved within the running configuration re-issues nothing: plan versions follow
configurations and compute, and a plan kept across a bandwidth step keeps the prediction made before it
(the agent re-costs its link terms for its result lines: runtime.agent.prediction). So only the model's
part is compared: the whole re-costed figure let a lower RTT and a slower model cancel, and nothing was
re-issued while the agent's lines, re-costed at the lower RTT, were 20 % under what it measured (issue 11,
adapt_run fedback4: 60 ms predicted against 72 ms measured).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

PREDICTION_REFRESH = 0.05  # a kept plan whose parts drifted this far in all (relative to its prediction) is stale
REFRESH_SAMPLES = 2  # ... re-issued once the factor behind it has this many samples (reports come per 10 s heartbeat)
REFRESH_SECONDS = 10.0  # ... and at most this often per agent


LINK_PARTS = ("rtt:", "transfer:", "return:", "queue:link")  # the link's terms: the agent re-costs them itself


def model_parts(plan: Any, config: Any) -> tuple[dict[str, float], dict[str, float]]:
    """(issued, now): ``plan``'s breakdown and ``config``'s (a runtime.contracts.costmodel.Configuration) without
    the link terms, the issued ``queue:board`` put back into the part the configuration holds it in (its first
    hop's encode, or the board's compute for a local one: planner.workload.annotate)."""
    issued = {k: v for k, v in plan.breakdown_seconds.items() if not k.startswith(LINK_PARTS)}
    wait = issued.pop("queue:board", 0.0)
    if wait:
        part = f"encode:{config.hops[0].src_tier}->{config.hops[0].dst_tier}" if config.hops else f"compute:{config.device_tier}"
        issued[part] = issued.get(part, 0.0) + wait
    now = {k: v for k, v in config.breakdown().items() if not k.startswith(LINK_PARTS)}
    return issued, now


def drift(plan: Any, config: Any) -> float:
    """The summed drift of ``plan``'s model parts re-costed as ``config``: ``sum |now - issued|`` (seconds)."""
    issued, now = model_parts(plan, config)
    return float(sum(abs(now.get(k, 0.0) - issued.get(k, 0.0)) for k in issued.keys() | now.keys()))


def drifted(plan: Any, config: Any) -> bool:
    """Whether ``plan``'s parts drifted by more than PREDICTION_REFRESH of its prediction (and 1 ms) in all."""
    issued = plan.predicted_seconds
    return bool(issued > 0 and drift(plan, config) > max(PREDICTION_REFRESH * issued, 1e-3))


class Refresh:
    """Per agent: since when its kept plan's prediction is stale, and when it was last re-issued."""

    def __init__(self, hold_seconds: float, clock: Callable[[], float]):
        self.hold_seconds = hold_seconds
        self.clock = clock
        self._refreshed: dict[str, float] = {}  # agent id -> clock time of its last re-issue
        self._stale_since: dict[str, float] = {}  # agent id -> clock time its kept plan's prediction went stale

    @property
    def memos(self) -> tuple[dict[str, float], ...]:
        """The per-agent dicts (the re-planner drops agents it no longer holds)."""
        return self._refreshed, self._stale_since

    def due(self, st: Any, cause: str, config: Any) -> bool:
        """Whether agent state ``st``'s kept plan, re-costed now as ``config``, is to be issued again (see the module docstring)."""
        aid, now = st.record.id, self.clock()
        if not drifted(st.plan, config):
            self._stale_since.pop(aid, None)
            return False
        since = self._stale_since.setdefault(aid, now)
        if cause != "compute" or now - since < self.hold_seconds:
            return False
        tail = st.tails.speeds.get(st.plan.worker_id) if st.plan.worker_id else None
        settled = st.speed.samples >= REFRESH_SAMPLES or (tail is not None and tail.samples >= REFRESH_SAMPLES)
        return settled and now - self._refreshed.get(aid, -math.inf) >= REFRESH_SECONDS

    def done(self, agent_id: str) -> None:
        """The kept plan of ``agent_id`` was issued again now."""
        self._refreshed[agent_id] = self.clock()
        self._stale_since.pop(agent_id, None)
