"""The fleet load generator (runtime/measure/fleet) stays alive: its --quick mode against a real
planner subprocess over real gRPC, and Ctrl-C leaves no planner or folder behind. Figures are
printed by the benchmark and recorded in runtime/measure/results/fleet*.md, never asserted here."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from runtime.measure.fleet.report import percentile
from runtime.measure.fleet.stats import Stats, retry_after

pytestmark = pytest.mark.timeout(240)
CLI = [sys.executable, "-m", "runtime.cli.main", "bench-planner-fleet"]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def test_quick_run_measures_a_real_planner(tmp_path):
    done = subprocess.run([*CLI, "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((tmp_path / "fleet_quick.json").read_text())
    assert (tmp_path / "fleet_quick.md").read_text().startswith("### 200 agents")
    assert r["registration"]["registered"] == 200 and r["registration"]["per_second"] > 0
    # steps were made by the stepping agents (10 %) and new plans reached them over WatchPlan
    assert r["step_to_push"]["steps"] >= 20 and r["step_to_push"]["pushed"] > 0
    assert r["step_to_push"]["p99_ms"] >= r["step_to_push"]["p50_ms"] > 0
    assert r["telemetry"]["sent"] >= 200 and r["telemetry"]["acked"] > 0
    assert r["plans_received"] >= 200  # every agent got a plan
    assert r["health_all"]["checks"] > 10
    assert r["steady"]["planner_cpu_cores"] is not None and r["steady"]["planner_rss_mb"] > 0
    assert r["planner_exit"] is None  # it ran to the end
    assert _gone(r["planner_pid"]) and not Path(r["planner_folder"]).exists()


def test_shed_reports_are_counted_and_their_retry_after_honoured(tmp_path):
    """A planner whose decision queue holds one agent sheds reports (RESOURCE_EXHAUSTED with
    retry-after-ms, planner/intake.py): the loader counts them by code and waits as asked. The
    planner runs under --gc-pauses and --cprofile here."""
    done = subprocess.run([*CLI, "--agents", "150", "--telemetry-interval", "1", "--step-fraction", "0.5",
                           "--step-period", "2", "--duration", "6", "--settle", "1", "--out", str(tmp_path),
                           "--planner-arg=--telemetry-max-pending=1", "--gc-pauses", "--cprofile",
                           str(tmp_path / "planner.prof")], capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((tmp_path / "fleet.json").read_text())
    # --gc-pauses and --cprofile: the planner's full collections timed, its profile written at its exit
    assert r["planner_gc"]["gen2"] == len(r["planner_gc"]["gen2_ms"]) and (tmp_path / "fleet_gc.json").exists()
    import pstats

    assert pstats.Stats(str(tmp_path / "planner.prof")).total_calls > 0
    shed = r["errors"].get("ReportTelemetry RESOURCE_EXHAUSTED", 0)
    assert shed > 0, r["errors"]
    assert r["retry_after"]["answers"] == shed and r["retry_after"]["seconds_waited"] > 0
    assert r["telemetry"]["streams"] > 150  # shed streams were reopened after their wait


def test_replicas_on_postgresql_a_killed_one_s_agents_reattach_to_the_survivor(tmp_path):
    """Two planner replicas on a throw-away PostgreSQL (skipped with the reason where none starts),
    replica 0 SIGKILLed in the measured phase: its agents lose their session, register again on the
    survivor (counted), keep their plan; the survivor ran to the end and is gone afterwards."""
    pytest.importorskip("psycopg", reason="psycopg (the planner's PostgreSQL driver) is not installed")
    from runtime.measure.fleet.postgres import bin_dir

    if bin_dir() is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    done = subprocess.run([*CLI, "--agents", "60", "--duration", "10", "--settle", "1", "--replicas", "2", "--store",
                           "postgresql", "--kill-after", "3", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((tmp_path / "fleet.json").read_text())
    rep = r["replicas"]
    assert rep["killed"] and rep["moved"] == 30 and rep["reattached"] == 30, rep  # agents 0, 2, 4, ... were on replica 0
    assert rep["kept_plan"] >= 25 and rep["max_s"] is not None  # a stepping agent may be re-planned on the way
    # re-attaches name the profile by SHA-256 and none had to send it: the survivor held only its own
    # agents' board types (odd agents, odd boards), but it loads a re-attaching agent's stored record
    # (its profile, checked by the replica that stored it) before the registration is decided
    assert rep["profile_resent"] == 0 and r["errors"].get("RegisterAgent FAILED_PRECONDITION", 0) == 0, rep
    assert r["errors"].get("WatchPlan UNAVAILABLE", 0) >= 1  # the kill broke their streams
    # errors are counted by replica and message: every UNAVAILABLE (and any INTERNAL, grpc's report of a
    # write caught by the dead connection) was the killed replica's (r0), none the survivor's
    assert all(k.startswith("r0 ") for k in r["error_details"] if " UNAVAILABLE" in k or " INTERNAL" in k), \
        r["error_details"]
    assert r["store_server"]["cpu_seconds"] > 0
    assert "re-attached and re-planned" in (tmp_path / "fleet.md").read_text()
    assert r["planner_exit"] is None  # the survivor ran to the end; the killed one is not an error
    assert _gone(r["planner_pid"]) and not Path(r["planner_folder"]).exists()


def test_ctrl_c_stops_the_planner_and_removes_its_folder(tmp_path):
    # SIGINT back to its default in the child: a runner that starts the tests in the background of a shell
    # without job control passes SIGINT on ignored, and Python would then keep ignoring it
    proc = subprocess.Popen([*CLI, "--agents", "20", "--duration", "60", "--out", str(tmp_path)],
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pid = folder = None
    try:
        deadline = time.monotonic() + 90
        for line in proc.stderr:  # "... planner pid N on ..." then "... measured phase ..."
            if "planner pid" in line:
                pid = int(line.split("planner pid")[1].split()[0])
            if "measured phase" in line or time.monotonic() > deadline:
                break
        assert pid is not None and not _gone(pid)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        folder = Path(cmdline[cmdline.index(b"--db") + 1].decode()).parent
        assert folder.is_dir()
        # keep reading its stderr (and the loaders', which share it): a full pipe would block the
        # process on a write while it shuts down, and the wait below would time out
        rest: list[str] = []
        threading.Thread(target=lambda: rest.extend(proc.stderr), daemon=True).start()
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("no exit 60 s after Ctrl-C; its stderr:\n" + "".join(rest)[-3000:]) from None
        assert code == 130, "".join(rest)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _gone(pid) and not folder.exists()
    assert not (tmp_path / "fleet.json").exists()  # an interrupted run records nothing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_a_killed_run_takes_its_planner_with_it(tmp_path):
    """SIGKILL leaves no chance to clean up: the planner must not keep serving (two CI runs left one)."""
    proc = subprocess.Popen([*CLI, "--agents", "20", "--duration", "60", "--out", str(tmp_path)],
                            stderr=subprocess.PIPE, text=True)
    pid = folder = None
    try:
        for line in proc.stderr:
            if "planner pid" in line:
                pid = int(line.split("planner pid")[1].split()[0])
                break
        assert pid is not None and not _gone(pid)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        folder = Path(cmdline[cmdline.index(b"--db") + 1].decode()).parent
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 20  # SIGTERM: it drains, then exits
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(pid)
    finally:
        if proc.poll() is None:
            proc.kill()
        if pid is not None and not _gone(pid):
            os.kill(pid, signal.SIGKILL)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)  # nobody was left to remove it


def test_retry_after_is_read_from_trailing_metadata_and_capped():
    class Shed(grpc.aio.AioRpcError):
        def __init__(self, code, trailing):
            super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), "shed")

    assert retry_after(Shed(grpc.StatusCode.RESOURCE_EXHAUSTED, [("retry-after-ms", "250")])) == 0.25
    assert retry_after(Shed(grpc.StatusCode.RESOURCE_EXHAUSTED, [("retry-after-ms", "1e12")])) == 60.0
    assert retry_after(Shed(grpc.StatusCode.RESOURCE_EXHAUSTED, [])) == 0.0
    assert retry_after(Shed(grpc.StatusCode.UNAVAILABLE, [("retry-after-ms", "250")])) == 0.0
    s = Stats()
    assert s.error("ReportTelemetry", Shed(grpc.StatusCode.RESOURCE_EXHAUSTED, [("retry-after-ms", "100")])) == 0.1
    merged = Stats.merge([s.to_dict(), s.to_dict()])
    assert merged["errors"] == {"ReportTelemetry RESOURCE_EXHAUSTED": 2} and merged["retry_after"] == 2
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([], 99) is None
    assert os.sched_getaffinity(0)  # the pinning the run relies on is readable here
