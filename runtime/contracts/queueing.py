"""The wait of a frame for a resource the frames before it still hold (issue 11): the board or the link.

A camera (``edgesplit agent --fps N``) offers a frame every ``T = 1 / N`` seconds; a resource that takes
``S`` seconds per frame on average is busy a share ``rho = S / T`` of the time (its utilisation). A
frame that arrives while the one before it still holds the resource waits. The cost model's parts
(block times, bytes / bandwidth) hold no such wait; this module gives its expected value, from the
workload (``S``, ``T``) and the measured spread of the service time, as one term per resource.

**Stable (rho < 1): Kingman's G/G/1 approximation** ::

    wait = rho / (1 - rho) * (ca2 + cs2) / 2 * S

``cs2`` is the squared coefficient of variation of the service time (a link's: the relative variance
of its bandwidth samples; +-20 % uniform jitter is 0.2**2 / 3 = 0.013), ``ca2`` that of the arrivals:
0 for a paced camera (Pollaczek-Khinchine's M/G/1 is the case ``ca2 = 1``, far too pessimistic for
frames that arrive on a clock). Deterministic arrivals with a steady service (``cs2 = 0``) never wait.

**Cap: the window.** The agent keeps at most ``window`` frames in flight (a frame arriving when they
are is dropped: runtime.agent.pacing), so a frame has at most ``window - 1`` frames ahead of it,
the first of them already in service. Arriving at a uniform phase of the ``T``-grid against a busy
resource, it waits ``(window - 1) * S - T / 2`` on average; the wait is capped there (and at 0).

**Saturated (rho >= 1): drop-limited.** The resource never drains: it serves one frame every ``S``
and the pacer drops the arrivals it has no room for, a share ``1 - 1 / rho`` of them (counted by the
agent: ``edgesplit_agent_dropped_frames_total``). The frames that run see the capped wait above, every
time: that is what the prediction says for an unstable plan (the drop-limited latency ``S + wait``),
with ``saturated`` set so the planner can prefer a plan that keeps every utilisation below 1.

An unknown frame interval (``T <= 0``: an unpaced source, or none reported) gives no wait: unknown
is unknown, and an unpaced source runs as fast as frames finish, so its frames queue by design.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_WINDOW = 2  # frames in flight when the source does not say (adapt_run's --window)
MAX_CS2 = 4.0  # a squared coefficient of variation beyond this is no measurement of a service: capped


@dataclass(frozen=True)
class Wait:
    """A frame's expected wait for one resource."""

    seconds: float  # expected wait before service (0 when unknown)
    utilisation: float  # S / T (0 when T is unknown)
    saturated: bool  # utilisation >= 1: the pacer drops frames and the wait is the drop-limited one
    dropped_share: float  # share of the arrivals the pacer drops in the long run (0 when stable)


NO_WAIT = Wait(0.0, 0.0, False, 0.0)


def expected_wait(service: float, interval: float, cs2: float = 0.0, *, ca2: float = 0.0,
                  window: int = DEFAULT_WINDOW) -> Wait:
    """The expected wait of a frame for a resource of mean ``service`` seconds per frame, offered one frame
    every ``interval`` seconds (see the module docstring); ``cs2`` / ``ca2``: squared coefficients of
    variation of the service and the arrivals (clamped to [0, MAX_CS2]); ``window``: frames in flight."""
    if not (interval > 0 and service > 0 and math.isfinite(interval) and math.isfinite(service)):
        return NO_WAIT
    cs2 = min(max(cs2, 0.0), MAX_CS2) if math.isfinite(cs2) else MAX_CS2
    ca2 = min(max(ca2, 0.0), MAX_CS2) if math.isfinite(ca2) else MAX_CS2
    rho = service / interval
    cap = max(0.0, (max(window, 1) - 1) * service - interval / 2)
    if rho >= 1.0:
        return Wait(cap, rho, True, 1.0 - 1.0 / rho)
    kingman = rho / (1.0 - rho) * (ca2 + cs2) / 2.0 * service
    return Wait(min(kingman, cap), rho, False, 0.0)
