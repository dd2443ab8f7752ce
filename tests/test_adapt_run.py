"""The recorded adaptivity run's analysis (runtime.tools.adapt_run.analyse) on a hand-made run."""

from __future__ import annotations

import pytest

from runtime.tools.adapt_run import _targets, analyse

pytestmark = pytest.mark.timeout(30)


def _frame(seq: int, t: float, split: str, where: str = "edge", total: float = 100.0, predicted: float = 100.0):
    return {"seq": seq, "t": t, "split": split, "where": where, "times_ms": {"total": total}, "predicted_ms": predicted}


def test_steps_switches_errors_and_lost_frames_are_found():
    frames = [_frame(i, 0.5 * i, "input") for i in range(40)]  # 0-20 s: fast, offloading
    frames += [_frame(40 + i, 20.0 + 0.5 * i, "input" if i < 3 else "output", "local", 300.0, 200.0)
               for i in range(40)]  # 20-40 s: the link dropped; the board after 1.5 s
    frames += [_frame(80 + i, 40.0 + 0.5 * i, "output" if i < 8 else "input", total=110.0) for i in range(40)]
    run = {"frames": frames, "steps": [(0.0, 50.0), (20.0, 1.0), (40.0, 50.0)]}
    a = analyse(run)
    assert (a["lost"], a["duplicated"], a["frames"]) == (0, 0, 120)
    fast, slow, back = a["phases"]
    assert (slow["step"], slow["plan"], slow["first_frame_under_new_plan_s"]) == ("down", "output", 1.5)
    assert slow["fallback_frames"] == 3 and slow["median_rel_error"] == pytest.approx(1 / 3, abs=0.01)
    assert (back["step"], back["plan"], back["first_frame_under_new_plan_s"]) == ("up", "input", 4.0)
    assert fast["switches_per_40s_steady"] == 0 and back["switches_per_40s_steady"] == 0
    assert back["median_rel_error"] == pytest.approx(10 / 110, abs=0.01)
    lines = "\n".join(_targets(a))
    assert "down to 1 Mbit/s: first frame under the new plan 1.5 s (target <= 2 s): met" in lines
    assert "up to 50 Mbit/s: first frame under the new plan 4.0 s (target <= 5 s): met" in lines


def test_a_lost_frame_and_a_plan_that_never_changed_are_reported():
    frames = [_frame(i, 0.5 * i, "input") for i in range(30) if i != 7]
    frames.append(_frame(3, 1.6, "input"))  # a duplicate result
    a = analyse({"frames": frames, "steps": [(0.0, 50.0), (7.5, 1.0)]})
    assert a["lost"] == 1 and a["duplicated"] == 1
    assert a["phases"][1]["first_frame_under_new_plan_s"] is None  # the plan never followed the link
    assert "NOT met" in "\n".join(_targets(a))
