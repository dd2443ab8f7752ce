"""The local strategy in the headline benchmark's rounds (runtime.measure.scenarios.run.time_rounds): a fake board
child answers each job; the local row (and a plan that keeps every block on the board) is built from the in-round
passes, not from the calibration's local run timed before every strategy."""

from __future__ import annotations

import statistics

from runtime.measure.scenarios import report
from runtime.measure.scenarios.run import scenario_rows, time_rounds
from runtime.measure.scenarios.spec import SCENARIOS, RunSpec

REF = [3, 1, 4, 1, 5, 9]  # the calibration's local run's top-1 per frame
CAL = {"free_ms": 20.0, "local_p50_ms": 400.0, "local_slowdown": 20.0}  # the calibration's local run: 20x


class FakeChild:
    """Answers as the board child does: local passes at ``local_ms`` per frame (top-1 = REF but frame 2), a split
    strategy's frames at 100 ms; every job logged as (strategy, frames_from, frames_to, warmup)."""

    def __init__(self, local_ms: float):
        self.local_ms, self.log = local_ms, []

    def __call__(self, job: dict) -> dict:
        lo, hi = job["frames_from"], job["frames_to"]
        self.log.append((job["strategy"], lo, hi, job["warmup"]))
        if job.get("local"):
            assert "address" not in job  # local runs no agent, no relay
            return {"rows": [{"total_ms": self.local_ms + i, "class_index": 0 if i == 2 else REF[i],
                              "throttled_ms": 5.0, "throttled_periods": 1, "board_cpu_ms": 30.0} for i in range(lo, hi)]}
        rows = [{"where": "edge", "wire_bytes": 5000, "class_index": REF[i],
                 "times_ms": {"head": 0.0, "encode": 4.0, "edge_decode": 1.0, "edge_tail": 9.0, "total": 100.0}}
                for i in range(lo, hi)]
        out: dict = {"rows": rows}
        if job["pipeline_frames"]:
            out["pipelined"] = {"window": job["window"], "frames": 6, "seconds": 1.0, "fps": 6.0, "local_fallbacks": 0}
        return out


class _Check:
    frames = 16

    def agreement(self, split: str, codec: str, tl_path: str = "") -> float:
        return 0.98


def _jobs() -> dict:
    job = {"split": "input", "codec": "jpeg", "tl_id": "", "predicted_ms": 90.0, "plan": "JPEG of the input"}
    return {"scission": None, "scissionlite": None, "edgesplit": None, "edge-only": job}


def test_local_is_timed_in_the_rounds_and_its_row_comes_from_them():
    spec = RunSpec(frames=6, rounds=3, warmup=2)
    child = FakeChild(local_ms=300.0)  # the board in the rounds: 15x, not the calibration's 20x
    got, n = time_rounds(child, spec, _jobs(), "relay:1", lambda _: None)
    # local is one of the runs in the reversal; the None plans are not run (their row is local's)
    assert [(s, lo) for s, lo, _, _ in child.log] == [("local", 0), ("edge-only", 0), ("edge-only", 2), ("local", 2),
                                                      ("local", 4), ("edge-only", 4)]
    assert all(w == 2 for *_, w in child.log)  # warm-up as the others, each round
    sc = SCENARIOS["20mbit"]
    r = scenario_rows(got, _jobs(), sc, {"mbps": 20.0}, 4000, REF, CAL, 380.0, _Check(), n)
    local = r["local"]
    totals = [300.0 + i for i in range(6)]
    assert local["per_frame_ms"] == totals and local["p50_ms"] == statistics.median(totals)
    assert local["timed_in_rounds"] and local["slowdown"] == statistics.median(totals) / CAL["free_ms"]
    assert local["calibration_slowdown"] == 20.0 and local["calibration_p50_ms"] == 400.0
    assert local["fidelity"] == 5 / 6  # its own top-1 in the rounds, against the reference
    assert local["fidelity_offline"] == 1.0 and local["predicted_ms"] == 380.0
    assert [st["board_cpu"] for st in local["per_frame_stages_ms"]] == [30.0] * 6
    for name in ("scission", "scissionlite", "edgesplit"):  # every block on the board: local's in-round row
        assert r[name]["p50_ms"] == local["p50_ms"] and r[name]["plan"] == "all blocks on the board", name
        assert r[name]["strategy"] == name
    assert r["edge-only"]["p50_ms"] == 100.0 and r["edge-only"]["pipelined"]["fps"] == 6.0
    assert r["rounds"] == 3 and list(r)[:2] == ["link", "local"]

    md = "\n".join(report._static_table("m", "20mbit", r))
    assert "local's whole-model passes on the board among them" in md
    assert "local: timed in the rounds, p50 302.5 ms = **15.1x**" in md and "p50 400.0 ms = 20.0x" in md
    assert "local / edgesplit = **1.00x**" in md  # edgesplit's plan is local's: the same in-round row


def test_results_without_in_round_local_still_render():
    """Older results (the local row copied from the calibration's run): the table says so, the --merge path too."""
    got, n = time_rounds(FakeChild(local_ms=300.0), RunSpec(frames=6, rounds=2, warmup=1), _jobs(), "relay:1",
                         lambda _: None)
    r = scenario_rows(got, _jobs(), SCENARIOS["20mbit"], {"mbps": 20.0}, 4000, REF, CAL, 380.0, _Check(), n)
    old = {k: ({kk: vv for kk, vv in v.items() if kk not in ("timed_in_rounds", "slowdown", "free_ms",
                                                             "calibration_p50_ms", "calibration_slowdown")}
               if isinstance(v, dict) else v) for k, v in r.items()}
    md = "\n".join(report._static_table("m", "20mbit", old))
    assert "timed once, before every strategy (this run predates local in the rounds" in md
    assert "local's whole-model passes" not in md and "local: timed in the rounds" not in md
