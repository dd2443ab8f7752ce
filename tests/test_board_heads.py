"""The harness's board head pricing (runtime.measure.scenarios.board): heads priced from whole passes cut by cut,
then each picked head timed on the board and the plans made again, the same profile for every strategy. The
planner is the real one (the CLI's ranker); the board's timings are handed in."""

from __future__ import annotations

import pytest

from runtime.contracts.costmodel import Link
from runtime.contracts.profile import Block, Profile, Transfer
from runtime.measure.scenarios import board, costs
from runtime.measure.scenarios.trial import job


def test_head_curve_keeps_measured_heads_and_stays_monotone():
    prior = [0.0, 10.0, 20.0, 30.0, 40.0]  # whole passes: 40 ms; the local run: 80 ms
    curve, scale = costs.head_curve(prior, {}, 80.0)
    assert scale == 2.0 and curve == [0.0, 20.0, 40.0, 60.0, 80.0]
    # cut 2 timed on its own at 70 ms: kept; cut 1 (prior 20) stays below it, cut 3 (prior 60) is lifted to it
    curve, _ = costs.head_curve(prior, {2: 70.0}, 80.0)
    assert curve == [0.0, 20.0, 70.0, 70.0, 80.0]
    # anchors out of order (noise): pooled to their mean, each a measurement of the same rising curve
    curve, _ = costs.head_curve(prior, {1: 50.0, 2: 30.0}, 80.0)
    assert curve == [0.0, 40.0, 40.0, 60.0, 80.0]
    curve, _ = costs.head_curve(prior, {1: 30.0, 2: 70.0, 3: 40.0}, 80.0)
    assert curve == [0.0, 30.0, 55.0, 55.0, 80.0]
    assert costs._isotonic([3.0, 1.0, 2.0, 5.0, 4.0]) == [2.0, 2.0, 2.0, 4.5, 4.5]


