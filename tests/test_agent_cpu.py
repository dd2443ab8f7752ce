"""runtime.measure.agent_cpu: the agent's own CPU per frame, against a real worker on loopback."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from runtime.daemon import cgroup
from runtime.measure import agent_cpu

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not Path("/proc/self/schedstat").exists(),
                                 reason="no /proc/PID/schedstat (Linux with CONFIG_SCHED_INFO): no per-thread CPU")]


def test_thread_groups_name_the_loop_and_the_board():
    me = threading.get_native_id()
    cpu = agent_cpu.thread_cpu()
    assert me in cpu and cpu[me][1] > 0  # this thread has run
    assert agent_cpu.group_of(me, "MainThread", me) == "loop"
    assert agent_cpu.group_of(1, "board_0", me) == "board"
    assert agent_cpu.group_of(2, "Thread-1 (_poll_wrapper)", me) == "grpc"
    assert agent_cpu.group_of(3, "event_engine", me) == "grpc"
    assert agent_cpu.group_of(4, "tqdm_monitor", me) == "other"


def test_cpu_delta_counts_new_threads_from_zero():
    before = {1: ("MainThread", 1_000_000), 2: ("board_0", 0)}
    after = {1: ("MainThread", 3_000_000), 2: ("board_0", 5_000_000), 3: ("event_engine", 1_000_000)}
    assert agent_cpu.cpu_delta(before, after, 1) == {"board": 0.005, "loop": 0.002, "grpc": 0.001, "other": 0.0}


def test_measures_a_real_agent_and_worker(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    assert agent_cpu.main(["--model", "digits_cnn", "--split", "pool1", "--codec", "int8+lz4", "--source", "synthetic",
                           "--frames", "8", "--rounds", "2", "--warmup", "3", "--idle-s", "0.3", "--alone-runs", "5",
                           "--json", str(out), "--markdown"]) == 0
    got = json.loads(out.read_text())
    p = got["per_frame_ms"]
    assert got["split"] == "pool1" and got["codec"] == "int8+lz4" and got["wire_bytes_p50"] > 0
    assert len(got["rounds"]) == 2 and all(r["frames"] == 8 for r in got["rounds"])
    # every frame ran on the board thread and was sent and answered on the loop thread
    # a lone frame's board work runs on the loop's thread (runtime.agent.client.Agent._board_inline), so the board
    # thread may have none in the rounds
    assert p["thread_board"] >= 0 and p["thread_loop"] > 0
    assert got["compute_alone_ms"]["head"] > 0 and got["compute_alone_ms"]["encode"] > 0
    # the threads' CPU cannot exceed the process's (the kernel's figures, the same clock)
    assert sum(p[f"thread_{k}"] for k in agent_cpu.GROUPS) <= p["process"] * 1.01 + 0.01
    assert p["runtime"] == pytest.approx(p["process"] - p["compute_alone"] - p["background"])
    # each frame's board job timed in the frames: its CPU, and the runtime beside it
    assert all(r["compute_in_frames_s"] > 0 for r in got["rounds"]) and p["compute_in_frames"] > 0
    assert p["runtime_beside"] == pytest.approx(p["process"] - p["compute_in_frames"] - p["background"])
    assert p["compute_in_frames"] <= p["thread_board_loop"] * 1.01 + 0.01  # it ran on one of those two threads
    # board + loop beside the parts: the same figure whichever thread ran the frames' board work
    assert p["thread_board_loop"] == pytest.approx(p["thread_board"] + p["thread_loop"])
    assert p["runtime_board_loop"] == pytest.approx(p["runtime_board"] + p["runtime_loop"])
    printed = capsys.readouterr().out
    assert "RUNTIME CPU per frame" in printed and f"the runtime beside them {p['runtime_beside']:.3f}" in printed
    assert "RUNTIME CPU per frame" in printed and f"(board + loop {p['runtime_board_loop']:.3f}:" in printed
    assert "| wall | process | thread_board_loop |" in printed and f"| {p['thread_board_loop']:.3f} |" in printed
    assert "idle, stream open, no frame" in printed and got["idle"]["process_per_s"] > 0  # the background itself
    # frames answered within probe_after: the background counted is the window with the idle probes paused
    assert got["background_window"] == "quiet" and "idle, probes paused" in printed
    assert p["background"] == pytest.approx(got["background_quiet"]["process_per_s"] * p["wall"])


def _window(rate: float) -> dict:
    return {"wall_s": 1.0, "process_per_s": rate, "threads_per_s": dict.fromkeys(agent_cpu.GROUPS, rate / 4)}


def test_the_background_counted_is_the_one_the_frames_ran_beside():
    idle, quiet = _window(0.005), {**_window(0.002), "probe_after_s": 0.5}
    alone = {"head": 1.0, "tl_encode": 0.0, "encode": 2.0}

    def rounds(wall_s: float) -> list[dict]:
        return [{"frames": 10, "wall_s": 10 * wall_s, "process_s": 0.05, "throttled_ms": 0.0,
                 "threads_s": dict.fromkeys(agent_cpu.GROUPS, 0.01), "wire_bytes_p50": 100}]

    fast = agent_cpu.summarize(rounds(0.1), idle, alone, "s", "c", "", quiet)  # answered within 0.5 s: no probe ran
    assert fast["background_window"] == "quiet"
    assert fast["per_frame_ms"]["background"] == pytest.approx(0.002 * 100)
    assert fast["per_frame_ms"]["runtime"] == pytest.approx(5.0 - 3.0 - 0.2)
    # board + loop: 1 + 1 ms a frame, less the compute (3) and those two threads' background (2 x 0.0005 x 100 ms)
    assert fast["per_frame_ms"]["thread_board_loop"] == pytest.approx(2.0)
    assert fast["per_frame_ms"]["runtime_board_loop"] == pytest.approx(2.0 - 3.0 - 0.1)
    slow = agent_cpu.summarize(rounds(0.6), idle, alone, "s", "c", "", quiet)  # probes ran between these frames
    assert slow["background_window"] == "idle" and slow["per_frame_ms"]["background"] == pytest.approx(0.005 * 600)
    assert agent_cpu.summarize(rounds(0.1), idle, alone, "s", "c", "")["background_window"] == "idle"
    assert agent_cpu.summarize(rounds(0.1), None, alone, "s", "c", "")["background_window"] == "none"


def test_an_older_result_without_the_board_loop_figures_reads_the_same():
    """Result files written before board + loop was reported (runtime/measure/results/agent_cpu.json's sets) get
    it from their parts; the parts themselves are unchanged."""
    old = {"wall": 73.4, "process": 3.33, "thread_board": 0.0, "thread_loop": 3.07, "thread_grpc": 0.23,
           "thread_other": 0.0, "background": 0.21, "throttled": 0.74, "compute_alone": 2.04, "runtime": 1.08,
           "runtime_board": -2.04, "runtime_loop": 2.99, "runtime_grpc": 0.17}  # set n22_q50, rep 4
    p = agent_cpu.with_combined(old)
    assert p["thread_board_loop"] == pytest.approx(3.07) and p["runtime_board_loop"] == pytest.approx(0.95)
    assert {k: p[k] for k in old} == old
    recorded = json.loads((Path(agent_cpu.__file__).parent / "results" / "agent_cpu.json").read_text())
    for run in recorded:  # every recorded run reads, and its combined figure is its parts' sum
        q = agent_cpu.with_combined(run["per_frame_ms"])
        assert q["thread_board_loop"] == pytest.approx(q["thread_board"] + q["thread_loop"])
    table = agent_cpu.markdown({"per_frame_ms": old}).splitlines()
    assert len(table) == 3 and table[0].startswith("| wall | process | thread_board_loop | thread_board |")
    assert "| 73.400 | 3.330 | 3.070 | 0.000 |" in table[2]


def test_quota_without_cgroups_says_why(monkeypatch, capsys):
    monkeypatch.setattr(cgroup, "unavailable", lambda: "no cgroup v1 cpu hierarchy (test)")
    assert agent_cpu.main(["--quota-us", "3500"]) == 2
    assert "no CPU quota here: no cgroup v1 cpu hierarchy (test)" in capsys.readouterr().err


def test_bad_ranges_are_refused():
    with pytest.raises(SystemExit):
        agent_cpu.main(["--frames", "0"])
    with pytest.raises(SystemExit):
        agent_cpu.main(["--gap-ms", "-1"])


def test_pausing_the_idle_probes_leaves_the_stream_alive():
    """The background window pauses the stream's idle probes (nothing asks the peer meanwhile); the pause is not
    counted against the peer when they resume, or the stream would be declared dead (seen: 'idle, and no answer
    to a probe for 3.5s')."""
    import asyncio
    from types import SimpleNamespace

    from runtime.wire.liveness import Liveness, LivenessOptions

    live = Liveness(None, LivenessOptions(floor_seconds=0.2, probe_after_seconds=0.1))
    agent = SimpleNamespace(active=SimpleNamespace(stream=SimpleNamespace(liveness=live)))
    quiet = asyncio.run(agent_cpu._background(agent, 0.3, threading.get_native_id()))
    assert quiet is not None and quiet["probe_after_s"] == 0.1 and quiet["wall_s"] >= 0.3
    assert live.options.idle_probes and live.verdict() == "" and live.stalled() < 0.1


def test_the_frames_board_jobs_are_timed_and_the_tools_own_reads_taken_off():
    """time_board_jobs records each board job's CPU on the thread that ran it; a window less the tool's readings."""
    calls = []

    class FakeAgent:
        def _head_encode(self, plan, x):
            calls.append((plan, x))
            t = time.thread_time()
            while time.thread_time() - t < 0.002:  # 2 ms of this thread's CPU, bounded by the clock
                pass
            return "board"

    agent = FakeAgent()
    got = agent_cpu.time_board_jobs(agent)
    assert agent._head_encode("plan", 1) == "board" and calls == [("plan", 1)]
    assert len(got) == 1 and 0.002 <= got[0] < 0.5
    cpu, own = agent_cpu.read_threads()
    assert threading.get_native_id() in cpu and own > 0
    groups, proc = agent_cpu._untool({"board": 0.1, "loop": 0.3, "grpc": 0.2, "other": 0.0}, 1.0, 0.2)
    assert groups == pytest.approx({"board": 0.1, "loop": 0.2, "grpc": 0.2, "other": 0.0}) and proc == pytest.approx(0.8)
    # never below zero
    assert agent_cpu._untool(dict.fromkeys(agent_cpu.GROUPS, 0.0), 0.0, 0.2) == (dict.fromkeys(agent_cpu.GROUPS, 0.0), 0.0)
    rounds = [{"frames": 10, "wall_s": 1.0, "process_s": 0.05, "throttled_ms": 0.0, "compute_in_frames_s": 0.03,
               "threads_s": dict.fromkeys(agent_cpu.GROUPS, 0.01), "wire_bytes_p50": 100}]
    p = agent_cpu.summarize(rounds, None, {"head": 1.0, "tl_encode": 0.0, "encode": 1.0}, "s", "c", "")["per_frame_ms"]
    assert p["compute_in_frames"] == pytest.approx(3.0) and p["runtime_beside"] == pytest.approx(5.0 - 3.0)
    assert p["runtime"] == pytest.approx(5.0 - 2.0)
    older = [{k: v for k, v in rounds[0].items() if k != "compute_in_frames_s"}]  # a file from before: no figure
    assert "runtime_beside" not in agent_cpu.summarize(older, None, {"head": 1.0, "tl_encode": 0.0, "encode": 1.0},
                                                       "s", "c", "")["per_frame_ms"]
