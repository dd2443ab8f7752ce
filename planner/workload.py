"""The queue terms of a configuration at the agent's workload (issue 11): its wait for the board and the link.

The search prices a frame alone (runtime.contracts.costmodel). At the camera's rate (the agent's
``source_interval``, planner.compute.Overhead) each frame shares the board and the link with the frames
before it, and waits for them (runtime.contracts.queueing):

* **board**: planner.compute.with_overhead already put each configuration's expected wait for the board
  into its board time (the local configuration's last block, an offloading one's encode), so the search
  ranks with it; it lists them in the device profile's ``settings`` (``BOARD_WAITS``: key -> (seconds,
  utilisation)). A plan's breakdown shows that wait as its own part, ``queue:board``, taken out of the part
  it was added to (``compute:device`` or ``encode:*``): the total is the same.
* **link**: the first hop's ``transfer`` time over the interval is the link's utilisation; its expected
  wait (the agent's reported jitter ``link_cv2`` as the service's variance) is the plan's ``queue:link``
  part, added to its prediction. The agent re-costs it at the bandwidth it measures on every result line
  (runtime.agent.prediction).

A configuration with a utilisation of 1 or more on either resource is unstable: the agent's pacing drops
frames there (a share ``1 - 1 / utilisation``), and its prediction is the drop-limited latency.
:func:`rank_key` puts every stable configuration before every unstable one, then orders by the score plus
the link wait. With no interval reported, every term is 0 and nothing changes.
"""

from __future__ import annotations

from typing import Any

from runtime.contracts.costmodel import Configuration
from runtime.contracts.profile import Profile
from runtime.contracts.queueing import DEFAULT_WINDOW, NO_WAIT, Wait, expected_wait

BOARD_WAITS = "board_wait_seconds"  # Profile.settings key (planner.compute.with_overhead): key -> (seconds, utilisation)


def board_key(cfg: Configuration) -> str:
    """The key of ``cfg``'s board wait in ``settings[BOARD_WAITS]``: "output" (local) or "CUT/TRANSFER"."""
    if not cfg.hops:
        return "output"
    h = cfg.hops[0]
    return f"{h.cut}/{h.transfer.name}"


def board(cfg: Configuration, device: Profile) -> tuple[float, float]:
    """(seconds, utilisation) of ``cfg``'s wait for the board as ``device`` holds it ((0, 0): none)."""
    got = device.settings.get(BOARD_WAITS, {}).get(board_key(cfg))
    return (float(got[0]), float(got[1])) if got else (0.0, 0.0)


def link(cfg: Configuration, device: Profile) -> Wait:
    """``cfg``'s first hop's expected wait for the link at the workload ``device`` holds (NO_WAIT: none)."""
    interval = float(device.settings.get("frame_interval", 0.0))
    if not cfg.hops or interval <= 0:
        return NO_WAIT
    window = int(device.settings.get("frame_window", DEFAULT_WINDOW))
    return expected_wait(cfg.hops[0].transfer_seconds, interval, float(device.settings.get("link_cv2", 0.0)),
                         window=window)


def unstable(cfg: Configuration, device: Profile) -> bool:
    """Whether ``cfg`` keeps the board or the link busy at least all the time at the agent's frame rate."""
    return board(cfg, device)[1] >= 1.0 or link(cfg, device).saturated


def rank_key(cfg: Configuration, device: Profile, score: float) -> tuple[bool, float]:
    """Stable configurations first, then by ``score`` plus the link wait."""
    return unstable(cfg, device), score + link(cfg, device).seconds


def annotate(plan: Any, cfg: Configuration, device: Profile) -> None:
    """Write ``cfg``'s queue terms into ``plan`` (a planner_pb2.Plan made from it): ``queue:board`` out of the
    part it was added to, ``queue:link`` added to the prediction."""
    wait, _ = board(cfg, device)
    if wait > 0:
        part = "compute:" + cfg.device_tier if not cfg.hops else f"encode:{cfg.hops[0].src_tier}->{cfg.hops[0].dst_tier}"
        if part in plan.breakdown_seconds:
            plan.breakdown_seconds[part] = max(0.0, plan.breakdown_seconds[part] - wait)
            plan.breakdown_seconds["queue:board"] = wait
    lw = link(cfg, device)
    if lw.seconds > 0:
        plan.breakdown_seconds["queue:link"] = lw.seconds
        plan.predicted_seconds += lw.seconds
