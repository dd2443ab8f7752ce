"""edgesplit's plan trial in the headline benchmark (runtime.measure.scenarios.trial): its best plans within the
margin, and local, run a few frames each before the rounds (here through a fake board child); edgesplit runs the one
measured fastest, local included, and the report says what was trialled and why."""

from __future__ import annotations

from runtime.contracts.costmodel import Link
from runtime.contracts.profile import Block, Profile, Transfer
from runtime.measure.scenarios import report, trial
from runtime.measure.scenarios.run import scenario_rows, time_rounds
from runtime.measure.scenarios.spec import SCENARIOS, RunSpec

REF = [3, 1, 4, 1, 5, 9, 2, 6]
CAL = {"free_ms": 20.0, "local_p50_ms": 300.0, "local_slowdown": 15.0}


class Board:
    """Answers the runner's jobs as the board child does: each plan (by split) at its own ms per frame, local at
    ``local_ms``; every job logged as (strategy, split or 'local', frames_from, frames_to)."""

    def __init__(self, ms: dict[str, float], local_ms: float):
        self.ms, self.local_ms, self.log = ms, local_ms, []

    def __call__(self, job: dict) -> dict:
        lo, hi = job["frames_from"], job["frames_to"]
        self.log.append((job["strategy"], "local" if job.get("local") else job["split"], lo, hi))
        if job.get("local"):
            return {"rows": [{"total_ms": self.local_ms, "class_index": REF[i], "throttled_ms": 0.0,
                              "throttled_periods": 0, "board_cpu_ms": 15.0} for i in range(lo, hi)]}
        ms = self.ms[job["split"]]
        return {"rows": [{"where": "edge", "wire_bytes": 1000, "class_index": REF[i], "board_cpu_ms": 12.0,
                          "times_ms": {"head": ms - 40.0, "encode": 1.0, "edge_tail": 5.0, "total": ms}}
                         for i in range(lo, hi)]}


def _job(split: str, predicted: float) -> dict:
    return {"split": split, "codec": "int8+lz4", "tl_id": "", "transfer": "int8+lz4", "predicted_ms": predicted,
            "plan": f"device=blocks to {split} via {split}:int8+lz4"}


def _run(board: Board, cands: list[dict], local_pred: float, frames: int = 4, budget_s: float = 60.0):
    return trial.run(board, cands, local_pred, "relay:1", frames, 1, 0.25, budget_s, lambda r: r["times_ms"]["total"] - 20.0,
                     lambda _: None)


def test_local_measured_fastest_is_the_plan_edgesplit_runs_and_the_report_says_why():
    """MobileNetV2 at 1.6 Mbit/s on 2026-12-04: the split plan predicted 243 against local's 300 and measured slower
    than local. Within the margin, local is trialled beside it; measured faster, edgesplit's plan is local's."""
    board = Board({"f7": 274.0, "f4": 290.0}, local_ms=253.0)
    chosen, rec = _run(board, [_job("f7", 243.0), _job("f4", 262.0)], 300.0)
    assert chosen is None and rec["ran"] and rec["chosen"] == "local"
    # best first, the order reversed in the second round, each with the trial's frames split over 2 rounds
    assert [(w, lo, hi) for _, w, lo, hi in board.log] == [("f7", 0, 2), ("f4", 0, 2), ("local", 0, 2),
                                                           ("local", 2, 4), ("f4", 2, 4), ("f7", 2, 4)]
    by = {c["plan"]: c for c in rec["candidates"]}
    assert by["local"]["p50_ms"] == 253.0 and by["local"]["frames"] == 4 and by["local"]["local"]
    f7 = by["f7:int8+lz4"]
    assert f7["p50_ms"] == 274.0 and f7["predicted_ms"] == 243.0 and f7["floor_p50_ms"] == 254.0
    assert f7["board_cpu_p50_ms"] == 12.0 and rec["plans"]["f7:int8+lz4"] == _job("f7", 0)["plan"]

    # the rounds then run edgesplit as local's plan: its row is local's in-round row, the report names the trial
    spec = RunSpec(frames=4, rounds=2, warmup=1)
    jobs = {"scission": None, "scissionlite": None, "edgesplit": chosen,
            "edge-only": {**_job("input", 180.0), "codec": "jpeg"}}
    board.ms["input"] = 181.0
    got, n = time_rounds(board, spec, jobs, "relay:1", lambda _: None)
    faithless = _Check({("input", "jpeg"): 0.66})  # edge-only: faster, 34 points lost
    r = scenario_rows(got, jobs, SCENARIOS["1.6mbit"], {"mbps": 1.6}, 4000, REF[:4], CAL, 300.0, faithless, n)
    r["edgesplit"]["plan_trial"] = rec
    assert r["edgesplit"]["p50_ms"] == r["local"]["p50_ms"] and r["edgesplit"]["plan"] == "all blocks on the board"
    md = "\n".join(report._static_table("m", "1.6mbit", r))
    assert "edgesplit's plan trial before the rounds (4 frames each" in md and "Chosen: **local**" in md
    assert "f7:int8+lz4: predicted 243 ms, measured p50 274.0 (floor 254.0" in md and "local / edgesplit = **1.00x**" in md
    assert "= edgesplit (the same plan: every block on the board)" in md
    assert "Against the lowest floor of a split plan in the trial (254.0 ms)" in md


