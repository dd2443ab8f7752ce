"""DPFP partitioning (planner.dpfp, issue 13): the dynamic programme against exhaustive search,
the cost model on hand-computed cases, the baselines, and problems built from profiles."""

from __future__ import annotations

import itertools
import math
import random
import time

import pytest
import torch

from planner import dpfp as D
from runtime.contracts.costmodel import Link
from runtime.contracts.errors import InvalidInput
from runtime.contracts.profile import Block, Profile
from runtime.parallel import receptive as rf
from runtime.parallel.receptive import Graph, Layer

torch.set_num_threads(1)


def conv_unit(name: str, k: int = 3, s: int = 1, residual: bool = False) -> Graph:
    """A unit: conv (+ ReLU), or a residual block conv-ReLU-conv + skip."""
    inp = f"{name}_in"
    if residual:
        return Graph((Layer(f"{name}_c1", rf.CONV, (inp,), k, 1, k // 2, cost=9.0),
                      Layer(f"{name}_r", rf.POINTWISE, (f"{name}_c1",)),
                      Layer(f"{name}_c2", rf.CONV, (f"{name}_r",), k, 1, k // 2, cost=9.0),
                      Layer(f"{name}_add", rf.ADD, (inp, f"{name}_c2"))), input=inp)
    return Graph.chain([Layer(f"{name}_c", rf.CONV, (), k, s, k // 2, cost=float(k * k)),
                        Layer(f"{name}_r", rf.POINTWISE)], input=inp)


def random_problem(rng: random.Random, n_units: int, n_workers: int) -> D.Problem:
    h, w = rng.randint(24, 64), rng.randint(16, 40)
    factors = [rng.uniform(1.0, 3.0) for _ in range(n_workers)]
    units, size = [], h
    for i in range(n_units):
        s = 2 if size >= 8 and rng.random() < 0.3 else 1
        size = (size - 1) // s + 1
        geometry = conv_unit(f"u{i}", rng.choice([1, 3, 3, 5]), s, residual=s == 1 and rng.random() < 0.3)
        base = rng.uniform(0.001, 0.05)
        units.append(D.Unit(f"u{i}", geometry, tuple(base * f for f in factors), rng.choice([8, 16, 32, 64])))
    link = Link(rng.uniform(0.0, 0.01), 10 ** rng.uniform(6, 9))
    return D.Problem(tuple(units), (h, w), 3, link)


def exhaustive(problem: D.Problem) -> D.Plan:
    """Every set of block boundaries, each block on its best number of workers."""
    L = problem.n_units
    best = None
    for cuts in itertools.product((False, True), repeat=L - 1):
        ends = [i + 1 for i, cut in enumerate(cuts) if cut] + [L]
        blocks = list(zip([0, *ends[:-1]], ends, strict=True))
        plan = D.evaluate(problem, blocks)
        if best is None or plan.seconds < best.seconds:
            best = plan
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(30))
def test_dp_equals_exhaustive_search_and_beats_the_baselines(seed):
    rng = random.Random(seed)
    problem = random_problem(rng, rng.randint(1, 8), rng.randint(1, 4))
    plan = D.dpfp(problem)
    brute = exhaustive(problem)
    assert math.isclose(plan.seconds, brute.seconds, rel_tol=1e-12), (seed, plan.blocks, brute.blocks)
    again = D.evaluate(problem, plan.blocks)  # the plan's own prediction is consistent
    assert math.isclose(again.seconds, plan.seconds, rel_tol=1e-12)
    assert math.isclose(plan.seconds, sum(c.seconds for c in plan.breakdown), rel_tol=1e-12)
    for name, base in D.baselines(problem).items():
        assert plan.seconds <= base.seconds * (1 + 1e-12), (seed, name)
    for cost, rows in zip(plan.breakdown, plan.shares, strict=True):
        h, w = problem.hw[cost.end]
        assert sum(cost.tile_pixels) == h * w and min(rows) >= 1  # the tiles cover the map
        assert sum(rows) == h * cost.cols  # each grid row's tiles share its height
        assert len(cost.workers) == len(rows) <= plan.workers


def test_hand_computed_block_cost():
    unit = D.Unit("u", conv_unit("u"), (1.0, 1.0), out_channels=4)  # conv 3x3/1 (cost 9) + ReLU (cost 1)
    problem = D.Problem((unit,), (8, 10), in_channels=2, link=Link(0.01, 1000.0), grids=False)
    two = D.block_cost(problem, 0, 1, workers=2)
    assert two.rows == (4, 4) and two.input_rows == (5, 5)  # rows [0,4) read [-1,5) -> [0,5); [4,8) read [3,8)
    assert math.isclose(two.scatter_seconds, (5 + 5) * 10 * 2 * 4 / 1000)
    assert math.isclose(two.compute_seconds, 0.5)  # half of every layer's area
    assert math.isclose(two.gather_seconds, 8 * 10 * 4 * 4 / 1000)
    assert math.isclose(two.seconds, 0.01 + 0.8 + 0.5 + 1.28)
    one = D.block_cost(problem, 0, 1, workers=1)
    assert one.input_rows == (8,) and math.isclose(one.seconds, 0.01 + 0.64 + 1.0 + 1.28)
    assert D.block_cost(problem, 0, 1) == two  # the cheaper worker count
    assert D.dpfp(problem).seconds == two.seconds


def test_a_grid_where_it_reads_fewer_bytes_and_the_coordinator_term():
    unit = D.Unit("u", conv_unit("u"), (1.0, 1.0), out_channels=4)
    problem = D.Problem((unit,), (8, 10), in_channels=2, link=Link(0.01, 1000.0))
    two = D.block_cost(problem, 0, 1, workers=2)  # 1 x 2 grid: columns [0,5) and [5,10) read 6 columns each
    assert two.cols == 2 and two.rows == (8, 8) and two.tile_pixels == (40, 40) and two.input_rows == (8, 8)
    assert math.isclose(two.scatter_seconds, 2 * 8 * 6 * 2 * 4 / 1000)  # 96 pixels, not the bands' 100
    assert math.isclose(two.seconds, 0.01 + 0.768 + 0.5 + 1.28)
    assert D.dpfp(problem).breakdown == (two,)
    costed = D.Problem((unit,), (8, 10), in_channels=2, link=Link(0.01, 1000.0), grids=False,
                       coordinator_bytes_per_second=1000.0)
    bands = D.block_cost(costed, 0, 1, workers=2)
    assert math.isclose(bands.coordinator_seconds, (800 + 1280) / 1000)  # every byte sent and received, once
    assert math.isclose(bands.seconds, 0.01 + 0.8 + 0.5 + 1.28 + 2.08)
    one = D.block_cost(costed, 0, 1, workers=1)
    assert math.isclose(one.coordinator_seconds, (640 + 1280) / 1000)  # no halo: fewer bytes to handle
    fixed = D.Problem((unit,), (8, 10), in_channels=2, link=Link(0.01, 1000.0), grids=False, block_overhead_seconds=0.5)
    assert math.isclose(D.block_cost(fixed, 0, 1, workers=2).seconds, 0.01 + 0.8 + 0.5 + 1.28 + 0.5)  # once a block


def test_grid_tiles_are_balanced_by_speed_and_cover_the_map():
    tiles = rf.partition((10, 12), [3.0, 1.0, 1.0, 1.0], cols=2)  # rows by 4:2, columns 3:1 and 1:1
    assert [t.shape for t in tiles] == [(7, 9), (7, 3), (3, 6), (3, 6)]
    assert rf.partition((10, 12), [t.area for t in tiles], cols=2) == tiles  # areas as weights: the same tiles
    with pytest.raises(ValueError, match="rows of 2"):
        rf.partition((10, 12), [1.0, 1.0, 1.0], cols=2)


def test_per_worker_links_charge_the_largest_band():
    unit = D.Unit("u", conv_unit("u"), (1.0, 1.0), out_channels=4)
    problem = D.Problem((unit,), (8, 10), in_channels=2, link=Link(0.01, 1000.0), shared_link=False, grids=False)
    two = D.block_cost(problem, 0, 1, workers=2)
    assert math.isclose(two.scatter_seconds, 5 * 10 * 2 * 4 / 1000)  # both bands of 5 rows at once
    assert math.isclose(two.gather_seconds, 4 * 10 * 4 * 4 / 1000)
    one = D.block_cost(problem, 0, 1, workers=1)  # one worker: the same as a shared link
    assert math.isclose(one.seconds, 0.01 + 0.64 + 1.0 + 1.28)
    rng = random.Random(7)
    shared = random_problem(rng, 6, 3)
    own = D.Problem(shared.units, shared.in_hw, shared.in_channels, shared.link, shared_link=False)
    assert D.dpfp(own).seconds <= D.dpfp(shared).seconds  # never dearer than sharing one link
    assert math.isclose(D.dpfp(own).seconds, exhaustive(own).seconds, rel_tol=1e-12)


@pytest.mark.parametrize(("seconds", "order", "rows"), [((1.0, 2.0), (0, 1), (6, 3)), ((2.0, 1.0), (1, 0), (6, 3)),
                                                        ((1.0, 1.0, 3.0), (0, 1, 2), (4, 4, 1))])
def test_rows_are_shared_by_speed_fastest_first(seconds, order, rows):
    unit = D.Unit("u", conv_unit("u", k=1), seconds, out_channels=1)
    problem = D.Problem((unit,), (9, 9), 1, Link(0.0, 1e12))
    cost = D.block_cost(problem, 0, 1, workers=len(seconds))
    assert cost.workers == order and cost.rows == rows


def test_compute_grows_with_the_halo_of_a_fused_block():
    units = tuple(D.Unit(f"u{i}", conv_unit(f"u{i}", k=5), (0.01,) * 4, 16) for i in range(4))
    problem = D.Problem(units, (40, 40), 3, Link(0.001, 1e8), grids=False)  # row bands: halos in rows
    fused = D.block_cost(problem, 0, 4, workers=4)
    assert sum(fused.input_rows) > 40  # the bands overlap by the halos
    assert fused.compute_seconds > 0.04 / 4 * 1.2  # each tile recomputes a growing margin
    per_layer = D.layer_by_layer(problem)
    assert all(sum(c.input_rows) <= 40 + 2 * 2 * 3 for c in per_layer.breakdown)  # one layer's halo only


def test_extreme_links_pick_the_expected_strategies():
    rng = random.Random(7)
    base = random_problem(rng, 6, 4)
    slow = D.Problem(base.units, base.in_hw, base.in_channels, Link(0.5, 1e3))
    plan = D.dpfp(slow)
    assert plan.blocks == ((0, 6),) and plan.workers == 1  # sending more than the input once never pays
    assert plan.seconds == D.single_worker(slow).seconds
    fast = D.Problem(base.units, base.in_hw, base.in_channels, Link(0.0, 1e18))
    plan = D.dpfp(fast)
    assert plan.workers == 4
    assert plan.seconds <= D.layer_by_layer(fast).seconds < D.single_worker(fast).seconds


def test_invalid_problems_and_blocks_are_refused():
    unit = D.Unit("u", conv_unit("u"), (1.0, 1.0), 4)
    problem = D.Problem((unit, D.Unit("v", conv_unit("v"), (1.0, 1.0), 4)), (8, 8), 3, Link(0.0, 1e6))
    with pytest.raises(InvalidInput):
        D.evaluate(problem, [(0, 1)])  # does not reach the end
    with pytest.raises(InvalidInput):
        D.evaluate(problem, [(0, 1), (0, 2)])
    with pytest.raises(InvalidInput):
        D.block_cost(problem, 0, 1, workers=3)
    with pytest.raises(InvalidInput):
        D.Problem((unit, D.Unit("v", conv_unit("v"), (1.0,), 4)), (8, 8), 3, Link(0.0, 1e6))


def test_problem_from_profiles_of_a_real_model():
    from runtime.models.registry import build_model, get_spec
    from runtime.models.slicing import SlicedModel
    from runtime.parallel.tiled import segment_geometry

    hw = (112, 96)
    sliced = SlicedModel(build_model(get_spec("resnet18")), torch.zeros(1, 3, *hw), "resnet18")
    last = next(sp.index for sp in sliced.split_points if sp.name == "avgpool") - 1  # the last tileable cut
    geometries = [segment_geometry(sliced, i, i + 1) for i in range(last)]
    profiles = []
    for machine, factor in (("fast", 1.0), ("slow", 2.5), ("mid", 1.5)):
        blocks = tuple(Block(index=i, name=sliced.split(i + 1).name, seconds=0.002 * factor * (1 + i % 3),
                             output_bytes=sliced.split(i + 1).fp32_bytes) for i in range(last))
        profiles.append(Profile(machine=machine, role="edge", model="resnet18", blocks=blocks, input_bytes=0))
    problem = D.problem_from_profiles(profiles, geometries, hw, 3, Link.from_mbps(2, 200))
    assert problem.n_units == last and problem.n_workers == 3 and problem.order == (0, 2, 1)
    for i in range(last):
        assert (problem.channels(i + 1), *problem.hw[i + 1]) == sliced.split(i + 1).out_shape[1:]
    started = time.perf_counter()
    plan = D.dpfp(problem)
    elapsed = time.perf_counter() - started
    print(f"dpfp over {last} resnet18 units, 3 workers: {elapsed:.2f} s; plan {plan.blocks} "
          f"{plan.seconds * 1e3:.1f} ms vs " + ", ".join(f"{k} {p.seconds * 1e3:.1f} ms"
                                                         for k, p in D.baselines(problem).items()))
    assert elapsed < 20
    assert all(plan.seconds <= p.seconds for p in D.baselines(problem).values())
    with pytest.raises(InvalidInput, match="measured at"):
        D.problem_from_profiles(profiles, geometries, (224, 224), 3, Link.from_mbps(2, 200))


def exhaustive_halo(problem: D.Problem) -> float:
    """Every set of block boundaries and every choice, at each, of gathering the map or keeping it on the
    workers (halo exchange into the next block); each block on its best shape for those choices."""
    L, inf = problem.n_units, float("inf")
    costs = {}  # (first, end) -> the block's costs over every (workers, grid) shape
    for end in range(1, L + 1):
        for n, cols in D._shapes(problem, end, None):
            for c in D._walk(problem, end, n, cols):
                costs.setdefault((c.first, end), []).append(c)
    best = inf
    for cuts in itertools.product((False, True), repeat=L - 1):
        ends = [i + 1 for i, cut in enumerate(cuts) if cut] + [L]
        blocks = list(zip([0, *ends[:-1]], ends, strict=True))
        for kept in itertools.product((False, True), repeat=len(blocks) - 1):
            modes = [False, *kept, False]  # the map at each block boundary: kept on the workers?
            total = 0.0
            for j, (f, e) in enumerate(blocks):
                total += min((c.variant(modes[j], modes[j + 1]).seconds for c in costs[(f, e)]
                              if not modes[j] or c.halo_option_seconds < inf), default=inf)
            best = min(best, total)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_dp_with_halo_exchange_equals_exhaustive_search(seed):
    rng = random.Random(100 + seed)
    base = random_problem(rng, rng.randint(1, 5), rng.randint(1, 3))
    problem = D.Problem(base.units, base.in_hw, base.in_channels, base.link, halo=True,
                        halo_round_seconds=rng.choice([0.0, 0.001, 0.01]),
                        coordinator_bytes_per_second=rng.choice([0.0, 3e8]), block_overhead_seconds=0.002)
    plan = D.dpfp(problem)
    assert math.isclose(plan.seconds, exhaustive_halo(problem), rel_tol=1e-12), (seed, plan.blocks)
    assert math.isclose(plan.seconds, sum(c.seconds for c in plan.breakdown), rel_tol=1e-12)
    gather_only = D.dpfp(D.Problem(base.units, base.in_hw, base.in_channels, base.link,
                                   coordinator_bytes_per_second=problem.coordinator_bytes_per_second,
                                   block_overhead_seconds=0.002))
    assert plan.seconds <= gather_only.seconds * (1 + 1e-12)  # the halo exchange is an option, never a cost
    b = plan.breakdown
    assert not b[0].halo_input and not b[-1].kept_output  # the coordinator scatters first and gathers last
    for prev, nxt in itertools.pairwise(b):
        assert prev.kept_output == nxt.halo_input  # a kept map is read only by halo exchange


def test_halo_exchange_is_chosen_when_bytes_are_dear_and_not_when_its_round_is():
    units = tuple(D.Unit(f"u{i}", conv_unit(f"u{i}"), (0.01, 0.01, 0.01, 0.01), 64) for i in range(4))
    slow = Link(0.001, 12.5e6)  # 100 Mbit/s: a 32x32x64 fp32 map takes 21 ms to move

    def plan(round_s: float) -> D.Plan:
        return D.dpfp(D.Problem(units, (32, 32), 64, slow, shared_link=False, halo=True, halo_round_seconds=round_s,
                                block_overhead_seconds=0.0))

    cheap = plan(0.0)
    assert any(c.halo_input for c in cheap.breakdown) or len(cheap.breakdown) == 1
    forced = D.evaluate(D.Problem(units, (32, 32), 64, slow, shared_link=False, halo=True), [(0, 2), (2, 4)], 4)
    first, second = forced.breakdown
    halo2 = second.variant(True, False)
    # the halo round fetches only the border rows/columns a tile lacks, not the whole crop
    assert halo2.halo_seconds < second.scatter_seconds and first.variant(False, True).gather_seconds == 0.0
    assert all(not c.halo_input for c in plan(10.0).breakdown)  # a 10 s fetch round: never
