"""The harness's board head pricing (runtime.measure.scenarios.board): heads priced from whole passes cut by cut,
then each picked head timed on the board and the plans made again, the same profile for every strategy. The
planner is the real one (the CLI's ranker); the board's timings are handed in."""

from __future__ import annotations

import pytest

from runtime.contracts.costmodel import Link
from runtime.contracts.profile import Block, Profile, Transfer
from runtime.measure.scenarios import board, costs
from runtime.measure.scenarios.run import _job


def test_head_curve_keeps_measured_heads_and_stays_monotone():
    prior = [0.0, 10.0, 20.0, 30.0, 40.0]  # whole passes: 40 ms; the local run: 80 ms
    curve, scale = costs.head_curve(prior, {}, 80.0)
    assert scale == 2.0 and curve == [0.0, 20.0, 40.0, 60.0, 80.0]
    # cut 2 timed on its own at 70 ms: kept; cut 1 (prior 20) stays below it, cut 3 (prior 60) is lifted to it
    curve, _ = costs.head_curve(prior, {2: 70.0}, 80.0)
    assert curve == [0.0, 20.0, 70.0, 70.0, 80.0]
    # anchors out of order (noise): the later one is lifted to the earlier; the end is the local p50 or above
    curve, _ = costs.head_curve(prior, {1: 50.0, 2: 30.0}, 80.0)
    assert curve == [0.0, 50.0, 50.0, 60.0, 80.0]


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
        return {"1.6": {"scission": _job(_rank(costs.scission(d), costs.scission(edge), link, 0.0), 5, names),
                        "edgesplit": _job(_rank(d, edge, link, 0.0), 5, names)}}

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