def test_the_plan_measured_fastest_wins_even_when_predicted_second():
    board = Board({"f7": 274.0, "f4": 250.0}, local_ms=300.0)
    chosen, rec = _run(board, [_job("f7", 243.0), _job("f4", 262.0)], 400.0)  # local past the margin: not trialled
    assert chosen is not None and chosen["split"] == "f4" and "measured higher" in rec["why"]
    assert all(w != "local" for _, w, _, _ in board.log) and len(rec["candidates"]) == 2


def test_one_plan_alone_or_over_the_budget_is_not_trialled():
    board = Board({"f7": 274.0}, local_ms=253.0)
    best = _job("f7", 243.0)
    chosen, rec = _run(board, [best], 400.0)  # nothing else within the margin
    assert chosen is best and not rec["ran"] and board.log == [] and "no other plan" in rec["why"]
    # local within the margin but its predicted frames past the budget (0.3 s x (4 + 2 warm-up) > 1 s + the best's)
    chosen, rec = _run(board, [best], 300.0, budget_s=1.0)
    assert chosen is best and not rec["ran"] and board.log == []
    assert [s["plan"] for s in rec["skipped"]] == ["local"] and "budget" in rec["why"]
    assert "not run" in report._trial(rec, 253.0)


class _Check:
    frames = 16

    def __init__(self, values: dict | None = None):
        self.values, self.asked = values or {}, []

    def agreement(self, split: str, codec: str, tl_path: str = "") -> float:
        self.asked.append((split, codec))
        return self.values.get((split, codec), 1.0)


def _profiles() -> tuple[Profile, Profile]:
    """Four blocks, the last one long (the board: 100, 10, 10, 300 ms); after each of the first three a raw transfer
    and a smaller int8 one (16, 12, 10 KB): at 1.6 Mbit/s, with the 40 KB result's way back, the plans after b2, b1,
    b0 come to ~395, 400, 415 ms."""
    def prof(role: str, seconds: tuple[float, ...]) -> Profile:
        blocks = tuple(Block(i, f"b{i}", s, 40_000, transfers=(
            Transfer("raw", 40_000, codec="raw"), Transfer("int8", (16_000, 12_000, 10_000, 4_000)[i], 0.0001, 0.0001,
                                                         codec="int8+lz4"))) for i, s in enumerate(seconds))
        return Profile(machine=role, role=role, model="m", blocks=blocks, input_bytes=600_000,
                       input_transfers=(Transfer("raw", 600_000, codec="raw"),))
    return prof("device", (0.1, 0.01, 0.01, 0.3)), prof("edge", (0.005,) * 4)


def test_candidates_are_the_next_plans_within_the_margin_each_above_the_fidelity_floor():
    from runtime.cli.bench_scenarios import _rank

    dev, edge = _profiles()
    link = Link.from_mbps(20.0, 1.6)
    names = ["input", "b0", "b1", "b2", "b3"]
    check = _Check({("b1", "int8+lz4"): 0.95})  # the second cut's int8 loses too much: struck, never a candidate
    jobs, checks = trial.candidates(_rank, dev, edge, link, 0.99, check, "", names, 0.25, 3)
    assert [(j["split"], j["transfer"]) for j in jobs] == [("b2", "int8"), ("b0", "int8")], jobs
    preds = [j["predicted_ms"] for j in jobs]
    assert preds == sorted(preds) and trial.within(preds[0], preds[-1], 0.25)
    assert {(c["split"], c["transfer"], c["kept"]) for c in checks} >= {("b1", "int8", False)}
    # a narrower margin keeps the best alone; one plan at most, likewise
    assert len(trial.candidates(_rank, dev, edge, link, 0.99, check, "", names, 0.03, 3)[0]) == 1
    assert len(trial.candidates(_rank, dev, edge, link, 0.99, check, "", names, 0.25, 1)[0]) == 1


def test_a_jpeg_of_another_quality_at_the_same_cut_is_not_another_candidate():
    """JPEGs at the input, q75 the smallest: q50 and q90 are within the margin but only their bytes differ (the same
    board work), so the trial does not spend frames on them; the next kind (fp16, 300 KB) is past the margin."""
    from runtime.cli.bench_scenarios import _rank

    def prof(role: str, seconds: float) -> Profile:
        inputs = (Transfer("raw", 600_000, codec="raw"), Transfer("fp16", 300_000, codec="fp16"),
                  *(Transfer(f"jpeg{q}", b, 0.01, 0.001, codec=f"jpeg{q}") for q, b in
                    ((90, 14_000), (75, 6_000), (50, 9_000))))
        blocks = tuple(Block(i, f"b{i}", seconds, 100_000, transfers=(Transfer("raw", 100_000, codec="raw"),))
                       for i in range(4))
        return Profile(machine=role, role=role, model="m", blocks=blocks, input_bytes=600_000, input_transfers=inputs)

    dev, edge = prof("device", 0.5), prof("edge", 0.01)
    names = ["input", "b0", "b1", "b2", "b3"]
    jobs, _ = trial.candidates(_rank, dev, edge, Link.from_mbps(20.0, 1.6), 0.99, _Check(), "", names, 0.5, 3)
    assert [(j["split"], j["codec"]) for j in jobs] == [("input", "jpeg75")], jobs
