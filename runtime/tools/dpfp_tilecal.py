"""Tile-compute factors by map size, measured from real tiles, for the DPFP cost model (issue 13).

    python -m runtime.tools.dpfp_tilecal --model vgg16 --out FACTORS.json [--runs 7] [--threads 1]

The DPFP cost model (``planner.dpfp``) prices a tile of a unit (the layers between two consecutive
split points) as the unit's profiled time times the share of the unit's work the tile does
(:func:`runtime.parallel.receptive.compute_fraction`: its computed area, halo included). Small tiles
of small maps run less efficiently per pixel than the whole map (measured on VGG-16: a quarter of a
28 or 14 px block took 1.4-1.9x a quarter of the block), so this measures, for every unit of the
tileable range, the tile over its area share::

    factor(unit, tile) = seconds(tile) / (seconds(whole map) x compute_fraction(tile))

on tiles of the shapes the DP considers (full-width row bands of 1/2, 1/4, 1/8 of the rows and grid
tiles of 1/2 x 1/2, 1/4 x 1/2, 1/4 x 1/4 of the map), each the median of ``--runs`` timed runs of
:meth:`runtime.parallel.tiled.TiledSegment.run_tile` after one warm-up, in this process (a timed run
repeats the call for at least 50 ms and takes the mean: see ``MIN_SECONDS``). A factor the planner
would refuse (``planner.dpfp_factors``: below 0.05, or a tile over 20x the whole map's time: a stall of
the machine during a timed run) is timed again, up to ``MAX_RETIMES`` times (a unit's ``retimed`` says
how often); one still out of range fails the tool (exit 3) and no file is written. Run it
where the workers run (``dpfp_bench`` runs it inside a worker's CPU quota) with the workers'
``--torch-threads``; glibc's allocator is set as the workers' daemons set it
(``runtime.wire.eventloop.tune_malloc``; ``EDGESPLIT_MALLOC=default`` leaves glibc's defaults). ``edgesplit plan --parallel --parallel-tile-factors FACTORS.json`` uses it for
DPFP and every baseline. The file records the sample count (runs) of every figure and when it was
measured.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from runtime.models.loader import LoadedModel
    from runtime.parallel.receptive import Region
    from runtime.tools.cpuquota import QuotaSet

FORMAT = "edgesplit-tile-factors"
VERSION = 1
SHAPES = ((1, 1), (2, 1), (4, 1), (8, 1), (2, 2), (4, 2), (4, 4))
"""(row parts, column parts) of the sampled tiles: the whole map, row bands, grid tiles."""


MIN_SECONDS = 0.05
"""Each timed run repeats the call until this much wall time has passed (in a 10 ms CPU-quota period a
short call is either free or throttled; several periods average that out) and takes the mean."""


MIN_FACTOR = 0.05
MAX_TILE_OVER_WHOLE = 20.0
"""The range ``planner.dpfp_factors`` takes (its MIN_FACTOR and MAX_TILE_OVER_WHOLE; the runtime may not
import the planner, so tests/test_dpfp_factors.py checks that the two agree): the tool writes no file it
would refuse."""
MAX_RETIMES = 4
"""A unit's out-of-range figures are timed again this many times at most (a stall of the machine during
one timed run inflates it); still out of range, the tool fails and writes nothing."""


class CalibrationError(Exception):
    """A figure stayed out of the planner's range after :data:`MAX_RETIMES` re-timings."""


def _median_seconds(fn: Callable[[], object], runs: int, min_seconds: float = MIN_SECONDS) -> float:
    fn()  # warm-up
    times: list[float] = []
    for _ in range(runs):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                break
        times.append(elapsed / n)
    return statistics.median(times)


def _tile(out_hw: tuple[int, int], parts: tuple[int, int]) -> Region | None:
    """The top-left tile of ``parts`` (rows, cols) of the map, or None if a side would be empty.
    An inner tile would have halos on all sides; the top-left one has the border's zero padding on
    two: both occur in a stage, and the tiles of 2 and 4 workers the DP plans always touch a border."""
    from runtime.parallel.receptive import Region

    rows, cols = out_hw[0] // parts[0], out_hw[1] // parts[1]
    if rows < 1 or cols < 1:
        return None
    return Region.of(0, rows, 0, cols)


