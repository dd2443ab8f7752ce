"""`edgesplit bench-scenarios --quick` end to end (the harness stays alive): a real board child under
a cgroup CPU quota, a real worker, a relay; asserts structure and sanity, and that nothing is left
behind. Speed figures are printed by the benchmark, never asserted here."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from runtime.daemon.cgroup import ROOT, unavailable
from runtime.measure.scenarios import costs
from runtime.measure.scenarios.spec import STRATEGIES


def _ours() -> set[str]:
    return {p.name for p in ROOT.glob("edgesplit-bench-*")} if ROOT.exists() else set()


def _left_behind(before: set[str]) -> set[str]:
    """The bench cgroups made since ``before`` whose process (the pid in the name) has exited: a run that another
    user has going at the same time keeps its own until it ends, and is not ours to count."""
    return {n for n in _ours() - before if not Path(f"/proc/{n.rsplit('-', 1)[1]}").exists()}


def _tagged(tag: str) -> list[int]:
    """Processes that inherited the environment variable ``tag`` (the run's children, at any depth)."""
    found = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if tag.encode() in env.read_bytes():
                found.append(int(env.parent.name))
        except OSError:
            continue
    return found


def test_peer_profiles_keep_their_rules(tmp_path):
    """Scission sends raw fp32; ScissionLite's 2x2 pool rounds odd sizes up."""
    assert costs.pooled_bytes((1, 80, 14, 14)) == 80 * 7 * 7 * 4
    assert costs.pooled_bytes((1, 40, 7, 7)) == 40 * 4 * 4 * 4
    assert costs.pooled_bytes((1, 1000)) is None
    assert costs.floor_ms({"head": 10.0, "edge_tail": 5.0}, 125_000, 0, 1.0, 20.0) == pytest.approx(10 + 5 + 1000 + 20)
    # codec work is compute: the board's encode (a JPEG) and the edge's decode are in the floor, not the overhead
    assert costs.floor_ms({"head": 10.0, "encode": 3.0, "edge_decode": 2.0, "edge_tail": 5.0, "total": 99.0},
                          0, 0, 1.0, 20.0) == pytest.approx(40.0)


def test_rounds_split_the_frames_in_order_without_gaps():
    from runtime.measure.scenarios.run import round_edges

    assert round_edges(20, 4) == [(0, 5), (5, 10), (10, 15), (15, 20)]
    assert round_edges(3, 2) == [(0, 2), (2, 3)]
    assert round_edges(3, 4) == [(0, 1), (1, 2), (2, 3)]  # never an empty round
    assert round_edges(7, 1) == [(0, 7)]
    for frames, rounds in ((20, 3), (9, 4), (1, 5)):
        edges = round_edges(frames, rounds)
        assert edges[0][0] == 0 and edges[-1][1] == frames and all(lo < hi for lo, hi in edges)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(edges))


def test_pipelined_bound_is_the_slowest_stage():
    rows = [{"times_ms": {"head": 40.0, "encode": 10.0, "edge_decode": 1.0, "edge_tail": 9.0}},
            {"times_ms": {"head": 60.0, "encode": 10.0, "edge_decode": 1.0, "edge_tail": 11.0}}]
    assert costs.bound_fps(rows, 0, 0, 1.0) == pytest.approx(1e3 / 60.0)  # board: median of 50 and 70 ms
    assert costs.bound_fps(rows, 125_000, 0, 1.0) == pytest.approx(1.0)  # uplink: 1 s per frame


def test_dynamic_trace_summary_counts_deadlines_and_losses():
    from runtime.measure.scenarios.dynamic import summary
    from runtime.measure.scenarios.spec import SCENARIOS

    frames = [{"seq": 0, "t": 1.0, "where": "edge", "split": "input", "codec": "jpeg"},
              {"seq": 1, "t": 2.0, "where": "local", "split": "input", "codec": "jpeg",
               "fallback_reason": "deadline: no edge result within 3s"},
              {"seq": 2, "t": 3.0, "where": "local", "split": "output", "codec": "raw",
               "fallback_reason": "plan runs every layer on the device"}]
    data = {"analysis": {"frames": 3, "lost": 0, "duplicated": 0,
                         "phases": [{"mbps": 20.0, "frames": 3, "start_s": 0.0, "seconds": 10.0}]}, "frames": frames}
    got = summary(data, SCENARIOS["dynamic"], 0.05, {"period_us": 50_000}, {"dynamic@20": {}, "20mbit": {}},
                  ["python", "-m", "runtime.tools.adapt_run", "--out", "x"], "scenarios_dynamic_m")
    assert (got["past_deadline"], got["fallbacks"], got["lost"]) == (1, 1, 0)
    assert list(got["links"]) == ["dynamic@20"] and got["files"][2] == "scenarios_dynamic_m.png"
    assert got["phases"][0]["ran"] == {"input:jpeg (edge)": 1, "input:jpeg (local)": 1, "output:raw (local)": 1}


