"""The board's quota, calibrated on the local run itself (the decisions only; the board child times the passes).

The local strategy is ``frames`` whole-model passes back to back (``loaded.full``, one torch thread, under the
quota). The calibration used to time 5 such passes right after the board joined its group and accept a quota once
they were within the tolerance of the target; the local run came minutes later, after the profile. On 2026-12-04
that gave 16.6x / 17.5x in calibration and 14.5x / 14.0x in the local run (MobileNetV2 / EfficientNet-Lite0), and
14.0-20.6x across models. Both time the same passes the same way; what differs is when and how many:

* under the quota a pass costs the board 1.3-2.3x the CPU it costs unrestricted, and that cost drifts with the
  rest of the machine: MobileNetV2 at one fixed quota, blocks of 10-20 back-to-back passes within a minute, had
  block medians of 287-502 ms (the same block's CPU 30-52 ms against 22-37 ms free); pinning to one CPU or a
  period's gap before each pass did not steady it (runtime/measure/results/scenarios_calibration.md);
* a pass's time comes in whole quota periods (50 ms): 5 passes' median moves in steps of 10-17 % of a 300-500 ms
  model.

So the quota is set in two steps: coarse rounds of ``runs`` passes move it to the target; the board is profiled;
then the local run itself (``frames`` passes, the ones the report shows, right before the strategies) is the check: outside the tolerance, the quota is moved by its
ratio and the local run timed again, ``local_rounds`` times at most, every attempt kept in the results. The free
(unrestricted) time is the median of every free pass so far, timed before each round, so one noisy block does not
set it. The board can still drift after the local run: the runner times the same passes once more after the
strategies (:func:`recheck`) and the report warns when either run is outside the tolerance.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MIN_QUOTA_US = 1000  # the kernel refuses a cfs quota below 1 ms

Passes = Callable[[int], list[float]]  # n passes -> ms each (in order)


@dataclass(frozen=True)
class Settings:
    """What the calibration aims at and how long it may try (runtime.measure.scenarios.spec.Testbed's fields)."""

    target: float  # board / unrestricted full-model time
    tolerance: float  # accepted: |slowdown / target - 1| <= tolerance
    period_us: int
    first_quota_us: int
    rounds: int  # coarse rounds at most
    runs: int  # passes per coarse round, and free passes before each round
    frames: int  # passes of the local run (the strategy's frames)
    local_rounds: int  # local runs at most


def within(slowdown: float, target: float, tolerance: float) -> bool:
    return abs(slowdown / target - 1) <= tolerance


def next_quota(quota_us: int, slowdown: float, target: float, period_us: int) -> int:
    """The quota that would have given ``target`` if time scaled inversely with it (1 ms .. one period)."""
    return max(MIN_QUOTA_US, min(period_us, round(quota_us * slowdown / target)))


def calibrate(s: Settings, free: Passes, board: Passes, set_quota: Callable[[int], None],
              between: Callable[[], object] | None = None) -> dict[str, Any]:
    """Coarse rounds, ``between()`` (the board's profile: the local run comes last, nearest the strategies), then
    the local run until it is within the tolerance (or ``local_rounds`` runs were made). ``free(n)``/``board(n)``:
    n passes unrestricted / under the quota last set by ``set_quota``. The quota is never changed after the run
    whose figures are returned. Returns the results' ``calibration`` dict: the local run's passes (``local_ms``),
    its slowdown and quota, and every round."""
    free_ms: list[float] = []
    rounds: list[dict[str, Any]] = []
    quota = s.first_quota_us
    set_quota(quota)

    def measure(n: int, kind: str) -> tuple[list[float], float]:
        free_ms.extend(free(s.runs))
        ms = board(n)
        base = statistics.median(free_ms)
        slow = statistics.median(ms) / base
        rounds.append({"kind": kind, "quota_us": quota, "passes": n, "device_ms": statistics.median(ms),
                       "free_ms": base, "slowdown": slow})
        return ms, slow

    coarse: float | None = None
    for _ in range(s.rounds):
        _, coarse = measure(s.runs, "coarse")
        quota = next_quota(quota, coarse, s.target, s.period_us)  # the local run follows: always re-aim
        set_quota(quota)
        if within(coarse, s.target, s.tolerance):
            break
    if between is not None:
        between()
    local: list[float] = []
    slow = 0.0
    for i in range(s.local_rounds):
        local, slow = measure(s.frames, "local")
        if within(slow, s.target, s.tolerance) or i == s.local_rounds - 1:
            break
        quota = next_quota(quota, slow, s.target, s.period_us)
        set_quota(quota)
    base = statistics.median(free_ms)
    return {"free_ms": base, "free_passes": len(free_ms), "quota_us": quota, "period_us": s.period_us,
            "slowdown": slow, "device_ms": statistics.median(local), "local_ms": local,
            "coarse_slowdown": coarse, "within": within(slow, s.target, s.tolerance), "rounds": rounds,
            "target": s.target, "tolerance": s.tolerance}


def recheck(cal: dict[str, Any], free: Passes, board: Passes, n: int) -> dict[str, Any]:
    """The local run's passes once more at the same quota (after the strategies): its slowdown against the
    calibration's free time (the board's drift alone), and against free passes timed now."""
    now = free(n)
    ms = board(n)
    p50 = statistics.median(ms)
    slow = p50 / cal["free_ms"]
    return {"passes": n, "device_ms": p50, "slowdown": slow, "free_now_ms": statistics.median(now),
            "slowdown_free_now": p50 / statistics.median(now),
            "within": within(slow, cal["target"], cal["tolerance"])}


def warnings(cal: dict[str, Any], testbed: dict[str, Any] | None = None) -> list[str]:
    """Lines for the report: each measured slowdown more than the tolerance off the target (older results carry
    neither: ``testbed``, the run's spec, gives them)."""
    target = cal.get("target", (testbed or {}).get("target_slowdown"))
    tol = cal.get("tolerance", (testbed or {}).get("tolerance"))
    if target is None or tol is None:
        return []
    out = []
    local = cal.get("local_slowdown", cal["slowdown"])
    if not within(local, target, tol):
        runs = sum(r.get("kind") == "local" for r in cal.get("rounds", []))
        out.append(f"the local run's slowdown {local:.1f}x is more than {100 * tol:.0f} % off the {target:g}x target"
                   + (f" after {runs} local runs" if runs > 1 else "")
                   + (f" (the calibration gave {cal['slowdown']:.1f}x)" if "target" not in cal else ""))
    again = cal.get("recheck")
    if again and not within(again["slowdown"], target, tol):
        out.append(f"the local passes timed again after the strategies gave {again['slowdown']:.1f}x, more than "
                   f"{100 * tol:.0f} % off the {target:g}x target: the board's speed drifted during the run")
    return out
