"""Arithmetic over the search's grid of cut vectors: one axis per cut, (n+1) cells per axis.

Pure numpy helpers of :mod:`planner.evaluate`; a per-cut vector ``v`` of cut j is placed along
axis j with :func:`axis`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from planner.tables import LinkCost

Columns = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # per cut: encode, xfer, decode, option slot
Place = Callable[[np.ndarray, int], np.ndarray]  # (per-cut vector of cut j, j) -> its place in the grid


def axis(v: np.ndarray, j: int, k: int) -> np.ndarray:
    shape = [1] * k
    shape[j] = v.shape[0]
    return v.reshape(shape)


def grid_sum(h: list[np.ndarray], const: float, tri: np.ndarray) -> np.ndarray:
    """sum_j h[j][a_j] + const over the grid, inf where the cuts are not strictly increasing (``tri``:
    0 where a < b, inf elsewhere, of the vectors' size)."""
    k, size = len(h), h[0].shape[0]
    total = h[0][:, None] + (h[1] + const)[None, :]
    total += tri
    for j in range(2, k):
        total = total[..., None] + h[j].reshape((1,) * j + (size,))
        total += tri.reshape((1,) * (j - 1) + (size, size))
    return total


def smallest_pairs(h0: np.ndarray, g: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The ``m`` smallest h0[a] + g[b] over a < b, as (a, b, value) arrays, values in :func:`grid_sum`'s
    arithmetic (``g`` = h[1] + const), without the grid: each row's best is h0[a] + min(g[a+1:]); the m-th
    smallest of those bounds the m-th smallest cell, so only rows whose best is within it are scored
    (about m rows). None when fewer than m rows have a finite best (the bound says nothing then)."""
    size = g.shape[0]
    if m < 1 or size < 2:
        return None
    suffix = np.minimum.accumulate(g[::-1])[::-1]  # suffix[b] = min(g[b:])
    best = h0[:-1] + suffix[1:]  # row a's best, a < size - 1 (the last row has no b > a)
    if np.count_nonzero(np.isfinite(best)) < m:
        return None
    bound = np.partition(best, m - 1)[m - 1]
    rows = np.flatnonzero(best <= bound)
    sub = h0[rows, None] + g[None, :]
    sub[np.arange(size)[None, :] <= rows[:, None]] = np.inf  # b > a only
    flat = sub.ravel()
    picks = smallest(flat, flat, m)  # row-major over ascending rows: ties go to the earlier cuts, as on the grid
    r, b = np.divmod(picks, size)
    return rows[r], b, flat[picks]


def smallest(value: np.ndarray, total: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` smallest finite ``value`` (flat), ties broken by the lower ``total``, then the lower
    index: the search's key order within one chain and machine combination, whatever the selection finds first."""
    if m < 1:
        return np.zeros(0, dtype=np.intp)
    if m < value.size:
        nth = np.partition(value, m - 1)[m - 1]
        idx = np.flatnonzero(value <= nth) if np.isfinite(nth) else np.flatnonzero(np.isfinite(value))
    else:
        idx = np.flatnonzero(np.isfinite(value))
    return idx[np.lexsort((idx, total[idx], value[idx]))[:m]]


def cell_sum(h: list[np.ndarray], const: float, cells: tuple[np.ndarray, ...]) -> np.ndarray:
    """:func:`grid_sum` at the cut vectors ``cells`` alone (in the same order of additions)."""
    if len(h) == 1:
        first: np.ndarray = h[0][cells[0]] + const
        return first
    total: np.ndarray = h[0][cells[0]] + (h[1] + const)[cells[1]]
    for j in range(2, len(h)):
        total = total + h[j][cells[j]]
    return total


def max_of(parts: Sequence[np.ndarray | float]) -> np.ndarray:
    """The elementwise max of arrays that broadcast together, as a new array: those of one shape first, then
    one pass each into a single array of the full shape (allocating a grid costs more than a pass over it)."""
    by_shape: dict[tuple[int, ...], np.ndarray] = {}
    for p in parts:
        p = np.asarray(p)
        by_shape[p.shape] = np.maximum(by_shape[p.shape], p) if p.shape in by_shape else p
    arrays = sorted(by_shape.values(), key=np.size, reverse=True)
    out = np.empty(np.broadcast_shapes(*(a.shape for a in arrays)))
    if len(arrays) == 1:
        out[...] = arrays[0]
    else:
        np.maximum(arrays[0], arrays[1], out=out)
    for a in arrays[2:]:
        np.maximum(out, a, out=out)
    return out


def floor_within(links: Sequence[LinkCost], prefix: Sequence[np.ndarray], k: int, n: int, bound: float,
                 keep: np.ndarray) -> None:
    """Clears ``keep`` (a grid, in place) where the slowest stage exceeds ``bound`` under any transfers: its
    floor takes each stage with the cheapest option of each cut it involves, in the scores' arithmetic, so
    it never exceeds a score."""
    enc, xfer, dec = zip(*(link.floors for link in links), strict=True)
    for part in [*tier_seconds(prefix, enc, dec, k, n), *(axis(x, j, k) for j, x in enumerate(xfer))]:
        keep &= part <= bound


def tier_seconds(prefix: Sequence[np.ndarray], encode: Sequence[np.ndarray], decode: Sequence[np.ndarray], k: int,
                 n: int, only: set[int] | None = None, at: Place | None = None) -> list[Any]:
    """Each non-empty tier's time (compute + its encode and decode) over the grid; ``encode[j]`` and
    ``decode[j]`` are cut j's transfer vectors. With ``only``, the other tiers' entries are None;
    ``at(v, j)`` places a per-cut vector of cut j (default: along axis j of the grid)."""
    if at is None:
        at = lambda v, j: axis(v, j, k)  # noqa: E731
    out: list[Any] = []  # an array, a float (one tier alone) or None (not in ``only``)
    for j in range(k + 1):  # chain[j] runs [start_j, end_j): start_0 = 0, start_j = cut j-1, end_k = n
        if only is not None and j not in only:
            out.append(None)
            continue
        if 0 < j < k:  # (P[end] + encode) - (P[start] - decode): one vector per cut, one pass over the grid
            out.append(at(prefix[j] + encode[j], j) - at(prefix[j] - decode[j - 1], j - 1))
            continue
        end = at(prefix[j], j) if j < k else prefix[j][n]
        t = end - (at(prefix[j], j - 1) if j > 0 else 0.0)
        if j > 0:
            t = t + at(decode[j - 1], j - 1)
        if j < k:
            t = t + at(encode[j], j)
        out.append(t)
    return out
