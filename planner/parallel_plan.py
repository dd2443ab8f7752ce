"""Propose a parallel plan stage (RFS/DPFP) from several edge workers' profiles of a bundled model.

The per-block receptive geometry comes from the model itself
(:func:`runtime.parallel.tiled.segment_geometry` on each block between consecutive split points),
the compute times from the profiles (one per worker, measured with ``edgesplit profile``), and the
coordinator <-> workers link from the caller. :func:`propose` returns DPFP's plan, the baselines
from the same cost model, and DPFP's plan as a :class:`runtime.parallel.plan.ParallelStage` that
``edgesplit agent --parallel-plan`` runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from planner import dpfp as D
from planner.dpfp_factors import TileFactors
from runtime.contracts.costmodel import Link
from runtime.contracts.errors import InvalidInput
from runtime.contracts.profile import Profile
from runtime.parallel.plan import ParallelStage, TiledBlock
from runtime.parallel.receptive import Graph

BYTES_PER_ELEMENT = {"raw": 4, "fp16": 2, "int8": 1}
"""Bytes per map element on the wire by codec (lz4 on top: not counted, its ratio depends on the data)."""


@dataclass(frozen=True)
class Proposal:
    problem: D.Problem
    first_split: int  # split index where the chain of units begins
    split_names: tuple[str, ...]  # names of the split points first_split .. first_split + units
    plans: dict[str, D.Plan]  # dpfp and the baselines
    stage: ParallelStage  # dpfp's plan, runnable


def stage_from_plan(plan: D.Plan, problem: D.Problem, names: Sequence[str], workers: Sequence[str], codec: str,
                    model: str) -> ParallelStage:
    """A runnable stage: each block's shares in the stage's worker order (0 for workers it leaves out):
    output rows for row bands, output pixels for a grid (``receptive.partition`` gives the same tiles back)."""
    blocks = []
    for cost in plan.breakdown:
        shares = [0.0] * problem.n_workers
        for w, rows, pixels in zip(cost.workers, cost.rows, cost.tile_pixels, strict=True):
            shares[w] = float(rows if cost.cols == 1 else pixels)
        blocks.append(TiledBlock(names[cost.first], names[cost.end], tuple(shares), cost.seconds, cost.cols,
                                 halo=cost.halo_input))
    return ParallelStage(tuple(workers), tuple(blocks), codec, model, plan.seconds, plan.strategy)


@dataclass(frozen=True)
class Geometry:
    """The receptive geometry of a model's tileable range: all DPFP needs from the model itself."""

    model: str
    first: int  # split index where the range begins
    geometries: tuple[Graph, ...]  # receptive Graph of each block first .. end-1
    in_hw: tuple[int, int]  # map size at ``first``
    in_channels: int
    names: tuple[str, ...]  # split names first .. end


def geometry(model: str, first: str | int = 0, end: str | int | None = None) -> Geometry:
    """Load ``model`` (torch; the caller keeps only the result) and take the geometry of blocks
    ``first .. end`` (default: from the input to the last tileable split)."""
    from runtime.models.loader import load_model
    from runtime.parallel.tiled import segment_geometry, tileable_end

    loaded = load_model(model)
    sliced = loaded.sliced
    a = loaded.split(first).index
    b = tileable_end(sliced, a) if end is None else loaded.split(end).index
    if b <= a:
        raise InvalidInput(f"the parallel range {first}..{end} is empty")
    geometries = tuple(segment_geometry(sliced, i, i + 1) for i in range(a, b))  # InvalidInput: not tileable
    shape = sliced.split(a).out_shape
    if len(shape) != 4:
        raise InvalidInput(f"split {sliced.split(a).name} is not a feature map ({list(shape)})")
    return Geometry(loaded.name, a, geometries, (int(shape[2]), int(shape[3])), int(shape[1]),
                    tuple(sliced.split(i).name for i in range(a, b + 1)))


