"""Throughput over two cuts without the (n+1)^2 grid: rows bounded from below, scored best first.

The slowest stage of a device-edge-cloud chain at cuts (a, b) is max(R(a), C(b), U(b) - V(a)): the
device's time and its upload depend on a alone, the last tier's time and the second upload on b
alone, and the middle tier's time is (P1[b] + encode) - (P1[a] - decode). So a row's value is at
least max(R(a), min C(b > a), min U(b > a) - V(a)), exactly in the scores' arithmetic (a minimum
then a subtraction rounds the same as the other order). :func:`throughput_rows` scores rows of the
cheapest transfers in the order of that bound until the next bound passes the N-th best seen,
which is then the grid's N-th best; the cut vectors whose floor (each stage with its cheapest
option) can reach it are found the same way, and every transfer combination is scored there.
Same values, same cut vectors as :func:`planner.evaluate._best_per_cell` over the grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from planner.grid import Columns, tier_seconds
from planner.tables import LinkCost

FIRST_ROWS = 8  # rows scored in the first batch; each later batch doubles
Cells = tuple[np.ndarray, np.ndarray]  # (a, b) index arrays


class _Problem(Protocol):
    @property
    def n(self) -> int: ...  # blocks of the model


class Scorer(Protocol):
    """What of :class:`planner.evaluate.Scorer` this module uses."""

    @property
    def problem(self) -> _Problem: ...

    prefix: list[np.ndarray]
    links: list[LinkCost]
    k: int

    def terms(self, cols: Sequence[Columns]) -> tuple[list[np.ndarray], float]: ...

    def score(self, cols: Sequence[Columns], keep_bound: bool = False,
              cells: tuple[np.ndarray, ...] | None = None) -> tuple[np.ndarray, np.ndarray]: ...


def _suffix_min(v: np.ndarray) -> np.ndarray:
    """out[a] = min(v[a+1:]), inf for the last."""
    out = np.full(v.shape[0], np.inf)
    out[:-1] = np.minimum.accumulate(v[:0:-1])[::-1]
    return out


def _row_floor(scorer: Scorer, enc: Sequence[np.ndarray], xfer: Sequence[np.ndarray], dec: Sequence[np.ndarray],
               h: Sequence[np.ndarray]) -> np.ndarray:
    """Per row a, a lower bound of the slowest stage over b > a (inf where no b is feasible)."""
    p, n = scorer.prefix, scorer.problem.n
    right = np.maximum(p[2][n] - p[2] + dec[1], xfer[1])  # the last tier and the second link: b alone
    right[~np.isfinite(h[1])] = np.inf
    middle_end = p[1] + enc[1]
    middle_end[~np.isfinite(h[1])] = np.inf
    bound: np.ndarray = np.maximum(np.maximum((p[0] - 0.0) + enc[0], xfer[0]), _suffix_min(right))
    bound = np.maximum(bound, _suffix_min(middle_end) - (p[1] - dec[0]))
    bound[~np.isfinite(h[0])] = np.inf
    return bound


def _rows_grid(rows: np.ndarray, size: int) -> Cells:
    return rows[:, None], np.arange(size)[None, :]


def _score_rows(scorer: Scorer, cols: Sequence[Columns], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(value, latency) of whole rows, inf where b <= a (the grid's order mask)."""
    cells = _rows_grid(rows, scorer.problem.n + 1)
    value, total = scorer.score(cols, cells=cells)
    value, total = np.broadcast_to(value, (len(rows), scorer.problem.n + 1)).copy(), total.copy()
    below = cells[1] <= cells[0]
    value[below] = np.inf
    total[below] = np.inf
    return value, total


def _nth_best(scorer: Scorer, cheapest: Sequence[Columns], m: int) -> float:
    """The m-th smallest value of the cheapest transfers over the grid (inf where fewer are feasible): rows in
    the order of their lower bound, in doubling batches, until the next row's bound passes the m-th seen."""
    size = scorer.problem.n + 1
    enc, xfer, dec, _ = zip(*cheapest, strict=True)
    h, _ = scorer.terms(cheapest)
    lower = _row_floor(scorer, enc, xfer, dec, h)
    order = np.argsort(lower, kind="stable")
    seen: list[np.ndarray] = []
    bound, start, batch = np.inf, 0, FIRST_ROWS
    while start < size and lower[order[start]] <= bound:
        rows = order[start:start + batch]
        seen.append(_score_rows(scorer, cheapest, rows)[0].ravel())
        start, batch = start + batch, batch * 2
        values = np.concatenate(seen)
        bound = float(np.partition(values, m - 1)[m - 1]) if values.size >= m else np.inf
    return bound


def _kept_cells(scorer: Scorer, cheapest: Sequence[Columns], worst: float) -> Cells:
    """The cut vectors (row-major) where the cheapest latency is finite and no stage's floor exceeds ``worst``."""
    size, k, n = scorer.problem.n + 1, scorer.k, scorer.problem.n
    enc, xfer, dec = zip(*(link.floors for link in scorer.links), strict=True)
    h, _ = scorer.terms(cheapest)
    rows = np.flatnonzero(_row_floor(scorer, enc, xfer, dec, h) <= worst)
    cells = _rows_grid(rows, size)

    def at(v: np.ndarray, j: int) -> np.ndarray:
        return v[cells[j]]

    keep = (cells[1] > cells[0]) & np.isfinite(h[1])[None, :]
    for part in [*tier_seconds(scorer.prefix, enc, dec, k, n, at=at), *(at(x, j) for j, x in enumerate(xfer))]:
        keep = keep & (part <= worst)
    r, b = np.nonzero(keep)
    return rows[r], b


def throughput_rows(scorer: Scorer, cheapest: Sequence[Columns], m: int) -> Cells:
    """Throughput over two cuts without grid-wide constraints: the cut vectors (row-major) that can hold the top
    ``m`` under some transfer combination (those :func:`planner.evaluate._best_per_cell` keeps over the grid)."""
    return _kept_cells(scorer, cheapest, _nth_best(scorer, cheapest, m))
