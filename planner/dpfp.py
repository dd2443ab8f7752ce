"""DPFP: choose fused blocks of a CNN and spread each over parallel edge workers by spatial tiles.

Li, Iosifidis and Zhang (2022) cut a CNN's feature maps into spatial tiles with exact halos
(receptive-field segmentation, :mod:`runtime.parallel.receptive`) and run *fused blocks* of layers
on several workers in parallel; dynamic programming picks the block boundaries. This module is
that planner, as pure functions over a cost model.

The chain is a sequence of :class:`Unit` (the layers between two consecutive cut points: a profile
block, or one layer of a plain chain). A fused block runs units ``[first, end)``. Its predicted
latency, with ``n`` workers (the ``n`` fastest), each taking a tile of output in proportion to its
speed (full-width row bands, or a 2-D grid of ``c`` tiles per row where that cuts halos;
:func:`runtime.parallel.receptive.partition`)::

    RTT                                                  one request/response round per block
  + sum over workers of (input tile + halo) bytes / bandwidth     scatter, one shared link
  + max over workers of sum over units of seconds(worker, unit) x tile's compute fraction
  + sum over workers of output tile bytes / bandwidth              gather
  + (all input tile bytes + all output tile bytes) / coordinator bytes per second

With ``Problem.shared_link=False`` each worker has a link of its own (a switch port each, with the
coordinator's side not the bottleneck): scatter and gather take the largest tile's bytes instead of
the sum. The last term is the coordinator's own work per byte (cropping, encoding, decoding and
stitching every byte it sends and receives, on one process: measured by
``runtime.agent.parallel_calibrate``); 0 leaves it out. ``Problem.block_overhead_seconds``, measured
by the same calibration, is a fixed cost per block (scheduling, gRPC calls, stitching set-up).

The compute fraction is each layer's computed area (halo recomputation included, through the
receptive field of the rest of the block) over its full area, weighted by the layer's cost
(MACs per pixel for convolutions). With ``Problem.tile_factors`` (measured on real tiles by
``python -m runtime.tools.dpfp_tilecal``, read by :mod:`planner.dpfp_factors`) each unit's fraction
is multiplied by the unit's measured factor at that fraction: small tiles of small maps cost more
than their area share (1.2-1.5x a quarter on VGG-16's 14 px maps), large maps' tiles less. A plan's latency is the sum over its blocks: the map is gathered
at the coordinator between blocks.

Halo exchange between workers (``Problem.halo``): between two blocks, the first's tiles may stay
on the workers (no gather, no coordinator bytes for them) and the second's workers fetch only the
border of their input they do not hold from their neighbours, concurrently::

    RTT + halo_round_seconds + sum (shared link; or max, a link per worker) over workers of
    (input region - its own tile of the previous map) bytes / bandwidth

in place of that block's scatter and its coordinator bytes. The worker's own tile is priced as the
block's own layout on the previous map (exact when consecutive blocks use the same workers and grid,
as DPFP's usually do); ``halo_round_seconds`` is the fetch round's fixed cost (0: not costed). The DP
then carries, per boundary, whether the map there is gathered or kept on the workers; the stage's
last block is always gathered.

``dpfp`` minimises over all boundary sets and, per block, the number of workers, in O(L^2) block
evaluations (each walks its tiles back through the block once per end point). The baselines use the
same cost model: ``layer_by_layer`` (an exchange after every unit, MoDNN-like), ``fused_all`` (one
block for the whole chain, DeepThings FTP-like) and ``single_worker``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from planner.dpfp_factors import Points, TileFactors, factor_at
from runtime.contracts.costmodel import Link
from runtime.contracts.errors import InvalidInput
from runtime.contracts.profile import Profile
from runtime.parallel.receptive import Graph, Region, back_propagate, compute_fraction, partition


@dataclass(frozen=True)
class Unit:
    """One step of the chain: the layers between two consecutive cut points."""

    name: str
    geometry: Graph  # receptive geometry of the unit
    seconds: tuple[float, ...]  # untiled compute on each worker (full map)
    out_channels: int


@dataclass(frozen=True)
class Problem:
    """A chain of units, its input, the workers (via each unit's seconds) and the link."""

    units: tuple[Unit, ...]
    in_hw: tuple[int, int]
    in_channels: int
    link: Link
    bytes_per_element: int = 4  # fp32 raw maps
    shared_link: bool = True  # one link for all workers (bytes add up); False: one link per worker (the largest counts)
    coordinator_bytes_per_second: float = 0.0  # the coordinator's crop/encode/decode/stitch rate (0: not costed)
    block_overhead_seconds: float = 0.0  # the coordinator's fixed cost per fused block (0: not costed)
    grids: bool = True  # may a block be tiled as a 2-D grid (else row bands only)
    halo: bool = False  # may DPFP exchange halos between workers instead of gathering between blocks
    halo_round_seconds: float = 0.0  # fixed cost of a block's worker-to-worker fetch round (0: not costed)
    tile_factors: tuple[Points, ...] = ()  # per unit: measured (compute fraction, factor) curve; () or a unit's (): area only
    hw: tuple[tuple[int, int], ...] = field(init=False, repr=False)  # map size at each boundary 0..L
    order: tuple[int, ...] = field(init=False, repr=False)  # workers, fastest first
    speed: tuple[float, ...] = field(init=False, repr=False)  # 1 / total seconds (relative)

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", tuple(self.units))
        if not self.units:
            raise InvalidInput("a DPFP problem needs at least one unit")
        k = len(self.units[0].seconds)
        if k < 1 or any(len(u.seconds) != k for u in self.units):
            raise InvalidInput("every unit needs a compute time for each of the same workers")
        if any(s < 0 for u in self.units for s in u.seconds):
            raise InvalidInput("compute times must be >= 0")
        if self.tile_factors and len(self.tile_factors) != len(self.units):
            raise InvalidInput(f"{len(self.tile_factors)} tile-factor curves for {len(self.units)} units")
        if not (self.coordinator_bytes_per_second >= 0 and self.block_overhead_seconds >= 0
                and self.halo_round_seconds >= 0):
            raise InvalidInput(f"coordinator_bytes_per_second, block_overhead_seconds and halo_round_seconds must be "
                               f">= 0, got {self.coordinator_bytes_per_second}, {self.block_overhead_seconds}, "
                               f"{self.halo_round_seconds}")
        hw = [(int(self.in_hw[0]), int(self.in_hw[1]))]
        for u in self.units:
            try:
                hw.append(u.geometry.out_size(hw[-1]))
            except ValueError as e:
                raise InvalidInput(f"unit {u.name}: {e}") from None
        totals = [sum(u.seconds[w] for u in self.units) for w in range(k)]
        speed = tuple(1.0 / t if t > 0 else 1.0 for t in totals) if all(t > 0 for t in totals) else (1.0,) * k
        object.__setattr__(self, "hw", tuple(hw))
        object.__setattr__(self, "order", tuple(sorted(range(k), key=lambda w: (totals[w], w))))
        object.__setattr__(self, "speed", speed)

    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def n_workers(self) -> int:
        return len(self.order)

    def channels(self, boundary: int) -> int:
        """Channels of the map at boundary ``boundary`` (0: the chain input)."""
        return self.in_channels if boundary == 0 else self.units[boundary - 1].out_channels

    def tile_compute(self, unit: int, fraction: float) -> float:
        """A tile's share of unit ``unit``'s untiled compute: its compute fraction times the measured
        factor at that fraction (1 where none was measured)."""
        return fraction * (factor_at(self.tile_factors[unit], fraction) if self.tile_factors else 1.0)

    def map_bytes(self, boundary: int, rows: int, cols: int) -> int:
        return rows * cols * self.channels(boundary) * self.bytes_per_element


@dataclass(frozen=True)
class BlockCost:
    """Predicted cost of one fused block ``[first, end)`` on ``workers``."""

    first: int
    end: int
    workers: tuple[int, ...]  # worker indices (into Unit.seconds), fastest first
    rows: tuple[int, ...]  # output rows each worker computes
    input_rows: tuple[int, ...]  # block input rows each worker receives, halo included
    rtt_seconds: float
    scatter_seconds: float
    compute_seconds: float  # the slowest worker's
    gather_seconds: float
    cols: int = 1  # tiles per row of a 2-D grid (1: full-width row bands)
    tile_pixels: tuple[int, ...] = ()  # output pixels each worker computes (same order as workers)
    coordinator_seconds: float = 0.0  # the coordinator's per-byte work on everything sent and received
    halo_seconds: float = 0.0  # the halo fetch round, when the input comes by halo exchange
    halo_input: bool = False  # the input comes from the previous block's tiles kept on the workers
    kept_output: bool = False  # the output stays on the workers for the next block's halo exchange
    # the alternatives the DP chooses between (the gather-and-scatter figures are the fields above)
    halo_option_seconds: float = float("inf")  # halo fetch round instead of the scatter (inf: not possible)
    coordinator_in_seconds: float = 0.0  # the coordinator's per-byte work on the crops sent (part of coordinator_seconds)
    coordinator_out_seconds: float = 0.0  # ... on the tiles received (part of coordinator_seconds)

    @property
    def seconds(self) -> float:
        return (self.rtt_seconds + self.scatter_seconds + self.compute_seconds + self.gather_seconds
                + self.coordinator_seconds + self.halo_seconds)

    def variant(self, halo_input: bool, kept_output: bool) -> BlockCost:
        """This block with its input by halo exchange and/or its output kept on the workers."""
        if not (halo_input or kept_output):
            return self
        return replace(self, halo_input=halo_input, kept_output=kept_output,
                       scatter_seconds=0.0 if halo_input else self.scatter_seconds,
                       halo_seconds=self.halo_option_seconds if halo_input else 0.0,
                       gather_seconds=0.0 if kept_output else self.gather_seconds,
                       coordinator_seconds=self.coordinator_seconds - (self.coordinator_in_seconds if halo_input else 0.0)
                       - (self.coordinator_out_seconds if kept_output else 0.0))


@dataclass(frozen=True)
class Plan:
    strategy: str  # dpfp | layer_by_layer | fused_all | single_worker | evaluate
    blocks: tuple[tuple[int, int], ...]  # (first unit, end unit exclusive)
    workers: int  # the most workers any block uses
    shares: tuple[tuple[int, ...], ...]  # per block: output rows per worker (fastest first; a grid's tile heights)
    seconds: float  # predicted latency
    breakdown: tuple[BlockCost, ...]


def _layout(problem: Problem, end: int, n: int, cols: int) -> tuple[tuple[int, ...], tuple[Region, ...]]:
    """The ``n`` fastest workers (fastest first) and each one's output tile. Tiles are laid out in
    worker-index order, as the coordinator lays out a stage's workers (``partition``)."""
    workers = problem.order[:n]
    by_index = sorted(workers)
    tiles = partition(problem.hw[end], [problem.speed[w] for w in by_index], cols)
    tile_of = dict(zip(by_index, tiles, strict=True))
    return workers, tuple(tile_of[w] for w in workers)


def _own_tiles(problem: Problem, first: int, workers: tuple[int, ...], cols: int) -> tuple[Region, ...] | None:
    """Each worker's tile of the map at boundary ``first`` under the same layout (None: it does not fit)."""
    by_index = sorted(workers)
    try:
        tiles = partition(problem.hw[first], [problem.speed[w] for w in by_index], cols)
    except ValueError:
        return None
    tile_of = dict(zip(by_index, tiles, strict=True))
    return tuple(tile_of[w] for w in workers)


def _halo_option(problem: Problem, first: int, workers: tuple[int, ...], cols: int, regions: Sequence[Region],
                 total: Callable[[Sequence[float]], float]) -> float:
    """The halo fetch round of a block starting at ``first`` whose input regions are ``regions``."""
    if first == 0 or not problem.halo:
        return float("inf")
    own = _own_tiles(problem, first, workers, cols)
    if own is None:
        return float("inf")
    fetched: list[float] = []
    for r, o in zip(regions, own, strict=True):
        rows = max(0, min(r.rows.stop, o.rows.stop) - max(r.rows.start, o.rows.start))
        cs = max(0, min(r.cols.stop, o.cols.stop) - max(r.cols.start, o.cols.start))
        fetched.append((r.area - rows * cs) * problem.channels(first) * problem.bytes_per_element)
    return (problem.link.rtt_seconds + problem.halo_round_seconds
            + total(fetched) / problem.link.bandwidth_bytes_per_second)


def _walk(problem: Problem, end: int, n: int, cols: int = 1) -> Iterator[BlockCost]:
    """Costs of blocks ``[first, end)`` on the ``n`` fastest workers (``cols`` tiles per grid row),
    for first = end-1 down to 0: each tile is walked back through the units once, accumulating
    compute and halo."""
    workers, regions_out = _layout(problem, end, n, cols)
    regions = list(regions_out)
    compute = [0.0] * n
    bw = problem.link.bandwidth_bytes_per_second
    total: Callable[[Sequence[float]], float] = sum if problem.shared_link else max
    out_bytes = [problem.map_bytes(end, r.rows.size, r.cols.size) for r in regions_out]
    gather = total(out_bytes) / bw
    cbps = problem.coordinator_bytes_per_second
    for first in range(end - 1, -1, -1):
        unit = problem.units[first]
        for i, w in enumerate(workers):
            tr = back_propagate(unit.geometry, problem.hw[first], regions[i])
            compute[i] += unit.seconds[w] * problem.tile_compute(first, compute_fraction(unit.geometry, tr))
            regions[i] = tr.input
        in_bytes = [problem.map_bytes(first, r.rows.size, r.cols.size) for r in regions]
        c_in = sum(in_bytes) / cbps if cbps > 0 else 0.0
        c_out = sum(out_bytes) / cbps if cbps > 0 else 0.0
        yield BlockCost(first, end, workers, tuple(b.rows.size for b in regions_out), tuple(r.rows.size for r in regions),
                        problem.link.rtt_seconds, total(in_bytes) / bw, max(compute), gather, cols,
                        tuple(b.area for b in regions_out), problem.block_overhead_seconds + c_in + c_out,
                        halo_option_seconds=_halo_option(problem, first, workers, cols, regions, total),
                        coordinator_in_seconds=c_in, coordinator_out_seconds=c_out)


def _worker_counts(problem: Problem, end: int, workers: int | None) -> range:
    most = min(problem.n_workers, problem.hw[end][0])  # a worker needs at least one output row
    if workers is not None:
        if not 1 <= workers <= problem.n_workers:
            raise InvalidInput(f"workers must be 1..{problem.n_workers}, got {workers}")
        return range(min(workers, most), min(workers, most) + 1)
    return range(1, most + 1)


def _shapes(problem: Problem, end: int, workers: int | None) -> Iterator[tuple[int, int]]:
    """(worker count, tiles per grid row) a block ending at ``end`` may use: row bands, and with
    ``problem.grids`` every grid of whole rows whose tiles are at least one pixel."""
    h, w = problem.hw[end]
    for n in _worker_counts(problem, end, workers):
        yield n, 1
        if problem.grids:
            for c in range(2, n + 1):
                if n % c == 0 and c <= w and n // c <= h:
                    yield n, c


def block_cost(problem: Problem, first: int, end: int, workers: int | None = None) -> BlockCost:
    """The cheapest way to run units ``[first, end)`` as one fused block (on ``workers`` workers, or
    on the best number of them)."""
    if not 0 <= first < end <= problem.n_units:
        raise InvalidInput(f"a block runs units first..end-1 with 0 <= first < end <= {problem.n_units}, "
                           f"got [{first}, {end})")
    best = None
    for n, cols in _shapes(problem, end, workers):
        cost = next(c for c in _walk(problem, end, n, cols) if c.first == first)
        if best is None or cost.seconds < best.seconds:
            best = cost
    assert best is not None
    return best


def _plan(strategy: str, costs: Sequence[BlockCost]) -> Plan:
    return Plan(strategy=strategy, blocks=tuple((c.first, c.end) for c in costs),
                workers=max(len(c.workers) for c in costs), shares=tuple(c.rows for c in costs),
                seconds=sum(c.seconds for c in costs), breakdown=tuple(costs))


def evaluate(problem: Problem, blocks: Sequence[tuple[int, int]], workers: int | None = None,
             strategy: str = "evaluate") -> Plan:
    """The predicted latency of given fused blocks (they must tile ``[0, L)`` in order)."""
    at = 0
    for first, end in blocks:
        if first != at or end <= first:
            raise InvalidInput(f"blocks must run 0..{problem.n_units} in order without gaps, got {list(blocks)}")
        at = end
    if at != problem.n_units:
        raise InvalidInput(f"blocks end at unit {at}, the chain has {problem.n_units}")
    return _plan(strategy, [block_cost(problem, f, e, workers) for f, e in blocks])


def dpfp(problem: Problem, max_workers: int | None = None) -> Plan:
    """Fused-block boundaries and per-block worker counts of least predicted latency.

    ``best[end] = min over first < end, n <= max_workers of best[first] + cost(first, end, n)``; with
    ``problem.halo``, per boundary and per state of the map there (gathered, or kept on the workers)."""
    k = problem.n_workers if max_workers is None else max(1, min(max_workers, problem.n_workers))
    L = problem.n_units
    modes = (False, True) if problem.halo else (False,)  # is the map at a boundary kept on the workers?
    best = {(0, False): 0.0}
    choice: dict[tuple[int, bool], BlockCost] = {}
    for end in range(1, L + 1):
        for n, cols in _shapes(problem, end, None):
            if n > k:
                break
            for cost in _walk(problem, end, n, cols):
                for kept_in in modes:
                    before = best.get((cost.first, kept_in))
                    if before is None or (kept_in and cost.halo_option_seconds == float("inf")):
                        continue
                    for kept_out in modes if end < L else (False,):
                        c = cost.variant(kept_in, kept_out)
                        if before + c.seconds < best.get((end, kept_out), float("inf")):
                            best[(end, kept_out)], choice[(end, kept_out)] = before + c.seconds, c
    costs: list[BlockCost] = []
    at = (L, False)
    while at[0] > 0:
        c = choice[at]
        costs.append(c)
        at = (c.first, c.halo_input)
    return _plan("dpfp", costs[::-1])


def layer_by_layer(problem: Problem, workers: int | None = None) -> Plan:
    """Every unit its own block on all (or ``workers``) workers: an exchange after every unit (MoDNN-like)."""
    n = problem.n_workers if workers is None else workers
    return evaluate(problem, [(u, u + 1) for u in range(problem.n_units)], n, "layer_by_layer")


def fused_all(problem: Problem, workers: int | None = None) -> Plan:
    """The whole chain as one fused block on all (or ``workers``) workers (DeepThings FTP-like)."""
    n = problem.n_workers if workers is None else workers
    return evaluate(problem, [(0, problem.n_units)], n, "fused_all")


def single_worker(problem: Problem) -> Plan:
    """The whole chain on the fastest worker: one transfer in, one out."""
    return evaluate(problem, [(0, problem.n_units)], 1, "single_worker")


def baselines(problem: Problem) -> dict[str, Plan]:
    return {"layer_by_layer": layer_by_layer(problem), "fused_all": fused_all(problem),
            "single_worker": single_worker(problem)}


def problem_from_profiles(profiles: Sequence[Profile], geometries: Sequence[Graph], in_hw: tuple[int, int],
                          in_channels: int, link: Link, first_block: int = 0, shared_link: bool = True,
                          coordinator_bytes_per_second: float = 0.0, grids: bool = True,
                          bytes_per_element: int = 4, block_overhead_seconds: float = 0.0,
                          tile_factors: TileFactors | None = None, halo: bool = False,
                          halo_round_seconds: float = 0.0) -> Problem:
    """A problem from one profile per worker (same model) and the receptive geometry of each of
    its blocks from ``first_block`` on (``runtime.parallel.tiled.segment_geometry(sliced, i, i+1)``);
    ``tile_factors``: measured tile-compute factors by unit name (``planner.dpfp_factors``; None: by area).
    Output channels come from each block's fp32 ``output_bytes`` and the geometry's map size, so
    ``in_hw`` must be the input size the profiles were measured at."""
    if not profiles:
        raise InvalidInput("DPFP needs at least one worker profile")
    if len({p.model for p in profiles}) != 1:
        raise InvalidInput(f"worker profiles are for different models: {sorted({p.model for p in profiles})}")
    end = first_block + len(geometries)
    if first_block < 0 or any(p.n_blocks < end for p in profiles):
        raise InvalidInput(f"blocks {first_block}..{end - 1} are not in every worker's profile")
    units, hw = [], (int(in_hw[0]), int(in_hw[1]))
    for i, geometry in enumerate(geometries):
        blocks = [p.blocks[first_block + i] for p in profiles]
        try:
            hw = geometry.out_size(hw)
        except ValueError as e:
            raise InvalidInput(f"block {first_block + i}: {e}") from None
        channels, rest = divmod(blocks[0].output_bytes, 4 * hw[0] * hw[1])
        if rest or channels < 1:
            raise InvalidInput(f"block {first_block + i} ({blocks[0].name}): {blocks[0].output_bytes} output bytes "
                               f"are not fp32 x C x {hw[0]} x {hw[1]}; was the profile measured at {in_hw}?")
        units.append(Unit(blocks[0].name, geometry, tuple(b.seconds for b in blocks), channels))
    curves = tuple(tile_factors.points(u.name) for u in units) if tile_factors is not None else ()
    return Problem(tuple(units), in_hw, in_channels, link, bytes_per_element, shared_link=shared_link,
                   coordinator_bytes_per_second=coordinator_bytes_per_second, grids=grids,
                   block_overhead_seconds=block_overhead_seconds, tile_factors=curves, halo=halo,
                   halo_round_seconds=halo_round_seconds)