def propose(profiles: Sequence[Profile], link: Link, first: str | int = 0, end: str | int | None = None,
            workers: Sequence[str] | None = None, codec: str = "raw", shared_link: bool = True,
            coordinator_bytes_per_second: float = 0.0, grids: bool = True, geom: Geometry | None = None,
            block_overhead_seconds: float = 0.0, tile_factors: TileFactors | None = None, halo: bool = False,
            halo_round_seconds: float = 0.0) -> Proposal:
    """DPFP and the baselines over blocks ``first .. end`` (split points; default: from the input to
    the last tileable split) of the profiles' model, on one worker per profile. ``shared_link``: the
    workers share one link to the coordinator (True) or each has its own (False);
    ``coordinator_bytes_per_second``: the coordinator's measured per-byte rate (0: not costed);
    ``grids``: may blocks be tiled as 2-D grids; ``geom``: the model's geometry, if already taken;
    ``block_overhead_seconds``: the coordinator's measured fixed cost per block (0: not costed);
    ``tile_factors``: tile-compute factors measured on real tiles (``planner.dpfp_factors``; None: by area);
    ``halo``: may DPFP exchange halos between workers instead of gathering between blocks, each fetch
    round costing ``halo_round_seconds`` besides its RTT and bytes."""
    if not profiles:
        raise InvalidInput("give at least one edge worker profile (--profile FILE, role edge)")
    model = profiles[0].model
    g = geom if geom is not None else geometry(model, first, end)
    if g.model != model:
        raise InvalidInput(f"the geometry is of {g.model}, the profiles of {model}")
    problem = D.problem_from_profiles(profiles, g.geometries, g.in_hw, g.in_channels, link, first_block=g.first,
                                      shared_link=shared_link, coordinator_bytes_per_second=coordinator_bytes_per_second,
                                      grids=grids, bytes_per_element=BYTES_PER_ELEMENT.get(codec.split("+")[0], 4),
                                      block_overhead_seconds=block_overhead_seconds, tile_factors=tile_factors,
                                      halo=halo, halo_round_seconds=halo_round_seconds)
    plans = {"dpfp": D.dpfp(problem), **D.baselines(problem)}
    names_of_workers = tuple(workers) if workers else tuple(p.machine for p in profiles)
    if len(names_of_workers) != len(profiles):
        raise InvalidInput(f"{len(names_of_workers)} worker names for {len(profiles)} profiles")
    stage = stage_from_plan(plans["dpfp"], problem, g.names, names_of_workers, codec, model)
    return Proposal(problem, g.first, g.names, plans, stage)


def report(p: Proposal) -> list[str]:
    """Human-readable lines: each strategy's predicted latency, blocks and gain over one worker."""
    single = p.plans["single_worker"].seconds
    lines = [f"{p.stage.model}: parallel range {p.split_names[0]}..{p.split_names[-1]} ({p.problem.n_units} blocks), "
             f"{p.problem.n_workers} workers, link RTT {p.problem.link.rtt_seconds * 1e3:g} ms, "
             f"{p.problem.link.bandwidth_bytes_per_second * 8 / 1e6:g} Mbit/s "
             f"({'one link shared by the workers' if p.problem.shared_link else 'a link per worker'})",
             f"{'strategy':<16} {'predicted s':>11} {'reduction':>9} {'speedup':>8} {'workers':>7}  fused blocks"]
    for name, plan in p.plans.items():
        blocks = " | ".join(f"{p.split_names[c.first]}..{p.split_names[c.end]}"
                            + (f" ({len(c.workers) // c.cols}x{c.cols} grid)" if c.cols > 1 else "")
                            + (" (halo in)" if c.halo_input else "") for c in plan.breakdown)
        red = 100 * (1 - plan.seconds / single) if single > 0 else 0.0
        speed = single / plan.seconds if plan.seconds > 0 else 0.0
        lines.append(f"{name:<16} {plan.seconds:>11.4f} {red:>8.1f}% {speed:>7.2f}x {plan.workers:>7}  {blocks}")
    return lines
