"""The board's quota calibration (runtime.measure.scenarios.calibrate) against a fake board: pass times that
follow the quota and drift between runs, as the shared machine's did (a fixed quota gave 14.0-20.6x)."""

from __future__ import annotations

import pytest

from runtime.measure.scenarios import calibrate as cal
from runtime.measure.scenarios import report

FREE_MS = 20.0
PERIOD = 50_000


class FakeBoard:
    """A pass costs ``inflation`` x its free CPU under the quota (wall = CPU / quota share), times ``drift[k]`` on
    the k-th call of ``board`` (the last factor repeats); every call is logged with the quota it ran under."""

    def __init__(self, drift: list[float], inflation: float = 1.5):
        self.drift, self.inflation, self.quota, self.log = drift, inflation, 0, []

    def set_quota(self, q: int) -> None:
        self.quota = q
        self.log.append(("set", q))

    def free(self, n: int) -> list[float]:
        return [FREE_MS] * n

    def board(self, n: int) -> list[float]:
        k = sum(e[0] == "board" for e in self.log)
        f = self.drift[min(k, len(self.drift) - 1)]
        self.log.append(("board", self.quota, n))
        return [FREE_MS * self.inflation * PERIOD / self.quota * f] * n


def settings(**kw: float) -> cal.Settings:
    base = dict(target=18.0, tolerance=0.12, period_us=PERIOD, first_quota_us=2778, rounds=4, runs=5, frames=20,
                local_rounds=3)
    return cal.Settings(**{**base, **kw})  # type: ignore[arg-type]


def test_the_local_run_is_timed_again_at_a_re_aimed_quota_when_the_board_drifted():
    # coarse rounds at 1x, then the board 25 % faster (yesterday's 17.5x calibration, 14.0x local run)
    b = FakeBoard([1.0, 1.0, 0.75])
    got = cal.calibrate(settings(), b.free, b.board, b.set_quota, lambda: b.log.append(("profile",)))
    kinds = [r["kind"] for r in got["rounds"]]
    assert kinds == ["coarse", "coarse", "local", "local"]
    # the board is profiled after the coarse rounds; the local run comes last, nearest the strategies
    assert [e[2] for e in b.log if e[0] == "board"] == [5, 5, 20, 20]
    assert [e[0] for e in b.log if e[0] != "set"] == ["board", "board", "profile", "board", "board"]
    assert got["rounds"][2]["slowdown"] == pytest.approx(13.5, rel=1e-3)  # the first local run missed: 25 % off
    assert got["within"] and got["slowdown"] == pytest.approx(18.0)
    assert len(got["local_ms"]) == 20 and all(r["passes"] == 20 for r in got["rounds"] if r["kind"] == "local")
    # the figures returned are the last board run's, under the quota returned, and nothing changed it after
    last = max(i for i, e in enumerate(b.log) if e[0] == "board")
    assert b.log[last][1] == got["quota_us"] == got["rounds"][-1]["quota_us"] == 3125
    assert all(e[0] != "set" for e in b.log[last + 1:])
    assert got["device_ms"] == pytest.approx(got["local_ms"][0])
    assert cal.warnings({**got, "local_slowdown": got["slowdown"]}) == []


def test_a_board_that_never_lands_is_reported_not_hidden():
    # every local run 30 % off whatever the quota: after local_rounds runs it stops and says so
    b = FakeBoard([1.0, 1.0, 0.7, 1.3, 0.7])
    got = cal.calibrate(settings(), b.free, b.board, b.set_quota)
    assert [r["kind"] for r in got["rounds"]].count("local") == 3
    assert not got["within"]
    last = max(i for i, e in enumerate(b.log) if e[0] == "board")
    assert b.log[last][1] == got["quota_us"] and all(e[0] != "set" for e in b.log[last + 1:])
    (w,) = cal.warnings(got)
    assert "more than 12 % off the 18x target after 3 local runs" in w


def test_recheck_warns_when_the_board_drifted_after_the_local_run():
    b = FakeBoard([1.0, 1.0, 1.0, 0.7])
    got = cal.calibrate(settings(), b.free, b.board, b.set_quota)
    assert got["within"] and cal.warnings(got) == []
    got["recheck"] = again = cal.recheck(got, b.free, b.board, 20)
    assert again["slowdown"] == pytest.approx(0.7 * got["slowdown"]) and not again["within"]
    (w,) = cal.warnings(got)
    assert "drifted during the run" in w
    text = report._board({**got, "local_slowdown": got["slowdown"]}, {"testbed": {}})
    assert "calibrated on the local run itself" in text and "the same passes again after the strategies" in text


def test_free_time_pools_every_block_and_quota_stays_in_the_kernels_range():
    assert cal.next_quota(2778, 1000.0, 18.0, PERIOD) == PERIOD  # at most one period
    assert cal.next_quota(2778, 1.0, 18.0, PERIOD) == cal.MIN_QUOTA_US
    frees = iter([[10.0] * 5, [30.0] * 5, [30.0] * 5])
    b = FakeBoard([1.0])
    got = cal.calibrate(settings(rounds=1, local_rounds=2), lambda n: next(frees), b.board, b.set_quota)
    assert len(got["rounds"]) == 3 and got["free_passes"] == 15  # 5 free passes before every round
    assert [r["free_ms"] for r in got["rounds"]] == [10.0, 20.0, 30.0]  # the median of all so far, not the last block's


def test_old_results_get_the_warning_from_the_runs_spec():
    old = {"slowdown": 17.5, "local_slowdown": 14.0, "rounds": [{"quota_us": 4322, "slowdown": 17.5}]}
    (w,) = cal.warnings(old, {"target_slowdown": 18.0, "tolerance": 0.12})
    assert "14.0x" in w and "the calibration gave 17.5x" in w
    assert cal.warnings({**old, "local_slowdown": 17.0}, {"target_slowdown": 18.0, "tolerance": 0.12}) == []
