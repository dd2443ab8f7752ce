"""dpfp_bench records the coordinator's recovered halo tiles per strategy and checks --period-us (issue 13)."""

from __future__ import annotations

import pytest

from runtime.agent.parallel import TileMetrics
from runtime.tools import dpfp_bench, dpfp_report
from runtime.tools.dpfp_measure import recovered_tiles


class _Coord:
    def __init__(self):
        self.metrics = TileMetrics()


def test_recovered_tiles_read_the_coordinators_counter():
    c = _Coord()
    assert recovered_tiles(c) == {"fetched": 0, "recomputed": 0}
    c.metrics.halo_recovered.labels("fetched").inc(3)
    c.metrics.halo_recovered.labels("recomputed").inc()
    assert recovered_tiles(c) == {"fetched": 3, "recomputed": 1}
    assert recovered_tiles(_Coord()) == {"fetched": 0, "recomputed": 0}  # each coordinator its own registry


def test_faults_column():
    row = {"measured_seconds": 0.25, "tile_failures": 2, "halo_fallbacks": 1,
           "halo_recovered_tiles": {"fetched": 3, "recomputed": 1}}
    assert dpfp_report._faults(row) == "2; 1: 3 / 1"
    assert dpfp_report._faults({"measured_seconds": None}) == "-"  # skipped: nothing ran
    assert dpfp_report._faults({"measured_seconds": 0.5}) == "0; 0: 0 / 0"  # rows recorded before the counts


@pytest.mark.parametrize("argv", [["--period-us", "2000"], ["--period-us", "999"], ["--share", "0.1", "--period-us", "5000"]])
def test_period_below_the_kernels_quota_is_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        dpfp_bench.main(["--workers", "1", *argv])
    assert e.value.code == 2
    assert "--period-us must be" in capsys.readouterr().err


def test_several_periods_label_the_rows_and_state_the_quotas():
    res = {"args": {"share": 0.4, "periods": [10_000, 2_500], "period_us": 10_000},
           "rows": [{"workers": 4, "period_us": 10_000}, {"workers": 4, "period_us": 2_500}]}
    dpfp_report._label(res)
    assert [r["label"] for r in res["rows"]] == ["4 @ 10 ms", "4 @ 2.5 ms"]
    assert dpfp_report._quota(res["args"]).startswith("cfs_quota 4000 us per 10,000 us / cfs_quota 1000 us per 2,500 us")
    one = {"args": {"share": 0.4, "period_us": 10_000}, "rows": [{"workers": 1}]}  # runs recorded before --period-us
    dpfp_report._label(one)
    assert one["rows"][0]["label"] == "1" and dpfp_report._quota(one["args"]) == "cfs_quota 4000 us per 10,000 us"


def test_a_list_of_periods_is_checked_each(capsys):
    with pytest.raises(SystemExit):
        dpfp_bench.main(["--workers", "1", "--period-us", "10000,2000"])
    assert "--period-us must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dpfp_bench.main(["--workers", "1", "--period-us", "10000,fast"])
    assert "comma-separated" in capsys.readouterr().err
