"""runtime.tools.dpfp_period: a quota's stop-and-go against a slower CPU (issue 13)."""

from __future__ import annotations

import pytest

from runtime.daemon import cgroup
from runtime.tools import cpuquota, dpfp_period

pytestmark = pytest.mark.timeout(120)


def test_periods_below_the_kernels_quota_are_refused(capsys):
    with pytest.raises(SystemExit):
        dpfp_period.main(["--periods", "2000"])  # 800 us at 0.4 core
    assert "at least the kernel's 1000 us" in capsys.readouterr().err


def test_says_why_without_quotas(monkeypatch, capsys):
    monkeypatch.setattr(cgroup, "unavailable", lambda: "no cgroup v1 cpu hierarchy (test)")
    assert dpfp_period.main(["--periods", "10000"]) == 2
    assert "no CPU quotas (no cgroup v1 cpu hierarchy (test)); not run" in capsys.readouterr().err


def test_a_quota_runs_at_its_share_on_average():
    """Over 1 s, CPU / wall of a busy process in a 0.4-core quota is near 0.4 (units of 5 ms: their mean wall /
    CPU is 1/share within a wide margin: the machine is shared); each unit's ratio is at least 1."""
    if cgroup.unavailable():
        pytest.skip(f"CPU quotas unavailable: {cgroup.unavailable()}")
    import os

    with cpuquota.QuotaSet(f"edgesplit-test-period-{os.getpid()}") as q:
        ratios = dpfp_period.measure(q, 0.4, 10_000, [5.0], 1.0)["5.0"]
    assert ratios and min(ratios) >= 0.95
    assert 1.5 <= sum(ratios) / len(ratios) <= 6.0  # 2.5 on an idle machine
