"""runtime.measure.board_handoff: it runs every mode, reports what it measured, and leaves no cgroup behind.
Figures are not asserted (speed is measured, not tested: runtime/measure/results/board_handoff.md)."""

from __future__ import annotations

import json

import pytest

from runtime.daemon import cgroup
from runtime.measure import board_handoff


def _run(tmp_path, *extra: str) -> dict:
    out = tmp_path / "bh.json"
    assert board_handoff.main(["--frames", "3", "--rounds", "1", "--gap-ms", "5", "--job-ms", "1",
                               "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


@pytest.mark.timeout(180)
def test_unrestricted_run_reports_every_mode(tmp_path):
    got = _run(tmp_path, "--quota-us", "0")
    assert set(got["summary"]) == set(board_handoff.MODES)
    for mode, s in got["summary"].items():
        assert s["frames"] == 3 and 0 <= s["handback_p50_ms"] <= s["handback_max_ms"], mode
    assert [r["mode"] for r in got["runs"]] == list(board_handoff.MODES)
    assert all(len(r["handback_ms"]) == len(r["after_job_ms"]) == 3 for r in got["runs"])


@pytest.mark.timeout(300)
@pytest.mark.skipif(bool(cgroup.unavailable()), reason=f"needs a CPU quota: {cgroup.unavailable()}")
def test_quota_run_removes_its_cgroups(tmp_path):
    got = _run(tmp_path, "--quota-us", "10000", "--period-us", "20000")  # half a core: quick
    assert got["summary"]["thread"]["frames"] == 3
    assert not list(cgroup.ROOT.glob(f"{board_handoff.GROUP_PREFIX}*"))


def test_summary_counts_stalls_over_a_period_wait():
    runs = [{"mode": "thread", "handback_ms": [0.1, 45.0, 95.0], "after_job_ms": [0.05, 0.05, 30.0],
             "job_wall_ms": [30.0, 80.0, 130.0]}]
    s = board_handoff.summarise(runs)["thread"]
    assert (s["handback_stalls"], s["after_job_stalls"], s["handback_p50_ms"], s["job_wall_p50_ms"]) == (2, 1, 45.0, 80.0)
    assert "inline" not in board_handoff.summarise(runs)


def test_out_of_range_values_are_refused():
    with pytest.raises(SystemExit):
        board_handoff.main(["--frames", "0"])