class _Checks:
    """A stand-in for fidelity.Checker with fixed agreements per (split, codec): what the planner then chooses
    is the real search's (planner.search via the CLI's ranker)."""

    frames = 200

    def __init__(self, values: dict):
        self.values, self.asked = values, []

    def agreement(self, split: str, codec: str, tl_path: str = "") -> float:
        self.asked.append((split, codec))
        return self.values[(split, codec)]


def _profiles():
    from runtime.contracts.profile import Block, Profile, Transfer

    def prof(role: str, seconds: float, jpeg_encode: float) -> Profile:
        inputs = (Transfer("raw", 600_000, codec="raw"), Transfer("fp16", 300_000, codec="fp16"),
                  *(Transfer(f"jpeg{q}", b, jpeg_encode, 0.001, codec=f"jpeg{q}") for q, b in
                    ((90, 14_000), (75, 6_000), (50, 9_000))))  # jpeg75 the cheapest: its failure strikes jpeg50
        blocks = tuple(Block(i, f"b{i}", seconds, 100_000 if i < 3 else 4_000,
                             transfers=(Transfer("raw", 100_000 if i < 3 else 4_000, codec="raw"),)) for i in range(4))
        return Profile(machine=role, role=role, model="m", blocks=blocks, input_bytes=600_000, input_transfers=inputs)
    return prof("device", 0.5, 0.01), prof("edge", 0.01, 0.001)


def test_edgesplit_plans_keep_the_fidelity_floor_measured_on_many_frames():
    """The cheapest JPEG loses too much: struck with every lower quality, the next passes; when nothing lossy
    passes, raw (exact) remains. Each lossy plan is checked once before it is chosen."""
    from runtime.cli.bench_scenarios import _rank
    from runtime.contracts.costmodel import Link
    from runtime.measure.scenarios import fidelity

    dev, edge = _profiles()
    link = Link.from_mbps(20.0, 1.6)
    check = _Checks({("input", "jpeg75"): 0.96, ("input", "jpeg90"): 0.995, ("input", "fp16"): 1.0})
    conf, _, checks = fidelity.verified(_rank, dev, edge, link, 0.99, check, "")
    assert conf.hops[0].transfer.codec == "jpeg90"
    # jpeg75 fails: the top quality is measured to bound the rest, jpeg50 struck with jpeg75 unmeasured
    assert [a for a in check.asked if a != ("input", "jpeg90")] == [("input", "jpeg75")]
    assert [(c["transfer"], c["kept"]) for c in checks] == [("jpeg75", False), ("jpeg90", True)]
    check = _Checks({("input", "jpeg75"): 0.5, ("input", "jpeg90"): 0.6, ("input", "fp16"): 0.98})
    conf, _, checks = fidelity.verified(_rank, dev, edge, link, 0.99, check, "", rounds=2)
    # the top quality failed too: every JPEG struck after two measurements; then an exact plan is the best
    assert [(c["transfer"], c["kept"]) for c in checks] == [("jpeg75", False), ("jpeg90", None)]
    assert all(fidelity.exact(h.transfer.codec, h.transfer.tl_id) for h in conf.hops)  # only exact plans remain


def test_edgesplit_sends_lossless_pixels_where_every_jpeg_fails_the_floor():
    """pixels+lz4 (the lossless 8-bit input) is a candidate of edgesplit's like any other: still measured before it
    runs (1.0 by construction here as in the codec's tests), and its encode time the one the board measured."""
    from dataclasses import replace

    from runtime.cli.bench_scenarios import _rank
    from runtime.contracts.costmodel import Link
    from runtime.contracts.profile import Transfer
    from runtime.measure.scenarios import fidelity

    dev, edge = _profiles()
    px = Transfer("pixels+lz4", 90_000, 0.5, 0.001, codec="pixels+lz4")
    dev, edge = (replace(p, input_transfers=(*p.input_transfers, px)) for p in (dev, edge))
    dev = costs.with_codec_encode(dev, "pixels+lz4", 0.009)
    assert [t.encode_seconds for t in dev.input_transfers if t.codec == "pixels+lz4"] == [0.009]
    check = _Checks({("input", "jpeg75"): 0.8, ("input", "jpeg90"): 0.85, ("input", "pixels+lz4"): 1.0})
    conf, _, checks = fidelity.verified(_rank, dev, edge, Link.from_mbps(20.0, 20.0), 0.99, check, "")
    assert conf.hops[0].split == "input" and conf.hops[0].transfer.codec == "pixels+lz4", conf
    assert ("input", "pixels+lz4") in check.asked and checks[-1]["kept"] is True


