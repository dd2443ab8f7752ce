"""runtime.agent.boardplace: where a lone frame's board work runs, from the hand-offs measured (no agent, no
timing: the measured values are given)."""

from __future__ import annotations

import logging

from runtime.agent.boardplace import BoardPlacement


def test_short_board_work_runs_on_the_loop_whatever_the_hand_offs():
    place = BoardPlacement()
    assert place.inline(0.01, 0.02) and not place.inline(0.03, 0.02)
    assert not place.inline(0.001, 0.0)  # 0: never, a stalled board included
    for _ in range(3):
        place.handed_back(0.05)
    assert place.stalled and not place.inline(0.001, 0.0)


def test_two_stalled_hand_offs_are_needed_and_one_is_not_enough():
    place = BoardPlacement(stall_seconds=0.005, stalled_inline_seconds=0.5)
    place.handed_back(0.047)
    assert not place.stalled and not place.inline(0.1, 0.02)
    place.handed_back(0.0001)  # a fast one between: the lower of the two is not a stall
    assert not place.stalled
    place.handed_back(0.046)
    place.handed_back(0.049)  # lower median of (47, 0.1, 46, 49) ms: 46
    assert place.stalled and place.inline(0.1, 0.02)
    assert not place.inline(0.6, 0.02)  # over the stalled bound: the board thread, the loop stays free


def test_recheck_sends_one_frame_in_n_through_the_board_thread():
    place = BoardPlacement(stall_seconds=0.005, recheck=3)
    place.handed_back(0.05)
    place.handed_back(0.05)
    assert [place.inline(0.1, 0.02) for _ in range(7)] == [True, True, False, True, True, False, True]


def test_fast_hand_offs_again_end_the_stall(caplog):
    place = BoardPlacement(window=4, stall_seconds=0.005)
    with caplog.at_level(logging.INFO, logger="runtime.agent.boardplace"):
        for s in (0.05, 0.05, 0.05):
            place.handed_back(s)
        assert place.stalled
        for s in (0.0001, 0.0002, 0.0001):  # window 4: (50, 0.1, 0.2, 0.1) ms, lower median 0.1 ms
            place.handed_back(s)
        assert not place.stalled and not place.inline(0.1, 0.02)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "now runs on the loop's thread" in said[0] and "again" in said[1]


def test_a_negative_measurement_counts_as_none():
    place = BoardPlacement()
    place.handed_back(-1.0)
    assert list(place.handoffs) == [0.0]


def test_no_hold_past_the_plain_bound_while_a_call_is_timed():
    place = BoardPlacement(stall_seconds=0.005, recheck=3)
    place.handed_back(0.05)
    place.handed_back(0.05)
    assert place.stalled and not place.inline(0.1, 0.02, hold=False)
    assert place.inline(0.01, 0.02, hold=False)  # within the plain bound: as on a free CPU
    # the refused frame is not counted toward the recheck: the next two still run on the loop, the third does not
    assert [place.inline(0.1, 0.02) for _ in range(3)] == [True, True, False]
