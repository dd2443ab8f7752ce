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