def test_merge_keeps_each_runs_command_and_load():
    from runtime.measure.scenarios import report

    def part(model: str, cmd: str) -> dict:
        return {"spec": {"command": cmd, "models": [model]}, "seconds": 10.0, "machine": "m",
                "load": {"start": "1.00, 1.00, 1.00", "end": "2.00, 2.00, 2.00"}, "models": {model: {"scenarios": {}}}}
    res = report.merge([part("a", "edgesplit bench-scenarios --model a"), part("b", "edgesplit bench-scenarios --model b")])
    assert list(res["models"]) == ["a", "b"] and res["seconds"] == 20.0 and res["merged_runs"] == 2
    assert res["models"]["b"]["command"] == "edgesplit bench-scenarios --model b"
    assert res["models"]["a"]["load"].startswith("1.00, 1.00, 1.00 at the start")
    res = report.merge([part("a", "edgesplit bench-scenarios --model a --scenario 20mbit"),
                        part("a", "edgesplit bench-scenarios --model a --scenario 1.6mbit")])
    assert list(res["models"]) == ["a", "a (run 2)"]  # both runs kept, each with its own command (and board)
    assert res["models"]["a (run 2)"]["command"].endswith("--scenario 1.6mbit")


@pytest.mark.timeout(600)
@pytest.mark.skipif(bool(unavailable()), reason=f"needs a writable cgroup v1 cpu controller: {unavailable()}")
def test_quick_run_measures_every_strategy_and_cleans_up(tmp_path):
    before = _ours()
    tag = f"EDGESPLIT_TEST_TAG={uuid.uuid4().hex}"
    proc = subprocess.run([sys.executable, "-m", "runtime.cli.main", "bench-scenarios", "--quick", "--out", str(tmp_path),
                           "--name", "quick"], capture_output=True, text=True, timeout=540,
                          env={**os.environ, tag.split("=")[0]: tag.split("=")[1]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "quick.json").read_text())
    assert "... resnet18 20mbit: edgesplit's plans within" in proc.stderr  # the trial's progress names the model
    assert (tmp_path / "quick.png").stat().st_size > 0
    md = (tmp_path / "quick.md").read_text()
    assert "Command: `edgesplit bench-scenarios --quick" in md and "Machine:" in md
    (model,) = res["models"].values()
    assert 10 < model["calibration"]["slowdown"] < 30  # the quota really slows the board down
    heads = model["calibration"]["board_heads"]  # every head priced from whole passes under the quota
    assert heads["prefix_runs"] > 0 and heads["curve_ms"][0] == 0.0
    assert heads["curve_ms"][-1] == pytest.approx(model["calibration"]["local_p50_ms"])
    assert all(t["frames"] > 0 and t["head_ms"] > 0 for t in heads["timed"])
    assert "whole passes under the quota" in md
    frames = res["spec"]["frames"]
    (sc,) = model["scenarios"].values()
    assert sc["link"]["mbps"] > 0 and sc["link"]["rtt_ms"] > 0
    assert sc["rounds"] == 2 and "rounds of consecutive frames" in md  # quick mode: 3 frames as 2 + 1, order reversed
    for k in STRATEGIES:
        r = sc[k]
        assert r["frames"] == frames and len(r["per_frame_ms"]) == frames, k
        assert 0 <= r["fidelity"] <= 1 and 0 <= r["fidelity_offline"] <= 1
        assert r["fidelity_offline_frames"] == 16, k
        if k != "local" and r.get("split"):
            assert r["bytes_per_frame"] > 0 and r["local_fallbacks"] == 0, k
            for total, floor in zip(r["per_frame_ms"], r["per_frame_floor_ms"], strict=True):
                # a relay cannot beat the link it emulates (edge-only paces at the mean JPEG size: 5 % slack)
                assert floor <= total * 1.05 + 1.0, (k, floor, total)
            for st in r["per_frame_stages_ms"]:  # where the frame's time went, and what it cost the board
                assert st["board_cpu"] > 0 and st["throttled_periods"] >= 0 and "board_queue" in st, (k, st)
    es = sc["edgesplit"]
    # edgesplit's plan kept its floor on the fidelity frames (or is exact, or local)
    assert es["fidelity_offline"] >= res["spec"]["min_fidelity"], es
    if es.get("split") or es.get("plan_trial"):  # a split plan: its trial recorded (run or not, and why)
        rec = es["plan_trial"]
        assert rec["chosen"] and rec["why"] and rec["frames"] <= frames and "edgesplit's plan trial" in md, rec
        assert all(c["frames"] == rec["frames"] and c["p50_ms"] > 0 for c in rec["candidates"] if rec["ran"]), rec
    assert "fidelity (N frames)" in md
    assert _left_behind(before) == set(), "a cgroup was left behind"
    assert _tagged(tag) == [], "a process of the run (worker, relay, board child) was left behind"