def _crop(x: torch.Tensor, r: Region) -> torch.Tensor:
    return x[..., r.rows.start: r.rows.stop, r.cols.start: r.cols.stop].contiguous()


@dataclass(eq=False)
class _Tile:
    rows: int
    cols: int
    fraction: float
    fn: Callable[[], object]
    seconds: float


def _factor(seconds: float, full: float, fraction: float) -> float:
    return seconds / (full * fraction) if full > 0 and fraction > 0 else 1.0


def in_range(fraction: float, factor: float) -> bool:
    """Whether the planner takes a sample (``planner.dpfp_factors``'s check, with the limits above)."""
    return 0 < fraction <= 1.0 and factor >= MIN_FACTOR and factor * fraction <= MAX_TILE_OVER_WHOLE


def _settle(name: str, whole: Callable[[], object], full: float, tiles: list[_Tile], runs: int) -> tuple[float, int]:
    """Re-time a unit's figures whose factor the planner would refuse, :data:`MAX_RETIMES` times at most:
    the whole map when a factor is too small (the whole map's time was inflated, a stall), a tile when it
    took over :data:`MAX_TILE_OVER_WHOLE` x the whole map (the tile's time was). A re-timing replaces the
    figure by a new median of ``runs``. Returns the whole map's time and the re-timings done; raises
    :class:`CalibrationError` when a figure is still out of range."""
    for retimes in range(MAX_RETIMES + 1):
        bad = [t for t in tiles if not in_range(t.fraction, _factor(t.seconds, full, t.fraction))]
        if not bad:
            return full, retimes
        if retimes == MAX_RETIMES:
            t = bad[0]
            raise CalibrationError(
                f"unit {name}: tile {t.rows}x{t.cols} has factor {_factor(t.seconds, full, t.fraction):.3g} "
                f"(tile {t.seconds * 1e3:.3g} ms, whole map {full * 1e3:.3g} ms, fraction {t.fraction:.3g}) after "
                f"{MAX_RETIMES} re-timings, out of the planner's range (factor >= {MIN_FACTOR}, tile <= "
                f"{MAX_TILE_OVER_WHOLE:g}x the whole map): the machine was too busy to time it; run it again when "
                f"it is quieter or with more --runs")
        if any(_factor(t.seconds, full, t.fraction) < MIN_FACTOR for t in bad):
            full = _median_seconds(whole, runs)
        for t in bad:  # still over the limit against the whole map's time (re-timed or not): the tile's
            if t.seconds > MAX_TILE_OVER_WHOLE * full:
                t.seconds = _median_seconds(t.fn, runs)
    raise AssertionError("unreachable: the last round returns or raises")


def measure_unit(loaded: LoadedModel, index: int, x: torch.Tensor, runs: int) -> dict[str, Any]:
    """One unit (split ``index`` .. ``index + 1``) on its input map ``x``: the whole map and each shape;
    every factor in the planner's range (:func:`_settle`), or :class:`CalibrationError`."""
    from runtime.parallel.receptive import Region, compute_fraction
    from runtime.parallel.tiled import TiledSegment

    seg = TiledSegment(loaded.sliced, index, index + 1)
    in_hw = (int(x.shape[-2]), int(x.shape[-1]))
    out_hw = seg.out_size(in_hw)
    whole_reg = seg.regions(in_hw, [Region.full(*out_hw)])[0]
    x_whole = _crop(x, whole_reg.input)  # a strided window may leave the last rows or columns unread

    def whole() -> object:
        return seg.run_tile(x_whole, whole_reg)

    full = _median_seconds(whole, runs)
    tiles: list[_Tile] = []
    seen: set[tuple[int, int]] = set()
    for parts in SHAPES[1:]:
        tile = _tile(out_hw, parts)
        if tile is None or tile.shape in seen:
            continue
        seen.add(tile.shape)
        reg = seg.regions(in_hw, [tile])[0]
        fn = functools.partial(seg.run_tile, _crop(x, reg.input), reg)
        tiles.append(_Tile(tile.shape[0], tile.shape[1], compute_fraction(seg.geometry, reg), fn,
                           _median_seconds(fn, runs)))
    name = loaded.split(index + 1).name
    full, retimes = _settle(name, whole, full, tiles, runs)
    samples = [{"rows": t.rows, "cols": t.cols, "fraction": t.fraction, "seconds": t.seconds,
                "factor": _factor(t.seconds, full, t.fraction)} for t in tiles]
    return {"name": name, "start": loaded.split(index).name, "out_hw": list(out_hw),
            "full_seconds": full, "retimed": retimes, "samples": samples}


