"""dpfp_bench records the coordinator's recovered halo tiles per strategy and checks --period-us (issue 13)."""

from __future__ import annotations

import json

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


def test_report_loads_records_made_before_link_mode_and_stage(tmp_path, capsys):
    """Records of the first sessions lack ``args.link_mode`` (only a shared link was costed) and each row's
    ``stage``: the loader fills them as those runs ran, and the report renders."""
    row = {"workers": 2, "strategy": "dpfp", "predicted_seconds": 0.4, "blocks": [["input", "features_4"], ["features_4", "features_30"]],
           "workers_used": 2, "skipped": "", "measured_seconds": 0.5, "frames": 3, "max_rel_error": 0.0}
    single = {**row, "workers": 1, "strategy": "single_worker", "predicted_seconds": 0.7, "blocks": [["input", "features_30"]],
              "workers_used": 1, "measured_seconds": 0.8}
    old = {"rows": [single, row], "range": ["input", "features_30"], "command": "python -m runtime.tools.dpfp_bench",
           "machine": {"cpu": "x", "cores": 2, "kernel": "k", "python": "3", "torch": "2"},
           "args": {"model": "vgg16", "workers": "1,2", "share": 0.4, "delay_ms": 2.0, "rate_mbps": 200.0, "frames": 3}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    with pytest.raises(KeyError):
        dpfp_report.markdown(json.loads(path.read_text()))  # as recorded, without the loader
    res = dpfp_report.load(path)
    assert res["args"]["link_mode"] == "shared" and res["args"]["relays"] == "inline"
    assert res["event_loop"] == "asyncio" and res["malloc"] == "defaults"
    assert res["rows"][1]["stage"] == {"predicted_seconds": 0.4, "blocks": [{"start": "input", "end": "features_4"},
                                                                         {"start": "features_4", "end": "features_30"}]}
    assert dpfp_report.main([str(path)]) == 0
    text = capsys.readouterr().out
    assert "--link-mode shared" in text and "load average not recorded" in text and "glibc's allocator at its defaults" in text
    assert "| 2 | dpfp | 0.400 | 0.500 |" in text and "37.5% | 1.60x" in text
    new = {**old, "args": {**old["args"], "link_mode": "per-worker"}, "event_loop": "uvloop", "malloc": "tuned",
           "load_before": [1.0, 1.0, 1.0], "load_after": [2.0, 1.0, 1.0]}
    path.write_text(json.dumps(new))
    text = dpfp_report.markdown(dpfp_report.load(path))
    assert "--link-mode per-worker" in text and "uvloop's event loop, glibc's allocator tuned" in text
    assert "1.00 / 1.00 / 1.00 (1/5/15 min) before the run" in text


def test_report_refuses_what_is_not_a_result(tmp_path, capsys):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"format": "edgesplit-profile"}))
    assert dpfp_report.main([str(path)]) == 2
    assert "not a dpfp_bench result" in capsys.readouterr().err
    assert dpfp_report.main([str(tmp_path / "missing.json")]) == 2