def _prof(role: str, block_s: list[float], mid_bytes: int) -> Profile:
    blocks = tuple(Block(i, f"b{i}", s, mid_bytes if i < len(block_s) - 1 else 4_000,
                         transfers=(Transfer("raw", mid_bytes if i < len(block_s) - 1 else 4_000, codec="raw"),
                                    Transfer("int8", mid_bytes // 4, 0.001, 0.001, codec="int8")))
                   for i, s in enumerate(block_s))
    return Profile(machine=role, role=role, model="m", blocks=blocks, input_bytes=600_000,
                   input_transfers=(Transfer("raw", 600_000, codec="raw"),))


def test_with_board_heads_prices_every_cut_as_the_curve():
    p = costs.with_board_heads(_prof("device", [0.1] * 4, 10_000), [0.0, 50.0, 60.0, 200.0, 300.0])
    assert [round(sum(b.seconds for b in p.blocks[:k]) * 1e3, 6) for k in range(5)] == [0, 50, 60, 200, 300]
    with pytest.raises(ValueError):
        costs.with_board_heads(p, [0.0, 1.0])


def test_a_head_priced_too_low_is_timed_and_the_plan_changes():
    """The prior puts a cheap head after block 0, so both cost models pick cut 1; timed on the board it takes 700 of
    the model's 800 ms. Planned again, the later heads (held at or above 700 ms now) are picked and timed in turn
    until the pick is one timed already; Scission sees the same head times."""
    from runtime.cli.bench_scenarios import _rank

    dev = _prof("device", [0.1, 0.3, 0.3, 0.1], 20_000)
    edge = _prof("edge", [0.005] * 4, 20_000)
    link = Link.from_mbps(20.0, 1.6)
    names = ["input", "b0", "b1", "b2", "b3"]
    heads = board.Heads([0.0, 100.0, 400.0, 700.0, 800.0], 3, 800.0)
    asked: list[list[dict]] = []

    def plan(d: Profile) -> dict:
        return {"1.6": {"scission": job(_rank(costs.scission(d), costs.scission(edge), link, 0.0), names),
                        "edgesplit": job(_rank(d, edge, link, 0.0), names)}}

    def time(todo: list[dict]) -> list[dict]:
        asked.append(todo)
        ms = {"b0": 700.0, "b1": 760.0, "b2": 790.0}
        return [{**c, "head_ms": [ms[c["split"]], ms[c["split"]] + 20, ms[c["split"]] - 10],
                 "transfers": [{**t, "tl_ms": [0.0] * 3, "encode_ms": [2.0, 2.0, 2.0]} for t in c["transfers"]]}
                for c in todo]

    first = plan(heads.apply(dev))
    assert first["1.6"]["edgesplit"]["split"] == "b0"  # the prior's pick
    plans, priced = board.plan_with_board_heads(heads, dev, plan, time, names, "")
    # one head per cut, each picked transfer's encode on its output (Scission's raw, edgesplit's int8)
    assert [(c["split"], [t["transfer"] for t in c["transfers"]]) for c in asked[0]] == [("b0", ["raw", "int8"])]
    assert [sorted({t["split"] for t in a}) for a in asked] == [["b0"], ["b2"], ["b1"]]
    # b0 at 700 ms + 5 KB of int8 at 1.6 Mbit/s still beats 800 ms; Scission's raw 20 KB does not: local
    assert plans["1.6"]["edgesplit"]["split"] == "b0" and plans["1.6"]["scission"] is None
    assert plans["1.6"]["edgesplit"]["predicted_ms"] < 800.0
    assert [round(sum(b.seconds for b in priced.blocks[:k]) * 1e3, 6) for k in range(5)] == [0, 700, 760, 790, 800]
    s = heads.summary()
    assert s["timed"][0]["frames"] == 3 and s["timed"][0]["prior_ms"] == 100.0 and s["timed"][0]["head_ms"] == 700.0
    enc = next(t for t in priced.blocks[0].transfers if t.name == "int8").encode_seconds
    assert enc == pytest.approx(0.002)  # the timed encode replaced the profile's


def test_top_heads_takes_each_strategys_best_cuts_by_the_estimate():
    """The first estimate (head + encode + bytes / bandwidth + RTT + edge decode and tail) ranks every cut per
    strategy and link; the best N distinct cuts of each are timed, best first, transfers below a strategy's measured
    fidelity floor left out, heads already timed with that transfer not asked again."""
    dev = costs.with_board_heads(_prof("device", [0.1] * 4, 20_000), [0.0, 10.0, 300.0, 310.0, 800.0])
    edge = _prof("edge", [0.005] * 4, 20_000)
    link = Link.from_mbps(20.0, 1.6)
    names = ["input", "b0", "b1", "b2", "b3"]
    # int8 (5 KB) at b0 (cut 1): 10 + 1 + 25 + 20 + 1 + 15 ms; b1 next (cut 2: a 300 ms head); b2 (310 ms) left out
    assert board.estimate_ms(dev, edge, link, 1, dev.transfers_after(1)[1]) == pytest.approx(10 + 1 + 25 + 20 + 1 + 15)
    heads = board.Heads([0.0, 10.0, 300.0, 310.0, 800.0], 3, 800.0)
    got = board.top_heads({"scission": (costs.scission(dev), costs.scission(edge), 0.0),
                           "edgesplit": (dev, edge, 0.99)}, [link], 2, names, "tl.pt", heads)
    assert [(c["split"], [t["transfer"] for t in c["transfers"]]) for c in got] == [("b0", ["raw", "int8"]),
                                                                                   ("b1", ["raw", "int8"])]
    # int8 at b0 measured below edgesplit's floor: its best there is raw (also Scission's); timed already: not asked
    low = costs.with_fidelity(dev, 1, "int8", 0.9)
    heads.add([{"split": "b0", "cut": 1, "head_ms": [10.0], "transfers": [
        {"transfer": "raw", "codec": "raw", "tl": "", "tl_ms": [0.0], "encode_ms": [0.1]}]}], "candidate")
    got = board.top_heads({"edgesplit": (low, edge, 0.99)}, [link], 1, names, "", heads)
    assert got == []  # b0 raw is edgesplit's best with int8 struck, and it is timed
    assert heads.summary()["timed"][0]["why"] == "candidate"


def test_candidates_are_timed_before_the_first_plans_within_the_budget():
    """plan_with_board_heads times the candidates first (with the budget), lists the ones the board left untimed,
    then plans on the timed heads: a candidate timed cheap becomes the pick without a picked-head round."""
    from runtime.cli.bench_scenarios import _rank

    dev = _prof("device", [0.1, 0.3, 0.3, 0.1], 20_000)
    edge = _prof("edge", [0.005] * 4, 20_000)
    link = Link.from_mbps(20.0, 1.6)
    names = ["input", "b0", "b1", "b2", "b3"]
    heads = board.Heads([0.0, 100.0, 400.0, 700.0, 800.0], 3, 800.0)
    calls: list[tuple[list[str], float | None]] = []

    def plan(d: Profile) -> dict:
        return {"1.6": {"edgesplit": job(_rank(d, edge, link, 0.0), names)}}

    def candidates(d: Profile) -> list[dict]:
        return board.top_heads({"edgesplit": (d, edge, 0.0)}, [link], 3, names, "", heads)

    def time(todo: list[dict], budget_s: float | None = None) -> list[dict]:
        calls.append(([c["split"] for c in todo], budget_s))
        ms = {"b0": 50.0, "b1": 450.0, "b2": 750.0}
        done = todo[:1] if budget_s is not None else todo  # the budget ran out after the first
        return [{**c, "head_ms": [ms[c["split"]]] * 3,
                 "transfers": [{**t, "tl_ms": [0.0] * 3, "encode_ms": [1.0] * 3} for t in c["transfers"]]}
                for c in done]

    plans, priced = board.plan_with_board_heads(heads, dev, plan, time, names, "", candidates=candidates,
                                                budget_s=5.0)
    assert calls == [(["b0", "b1", "b2"], 5.0)]  # no picked-head round: the pick (b0) was timed as a candidate
    assert plans["1.6"]["edgesplit"]["split"] == "b0"
    assert heads.summary()["skipped"] == [{"split": "b1", "cut": 2}, {"split": "b2", "cut": 3}]
    assert round(sum(b.seconds for b in priced.blocks[:1]) * 1e3, 6) == 50.0


def test_time_heads_idles_before_each_frame_and_keeps_to_its_budget():
    """The board child's head timing on a real model (no quota here): one entry per candidate timed, ``runs``
    frames each, the gap slept before every frame (the untimed one too), no candidate started past the budget."""
    import time as clock

    import torch

    from runtime.measure.scenarios.device import time_heads
    from runtime.models.loader import load_model

    torch.set_num_threads(1)
    loaded = load_model("digits_cnn")
    names = [p.name for p in loaded.sliced.split_points]
    xs = [torch.zeros(loaded.sliced.split_points[0].out_shape)]  # the input point's shape
    cands = [{"split": names[k], "cut": k, "transfers": [{"transfer": "int8+lz4", "codec": "int8+lz4", "tl": ""}]}
             for k in (1, 2)]
    t = clock.perf_counter()
    got = time_heads(loaded, xs, cands, 3, gap_s=0.05)
    assert clock.perf_counter() - t >= 2 * 4 * 0.05  # 2 heads x (3 + 1 untimed) frames, each after the gap
    assert [(g["split"], len(g["head_ms"]), len(g["transfers"][0]["encode_ms"])) for g in got] == \
        [(names[1], 3, 3), (names[2], 3, 3)]
    assert [g["split"] for g in time_heads(loaded, xs, cands, 1, budget_s=0.0)] == [names[1]]


def test_input_codec_priced_with_the_board_frames_encode_and_bytes():
    """An input codec timed frame by frame on the board (pixels+lz4, webp) is priced with those frames' median encode
    and bytes; other transfers keep the profile's."""
    p = _prof("device", [0.1] * 2, 10_000)
    p = Profile(**{**p.__dict__, "input_transfers": (Transfer("raw", 600_000, codec="raw"),
                                                      Transfer("webp", 36_255, 0.02, 0.002, codec="webp"))})
    got = costs.with_codec_encode(p, "webp", 0.003, 49_027)
    assert [(t.name, t.bytes, t.encode_seconds) for t in got.input_transfers] == [("raw", 600_000, 0.0),
                                                                                  ("webp", 49_027, 0.003)]
    assert costs.with_codec_encode(p, "webp", 0.003).input_transfers[1].bytes == 36_255
