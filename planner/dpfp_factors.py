"""Tile-compute factors for the DPFP cost model, from a file measured on real tiles (issue 13).

``python -m runtime.tools.dpfp_tilecal`` measures, per unit (the layers between two consecutive split
points) and per sampled tile shape, the tile's time over the whole map's time times the tile's
compute fraction (its computed area share, halo included). :func:`load` reads and checks that file;
:meth:`TileFactors.points` gives a unit's (fraction, factor) curve, which ``planner.dpfp`` interpolates
(:func:`factor_at`) for every tile it prices. A unit the file does not name has no curve: its tiles
are priced by area alone (factor 1), and :meth:`TileFactors.missing` says which.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from runtime.contracts.errors import InvalidInput

FORMAT = "edgesplit-tile-factors"
MAX_FILE_BYTES = 4 * 2**20
"""Largest factors file read (a VGG-16 file is ~25 KB)."""
MAX_UNITS = 4096
MAX_SAMPLES = 64
"""Samples per unit at most."""
MIN_FACTOR = 0.05
MAX_TILE_OVER_WHOLE = 20.0
"""Refused as measurement errors: a tile 20x cheaper than its area share, or one that takes more than 20x
the whole map's time. (A tiny unit's tile takes about the whole map's time, per-call overhead: its factor
is about 1 / fraction, 64 for a 1/64 tile; that is real and kept.)"""

Points = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class TileFactors:
    model: str
    runs: int  # timed runs behind each figure (the median kept)
    measured_at: str  # UTC, as the file says
    units: dict[str, Points]  # unit name (the split it ends at) -> (fraction, factor), fraction ascending, 1.0 last

    def points(self, name: str) -> Points:
        return self.units.get(name, ())

    def missing(self, names: Sequence[str]) -> list[str]:
        return [n for n in names if n not in self.units]


def factor_at(points: Points, fraction: float) -> float:
    """A unit's factor at ``fraction``: piecewise linear in log(fraction) between the samples, the
    nearest sample's beyond them; 1 without samples."""
    if not points or fraction <= 0:
        return 1.0
    if fraction <= points[0][0]:
        return points[0][1]
    if fraction >= points[-1][0]:
        return points[-1][1]
    for (f0, v0), (f1, v1) in itertools.pairwise(points):
        if f0 <= fraction <= f1:
            if f1 == f0:
                return v1
            t = (math.log(fraction) - math.log(f0)) / (math.log(f1) - math.log(f0))
            return v0 + t * (v1 - v0)
    return points[-1][1]


def _points(unit: dict[str, object], where: str) -> Points:
    samples = unit.get("samples")
    if not isinstance(samples, list) or len(samples) > MAX_SAMPLES:
        raise InvalidInput(f"{where}: 'samples' must be a list of at most {MAX_SAMPLES}")
    by_fraction: dict[float, list[float]] = {1.0: [1.0]}  # the whole map is the reference
    for s in samples:
        try:
            fraction, factor = float(s["fraction"]), float(s["factor"])
        except (KeyError, TypeError, ValueError):
            raise InvalidInput(f"{where}: every sample needs numeric 'fraction' and 'factor'") from None
        if not (0 < fraction <= 1.0 and factor >= MIN_FACTOR and factor * fraction <= MAX_TILE_OVER_WHOLE):
            raise InvalidInput(f"{where}: sample fraction {fraction} / factor {factor} out of range (fraction 0..1, "
                               f"factor >= {MIN_FACTOR}, factor x fraction <= {MAX_TILE_OVER_WHOLE})")
        by_fraction.setdefault(round(fraction, 9), []).append(factor)
    return tuple((f, sum(v) / len(v)) for f, v in sorted(by_fraction.items()))


def parse(doc: object, source: str = "tile factors") -> TileFactors:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != 1:
        raise InvalidInput(f"{source}: not an {FORMAT} file of version 1 (write one with python -m runtime.tools.dpfp_tilecal)")
    units = doc.get("units")
    if not isinstance(units, list) or not 1 <= len(units) <= MAX_UNITS:
        raise InvalidInput(f"{source}: 'units' must be a list of 1..{MAX_UNITS}")
    out: dict[str, Points] = {}
    for i, u in enumerate(units):
        if not isinstance(u, dict) or not isinstance(u.get("name"), str) or not u["name"]:
            raise InvalidInput(f"{source}: unit {i} has no name")
        out[u["name"]] = _points(u, f"{source}: unit {u['name']}")
    runs = doc.get("runs")
    return TileFactors(str(doc.get("model", "")), int(runs) if isinstance(runs, int) else 0,
                       str(doc.get("measured_at", "")), out)


def load(path: str | Path) -> TileFactors:
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise InvalidInput(f"cannot read tile factors {p}: {e.strerror}") from None
    if size > MAX_FILE_BYTES:
        raise InvalidInput(f"tile factors {p} is {size} bytes, above the {MAX_FILE_BYTES}-byte limit")
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInput(f"tile factors {p} is not readable JSON: {e}") from None
    return parse(doc, str(p))


MAX_FILES = 64
"""Factors files the planner daemon takes at most (``--parallel-tile-factors``, one per model)."""


def load_many(paths: Sequence[str | Path]) -> dict[str, TileFactors]:
    """Read and check each file (:func:`load`); the result maps each file's model to its factors.
    Refuses more than :data:`MAX_FILES` files, a file that names no model, and two files for one model."""
    if len(paths) > MAX_FILES:
        raise InvalidInput(f"{len(paths)} tile-factors files, at most {MAX_FILES} (one per model)")
    out: dict[str, TileFactors] = {}
    for path in paths:
        tf = load(path)
        if not tf.model:
            raise InvalidInput(f"tile factors {path} names no model (write it with python -m runtime.tools.dpfp_tilecal)")
        if tf.model in out:
            raise InvalidInput(f"two tile-factors files for model {tf.model!r} (give one per model): {path}")
        out[tf.model] = tf
    return out
