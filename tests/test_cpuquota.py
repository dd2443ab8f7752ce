"""runtime.daemon.cgroup and runtime.tools.cpuquota: groups are created with the quota asked for and always removed."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from runtime.daemon import cgroup
from runtime.tools import cpuquota

pytestmark = pytest.mark.timeout(60)


def test_quota_set_limits_and_removes_its_groups():
    why = cgroup.unavailable()
    if why:
        pytest.skip(f"CPU quotas unavailable: {why}")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with cpuquota.QuotaSet(f"edgesplit-test-{os.getpid()}") as qs:
            q = qs.new(0.25)
            q.add(child.pid)
            assert (q.path / "cpu.cfs_quota_us").read_text().strip() == "2500"
            assert (q.path / "cpu.cfs_period_us").read_text().strip() == "10000"
            assert str(child.pid) in (q.path / "cgroup.procs").read_text().split()
            path = q.path
        assert not path.exists()  # removed although the process still runs (moved back to the root group)
        assert child.poll() is None
    finally:
        child.kill()
        child.wait(10)


def test_quota_set_removes_groups_on_error():
    if cgroup.unavailable():
        pytest.skip(f"CPU quotas unavailable: {cgroup.unavailable()}")
    paths = []
    with pytest.raises(RuntimeError), cpuquota.QuotaSet(f"edgesplit-test-err-{os.getpid()}") as qs:
        paths.append(qs.new(0.5).path)
        raise RuntimeError("boom")
    assert paths and not paths[0].exists()


def test_bad_share_and_missing_hierarchy(tmp_path):
    assert "no cgroup v1" in cgroup.unavailable(tmp_path)
    with pytest.raises(ValueError, match=r"0\.01\.\.64"):
        cgroup.CpuQuota.for_share("x", 0.0, tmp_path)


def test_bench_says_why_it_cannot_run(monkeypatch, capsys):
    from runtime.tools import dpfp_bench

    monkeypatch.setattr(cgroup, "unavailable", lambda: "no cgroup v1 cpu hierarchy (test)")
    assert dpfp_bench.main(["--workers", "1"]) == 2
    assert "no cgroup v1 cpu hierarchy (test); not run" in capsys.readouterr().err


def test_small_share_needs_a_longer_period(tmp_path):
    """0.05 core is 500 us per 10 ms, below the kernel's 1 ms quota: refused with what to do; a 50 ms period
    holds it (2,500 us)."""
    with pytest.raises(ValueError, match="longer period"):
        cgroup.CpuQuota.for_share("x", 0.05, tmp_path)
    q = cgroup.CpuQuota.for_share("y", 0.05, tmp_path, period_us=50_000)  # a plain folder stands in for the hierarchy
    assert (q.path / "cpu.cfs_quota_us").read_text() == "2500"
    assert (q.path / "cpu.cfs_period_us").read_text() == "50000"


def test_a_group_switches_its_period_at_the_same_share(tmp_path):
    q = cgroup.CpuQuota.for_share("z", 0.4, tmp_path)  # a plain folder stands in for the hierarchy
    q.set_period(2_500)
    assert (q.path / "cpu.cfs_period_us").read_text() == "2500" and (q.path / "cpu.cfs_quota_us").read_text() == "1000"
    with pytest.raises(ValueError, match="longer period"):
        q.set_period(2_000)  # 800 us: the kernel refuses it
    assert (q.path / "cpu.cfs_period_us").read_text() == "2500"


def test_one_thread_in_a_quota_and_the_busiest_thread():
    """dpfp_round's third setting: only a worker's compute thread in the quota, found as its busiest thread."""
    why = cgroup.unavailable()
    if why:
        pytest.skip(f"CPU quotas unavailable: {why}")
    from runtime.tools.dpfp_round import busiest_thread, thread_cpu

    code = ("import threading, time\n"
            "def spin():\n    t = time.time() + 20\n    while time.time() < t: pass\n"
            "threading.Thread(target=spin, daemon=True).start()\ntime.sleep(20)\n")
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        before = thread_cpu(child.pid)
        deadline = time.monotonic() + 10
        while len(thread_cpu(child.pid)) < 2 and time.monotonic() < deadline:  # the spinning thread started
            time.sleep(0.05)
        time.sleep(0.5)
        spinner = busiest_thread(child.pid, before)
        assert spinner != child.pid  # not the main thread, which sleeps
        with cpuquota.QuotaSet(f"edgesplit-test-thread-{os.getpid()}") as qs:
            q = qs.new(0.25)
            q.add(child.pid)
            qs.release(child.pid)  # back to the root group, every thread
            assert str(child.pid) not in (q.path / "cgroup.procs").read_text().split()
            q.add_thread(spinner)
            assert (q.path / "tasks").read_text().split() == [str(spinner)]  # the main thread stays out
            path = q.path
        assert not path.exists()
        assert child.poll() is None
    finally:
        child.kill()
        child.wait(10)
