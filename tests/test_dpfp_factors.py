"""Tile-compute factors measured on real tiles (runtime.tools.dpfp_tilecal -> planner.dpfp_factors ->
planner.dpfp, issue 13): the file's checks, the interpolation, the cost model's use of them for DPFP and
the baselines, and the tool on a real model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from planner import dpfp as D
from planner import dpfp_factors as F
from planner.parallel_plan import geometry, propose
from runtime.contracts.costmodel import Link
from runtime.contracts.errors import InvalidInput
from runtime.contracts.profile import Block, Profile
from runtime.parallel import receptive as rf
from runtime.parallel.receptive import Graph, Layer

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(240)]


def doc(units: dict[str, list[tuple[float, float]]], **extra) -> dict:
    return {"format": F.FORMAT, "version": 1, "model": "m", "runs": 3, "measured_at": "2026-12-03T16:00:00Z",
            "units": [{"name": n, "samples": [{"fraction": f, "factor": v} for f, v in s]} for n, s in units.items()],
            **extra}


def test_factor_interpolates_in_log_fraction_and_holds_beyond_the_samples():
    pts = F.parse(doc({"u": [(0.25, 2.0), (0.5, 1.5)]})).points("u")
    assert pts == ((0.25, 2.0), (0.5, 1.5), (1.0, 1.0))  # the whole map is the reference, factor 1
    assert F.factor_at(pts, 1.0) == 1.0 and F.factor_at(pts, 0.5) == 1.5
    assert F.factor_at(pts, 0.25 * 2 ** 0.5) == pytest.approx(1.75)  # halfway in log(fraction)
    assert F.factor_at(pts, 0.01) == 2.0  # below the smallest sample: its factor
    assert F.factor_at((), 0.3) == 1.0  # no samples: area alone


def test_duplicate_fractions_are_averaged_and_unknown_units_listed():
    tf = F.parse(doc({"u": [(0.25, 2.0), (0.25, 3.0)]}))
    assert tf.points("u")[0] == (0.25, 2.5)
    assert tf.missing(["u", "v"]) == ["v"] and tf.points("v") == ()


@pytest.mark.parametrize("bad, match", [
    ({"format": "other", "version": 1, "units": []}, "not an edgesplit-tile-factors"),
    (doc({}), "'units' must be a list"),
    (doc({"u": [(0.5, 0.01)]}), "out of range"),
    (doc({"u": [(0.5, 41.0)]}), "out of range"),  # the tile would take 20.5x the whole map
    (doc({"u": [(1.5, 1.0)]}), "out of range"),
    ({**doc({"u": []}), "units": [{"samples": []}]}, "has no name"),
    ({**doc({"u": []}), "units": [{"name": "u", "samples": [{"fraction": "x"}]}]}, "numeric"),
])
def test_bad_files_are_refused_with_the_reason(bad, match):
    with pytest.raises(InvalidInput, match=match):
        F.parse(bad)


def test_load_checks_size_and_json(tmp_path):
    p = tmp_path / "f.json"
    p.write_text("{not json")
    with pytest.raises(InvalidInput, match="not readable JSON"):
        F.load(p)
    p.write_text(" " * (F.MAX_FILE_BYTES + 1))
    with pytest.raises(InvalidInput, match="limit"):
        F.load(p)
    with pytest.raises(InvalidInput, match="cannot read"):
        F.load(tmp_path / "missing.json")


def chain_problem(factors: tuple = ()) -> D.Problem:
    """Two 3x3 conv units on a 16x16 map, one second each on two equal workers, a free link."""
    units = tuple(D.Unit(f"u{i}", Graph.chain([Layer(f"c{i}", rf.CONV, (), 3, 1, 1, cost=9.0)], input=f"in{i}"),
                         (1.0, 1.0), 8) for i in range(2))
    return D.Problem(units, (16, 16), 3, Link(0.0, 1e15), tile_factors=factors)


def test_the_cost_model_multiplies_each_tiles_area_share_by_its_factor():
    area = chain_problem()
    curves = (((0.5, 1.0), (1.0, 1.0)), ((0.25, 3.0), (1.0, 1.0)))  # unit 1's small tiles cost 3x their area
    measured = chain_problem(curves)
    for first, end in ((0, 1), (1, 2), (0, 2)):
        a, m = D.block_cost(area, first, end, 2), D.block_cost(measured, first, end, 2)
        assert a.rows == m.rows == (8, 8)
    # unit 1 alone on two workers: 8 of 16 rows, fraction 0.5, factor 3 + (0.5 -> 0.25..1 in log) = 2.0
    assert D.block_cost(measured, 1, 2, 2).compute_seconds == pytest.approx(0.5 * F.factor_at(curves[1], 0.5))
    assert D.block_cost(measured, 1, 2, 2).compute_seconds == pytest.approx(1.0)
    assert D.block_cost(area, 1, 2, 2).compute_seconds == pytest.approx(0.5)
    # one worker computes the whole map: factor 1, the same as by area
    assert D.single_worker(measured).seconds == pytest.approx(D.single_worker(area).seconds) == pytest.approx(2.0)
    # the factor makes splitting unit 1 no gain, and every strategy is priced with it
    assert D.layer_by_layer(measured).seconds > D.layer_by_layer(area).seconds
    with pytest.raises(InvalidInput, match="tile-factor curves"):
        chain_problem(curves[:1])


def test_the_tool_measures_a_real_model_and_the_planner_uses_it(tmp_path):
    # one run a figure: a stall of a busy machine is re-timed by the tool (the tests below), not a failure here
    out = tmp_path / "factors.json"
    res = subprocess.run([sys.executable, "-m", "runtime.tools.dpfp_tilecal", "--model", "digits_cnn", "--runs", "1",
                          "--out", str(out)], capture_output=True, text=True, timeout=200)
    assert res.returncode == 0, res.stderr
    raw = json.loads(out.read_text())
    assert raw["runs"] == 1 and raw["threads"] == 1 and raw["measured_at"]
    assert all(0 <= u["retimed"] <= 4 for u in raw["units"])
    tf = F.load(out)
    g = geometry("digits_cnn")
    names = list(g.names[1:])
    assert tf.model == "digits_cnn" and tf.missing(names) == []
    assert all(len(tf.points(n)) >= 2 for n in names)  # at least one tile shape and the whole map per unit
    from runtime.models.loader import load_model

    sliced = load_model("digits_cnn").sliced
    blocks = tuple(Block(index=i, name=n, seconds=0.001 * (1 + i % 3), output_bytes=sliced.split(i + 1).fp32_bytes)
                   for i, n in enumerate(names))
    prof = Profile(machine="w", role="edge", model="digits_cnn", blocks=blocks, input_bytes=0)
    with_f = propose([prof] * 2, Link.from_mbps(1, 1000), geom=g, tile_factors=tf)
    without = propose([prof] * 2, Link.from_mbps(1, 1000), geom=g)
    assert with_f.problem.tile_factors and not without.problem.tile_factors
    assert with_f.plans["layer_by_layer"].seconds != pytest.approx(without.plans["layer_by_layer"].seconds)
    assert all(with_f.plans["dpfp"].seconds <= p.seconds + 1e-12 for p in with_f.plans.values())


def test_the_tool_refuses_an_unknown_model(tmp_path):
    res = subprocess.run([sys.executable, "-m", "runtime.tools.dpfp_tilecal", "--model", "nope", "--out",
                          str(tmp_path / "f.json")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown model 'nope'" in res.stderr


def test_plan_cli_takes_the_factors_and_refuses_another_models(tmp_path):
    from runtime.models.loader import load_model

    sliced = load_model("resnet18").sliced
    n = len(sliced.split_points) - 1
    blocks = tuple(Block(index=i, name=sliced.split(i + 1).name, seconds=0.004, output_bytes=sliced.split(i + 1).fp32_bytes)
                   for i in range(n))
    prof = tmp_path / "w.json"
    prof.write_text(Profile(machine="w", role="edge", model="resnet18", blocks=blocks, input_bytes=0).to_json())
    factors = tmp_path / "f.json"
    base = [sys.executable, "-m", "runtime.cli.main", "plan", "--parallel", "--parallel-link", "1,1000",
            "--profile", str(prof), "--profile", str(prof), "--parallel-tile-factors", str(factors)]
    factors.write_text(json.dumps({**doc({"layer1_0_relu": [(0.5, 1.5)]}), "model": "vgg16"}))
    res = subprocess.run(base, capture_output=True, text=True, timeout=200)
    assert res.returncode != 0 and "is for 'vgg16'" in res.stderr
    factors.write_text(json.dumps({**doc({"add": [(0.5, 1.5)]}), "model": "resnet18"}))
    res = subprocess.run(base, capture_output=True, text=True, timeout=200)
    assert res.returncode == 0, res.stderr
    assert "dpfp" in res.stdout and "single_worker" in res.stdout


# ---- the tool writes only what the planner takes: a stalled timing is re-timed, or the tool fails ----------


def scripted_timer(stalled):
    """A stand-in for the tool's timer: 1 ms a figure, 1 s (a stall of the machine) on the calls ``stalled``
    (1-based) says; the calls it got, in order."""
    calls = []

    def timer(fn, runs, min_seconds=0.0):
        calls.append(fn)
        return 1.0 if stalled(len(calls)) else 1e-3

    return timer, calls


@pytest.mark.parametrize("stall", [1, 2], ids=["whole_map_stalled", "tile_stalled"])
def test_a_stalled_timing_is_timed_again_and_the_file_is_one_the_planner_takes(monkeypatch, stall):
    from runtime.tools import dpfp_tilecal as T

    timer, calls = scripted_timer(lambda n: n == stall)
    monkeypatch.setattr(T, "_median_seconds", timer)
    res = T.calibrate("digits_cnn", 1, "input", "conv1")  # one unit: the whole map, then 6 tile shapes
    tf = F.parse(res)  # a 1 s whole map makes every factor ~0.001; a 1 s tile takes 1000x the whole map
    (unit,) = res["units"]
    assert len(calls) == 1 + len(unit["samples"]) + 1 and unit["retimed"] == 1
    assert unit["full_seconds"] == 1e-3 and all(s["seconds"] == 1e-3 for s in unit["samples"])
    assert all(T.in_range(f, v) for f, v in tf.points(unit["name"]))


def test_a_timing_that_stays_out_of_range_fails_the_tool_and_writes_nothing(monkeypatch, tmp_path, capsys):
    from runtime.tools import dpfp_tilecal as T

    timer, calls = scripted_timer(lambda n: n > 1)  # every tile, every time: 1000x the whole map
    monkeypatch.setattr(T, "_median_seconds", timer)
    out = tmp_path / "f.json"
    assert T.main(["--model", "digits_cnn", "--runs", "1", "--end", "conv1", "--out", str(out)]) == 3
    assert not out.exists()
    err = capsys.readouterr().err
    assert f"after {T.MAX_RETIMES} re-timings" in err and "factor >= 0.05" in err and "too busy" in err
    assert len(calls) == 1 + 6 * (1 + T.MAX_RETIMES)  # bounded: each tile timed 1 + MAX_RETIMES times


def test_the_tool_checks_the_planners_range():
    from runtime.tools import dpfp_tilecal as T

    assert (T.MIN_FACTOR, T.MAX_TILE_OVER_WHOLE, T.FORMAT) == (F.MIN_FACTOR, F.MAX_TILE_OVER_WHOLE, F.FORMAT)
    for fraction, factor in ((0.5, 0.049), (0.5, 0.05), (0.5, 40.0), (0.5, 40.1), (1.0, 1.0), (1.01, 1.0)):
        try:
            F.parse(doc({"u": [(fraction, factor)]}))
            taken = True
        except InvalidInput:
            taken = False
        assert T.in_range(fraction, factor) is taken, (fraction, factor)