def calibrate(model: str, runs: int, first: str = "input", end: str = "") -> dict[str, Any]:
    """Factors of every unit from split ``first`` to ``end`` (default: the last tileable split)."""
    import torch

    from runtime.models.loader import load_model
    from runtime.parallel.tiled import tileable_end

    loaded = load_model(model)
    a = loaded.split(first).index
    b = loaded.split(end).index if end else tileable_end(loaded.sliced, a)
    units: list[dict[str, Any]] = []
    with torch.inference_mode():
        x = loaded.head(a)(torch.randn(loaded.input_shape, generator=torch.Generator().manual_seed(0)))
        for i in range(a, b):
            units.append(measure_unit(loaded, i, x, runs))
            x = loaded.segment(i, i + 1)(x)
    return {"format": FORMAT, "version": VERSION, "model": loaded.name, "runs": runs,
            "threads": torch.get_num_threads(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "input_hw": list(loaded.input_shape[-2:]), "units": units}


def in_quota(quotas: QuotaSet, share: float, model: str, out: Path, runs: int = 7, timeout: float = 900,
             period_us: int = 10_000) -> dict[str, Any]:
    """This tool as a process of its own inside a new CPU quota of ``share`` cores (one torch thread,
    as dpfp_bench's workers) from ``quotas`` (``runtime.tools.cpuquota.QuotaSet``); the file it wrote."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "runtime.tools.dpfp_tilecal", "--model", model, "--out", str(out),
                             "--runs", str(runs), "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    quotas.new(share, period_us).add(proc.pid)
    so, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"dpfp_tilecal failed: {err.decode()[-2000:]}")
    print(so.decode().rstrip().splitlines()[-1], file=sys.stderr)
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.tools.dpfp_tilecal", description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="bundled model (at its input size, as the profiles)")
    p.add_argument("--out", required=True, help="factors file to write (JSON)")
    p.add_argument("--runs", type=int, default=7, help="timed runs per unit and tile shape (the median is kept)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (as the workers' --torch-threads)")
    p.add_argument("--first", default="input", help="split where the range begins")
    p.add_argument("--end", default="", help="split where it ends (default: the last tileable one)")
    args = p.parse_args(argv)
    if not (1 <= args.runs <= 1000 and 1 <= args.threads <= 256):
        p.error("--runs must be 1..1000 and --threads 1..256")
    import torch

    from runtime.wire.eventloop import tune_malloc

    tune_malloc()  # the workers' daemons run with it (eventloop.run)
    torch.set_num_threads(args.threads)
    from runtime.contracts.errors import EdgesplitError

    t0 = time.perf_counter()
    try:
        res = calibrate(args.model, args.runs, args.first, args.end)
    except EdgesplitError as e:  # unknown model or split, a range that cannot be tiled
        print(f"dpfp_tilecal: {e}", file=sys.stderr)
        return 2
    except CalibrationError as e:  # a figure the planner would refuse, still after re-timing it: no file
        print(f"dpfp_tilecal: {e}", file=sys.stderr)
        return 3
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    for u in res["units"]:
        shown = " ".join(f"{s['rows']}x{s['cols']}:{s['factor']:.2f}" for s in u["samples"])
        print(f"{u['name']:<14} {u['out_hw'][0]:>4}x{u['out_hw'][1]:<4} whole {u['full_seconds'] * 1e3:7.2f} ms  {shown}")
    print(f"{len(res['units'])} units, {args.runs} runs each, {time.perf_counter() - t0:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
