"""One step of the search: every cut vector of one chain of tiers on one machine combination.

:func:`evaluate` runs named steps: the device-only case (:func:`_device_only`); the links of the
chain's cuts (:func:`_links`); the per-cut masks from pins and forbidden blocks
(:func:`_cut_masks`); the grid-wide masks that do not depend on transfers (:func:`_fixed_bad`)
and the caps that do (:func:`_coupled_checks`); the score of a choice of transfer per cut over
the grid (:class:`Scorer`); the best choice per cut vector (:func:`_best_per_cell`); and the
top N of those (:func:`_top`). See :mod:`planner.search` for why each step is exact.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from planner.cache import IdentityMemo
from planner.grid import Columns, axis, cell_sum, floor_within, grid_sum, max_of, smallest, smallest_pairs, tier_seconds
from planner.rowbound import throughput_rows
from planner.tables import LinkCost, LinkSpec, SearchCache, link_cost
from runtime.contracts.costmodel import Constraints, Network, Tier
from runtime.contracts.profile import Profile

ROW_BOUND = True  # latency over two cuts without grid-wide constraints: top N by row bounds, not the whole grid
SPARSE_SHARE = 1.0  # throughput: combinations x kept cut vectors up to this x grid cells are scored at those alone

Check = tuple[int, float | None, float | None]  # (tier position, share cap or None, time cap or None)


@dataclass(frozen=True)
class Problem:
    """What every evaluation of one search shares."""

    tiers: tuple[Tier, ...]  # the search's tiers, the device's first
    n: int  # blocks of the model
    network: Network  # the links between machines and tiers
    constraints: Constraints  # the search's constraints
    objective: str  # "latency" or "throughput"
    include_return: bool  # the result travels back to the device
    device_required: bool  # the device must run at least one block
    top_n: int  # how many candidates an evaluation keeps


@dataclass(slots=True)
class Candidate:
    """One cut vector of one chain on one machine combination, with what :func:`planner.search` builds it from."""

    key: tuple[object, ...]  # sort key: (value, latency, later tiers, cuts)
    combo: tuple[Profile, ...]  # the machine of each tier in the chain
    chain: tuple[int, ...]  # indices of the non-empty tiers
    cuts: tuple[int, ...]  # where each later tier starts
    links: Sequence[LinkCost] = ()  # per cut: its link's costs
    slots: tuple[int, ...] = ()  # per cut: the chosen option slot


def evaluate(problem: Problem, chain: tuple[int, ...], combo: tuple[Profile, ...], cache: SearchCache,
             link_memo: IdentityMemo) -> list[Candidate]:
    """The best ``problem.top_n`` cut vectors of ``chain`` on ``combo`` (fewer where fewer are feasible)."""
    k = len(chain) - 1
    prefix = [cache.table(p).seconds for p in combo]
    if k == 0:  # everything on the device
        return _device_only(problem, chain, combo, float(prefix[0][problem.n]))
    links = _links(problem, chain, combo, cache, link_memo)
    masks = _cut_masks(problem, chain)
    if masks is None:
        return []
    allowed, coupled_forbid = masks
    scorer = Scorer(problem, prefix, links, allowed, _fixed_bad(problem, chain, combo, coupled_forbid, cache),
                    _coupled_checks(problem, chain), cache)
    if scorer.plain and k == 2 and ROW_BOUND:
        found = _top_plain_pairs(problem, scorer, chain, combo)
        if found is not None:
            return found
    return _top(problem, _best_per_cell(problem, scorer), chain, combo, links)


def _top_plain_pairs(problem: Problem, scorer: Scorer, chain: tuple[int, ...],
                     combo: tuple[Profile, ...]) -> list[Candidate] | None:
    """Two cuts, latency, no grid-wide constraint: the value is h0[a] + h1[b] + const with one transfer per cut
    (the cheapest), so the top N comes from the rows that can hold it (:func:`smallest_pairs`), without the
    (n+1)^2 grid. None when that bound does not apply (the caller scores the grid)."""
    cols = tuple(link.columns(False)[0] for link in scorer.links)
    h, const = scorer.terms(cols)
    m = min(problem.top_n, (problem.n + 1) ** 2)
    pairs = smallest_pairs(h[0], h[1] + const, m)  # the same additions as grid_sum's
    if pairs is None:
        return None
    out = []
    for a, b, v in zip(*pairs, strict=True):
        if np.isfinite(v):
            cuts = (int(a), int(b))
            slots = (int(cols[0][3][a]), int(cols[1][3][b]))
            out.append(Candidate((float(v), float(v), 2, cuts), combo, chain, cuts, scorer.links, slots))
    return out


def _device_only(problem: Problem, chain: tuple[int, ...], combo: tuple[Profile, ...], total: float) -> list[Candidate]:
    cons, device = problem.constraints, problem.tiers[0].name
    if any(tier != device for tier in cons.pin_blocks.values()):
        return []
    if any(device in f for f in cons.forbid_blocks.values()):
        return []
    if not _caps_ok_scalar(device, cons, combo[0], total):
        return []
    return [Candidate((total, total, 0, ()), combo, chain, ())]


def _caps_ok_scalar(name: str, constraints: Constraints, profile: Profile, total: float) -> bool:
    if name in constraints.max_tier_seconds and total > constraints.max_tier_seconds[name]:
        return False
    if name in constraints.max_tier_share and constraints.max_tier_share[name] < 1.0:
        return False
    return not (name in constraints.max_memory_bytes
                and sum(b.param_bytes for b in profile.blocks) > constraints.max_memory_bytes[name])


def _links(problem: Problem, chain: tuple[int, ...], combo: tuple[Profile, ...], cache: SearchCache,
           link_memo: IdentityMemo) -> list[LinkCost]:
    """Each cut's link costs; the first and the last tier's time caps involve one cut's transfer only,
    so they are masked per option there."""
    tiers, caps = problem.tiers, problem.constraints.max_tier_seconds
    result_bytes = combo[0].blocks[-1].output_bytes
    k = len(chain) - 1
    out = []
    for j in range(1, len(chain)):
        scap = caps.get(tiers[chain[0]].name) if j == 1 else None
        rcap = caps.get(tiers[chain[k]].name) if j == k else None
        spec = LinkSpec(combo[j - 1], combo[j], tiers[chain[j - 1]].name, tiers[chain[j]].name, result_bytes,
                        scap, rcap)
        make = functools.partial(link_cost, spec, problem.network, problem.constraints, problem.include_return, cache)
        out.append(link_memo.get((chain[j - 1], chain[j], scap, rcap), (combo[j - 1], combo[j]), make))
    return out


def _cut_masks(problem: Problem, chain: tuple[int, ...]) -> tuple[list[np.ndarray], list[tuple[int, int]]] | None:
    """Per cut, the positions that pins and forbidden blocks allow, and the forbidden blocks of middle tiers
    (which involve two cuts); None when a block is pinned to a tier outside ``chain``."""
    n, k, cons = problem.n, len(chain) - 1, problem.constraints
    idx = np.arange(n + 1)
    allowed = [np.ones(n + 1, dtype=bool) for _ in range(k)]
    if problem.device_required:
        allowed[0] &= idx >= 1
    allowed[k - 1] &= idx < n
    pos = {problem.tiers[i].name: j for j, i in enumerate(chain)}
    coupled_forbid = []
    for b, tname in cons.pin_blocks.items():  # block b runs on tier t <=> start(t) <= b < end(t)
        if tname not in pos:
            return None
        j = pos[tname]
        if j > 0:
            allowed[j - 1] &= idx <= b
        if j < k:
            allowed[j] &= idx > b
    for b, forbidden in cons.forbid_blocks.items():
        for tname in forbidden & pos.keys():
            j = pos[tname]
            if j == 0:
                allowed[0] &= idx <= b
            elif j == k:
                allowed[k - 1] &= idx > b
            else:
                coupled_forbid.append((j, b))
    return allowed, coupled_forbid


def _fixed_bad(problem: Problem, chain: tuple[int, ...], combo: tuple[Profile, ...],
               coupled_forbid: list[tuple[int, int]], cache: SearchCache) -> np.ndarray | None:
    """The grid cells that constraints independent of the transfers rule out (None: no such constraint)."""
    n, k, memory = problem.n, len(chain) - 1, problem.constraints.max_memory_bytes
    if not (coupled_forbid or any(problem.tiers[i].name in memory for i in chain)):
        return None
    idx = np.arange(n + 1)
    ax = [axis(idx, j, k) for j in range(k)]
    fixed_ok = np.ones((n + 1,) * k, dtype=bool)
    for j, b in coupled_forbid:
        fixed_ok &= ~((ax[j - 1] <= b) & (ax[j] > b))
    for j, i in enumerate(chain):
        tname = problem.tiers[i].name
        if tname in memory:
            pm = cache.table(combo[j]).params
            used = (axis(pm, j, k) if j < k else pm[n]) - (axis(pm, j - 1, k) if j > 0 else 0.0)
            fixed_ok &= used <= memory[tname]
    return ~fixed_ok


def _coupled_checks(problem: Problem, chain: tuple[int, ...]) -> list[Check]:
    """The caps over the grid that depend on the transfers (the end tiers' time caps are masked per option)."""
    cons, k = problem.constraints, len(chain) - 1
    checks: list[Check] = []
    for j, i in enumerate(chain):
        tname = problem.tiers[i].name
        if 0 < j < k and tname in cons.max_tier_seconds:
            checks.append((j, None, cons.max_tier_seconds[tname]))
        if tname in cons.max_tier_share:
            checks.append((j, cons.max_tier_share[tname], None))
    return checks


@dataclass
class Scorer:
    """Scores one choice of transfer per cut over the grid (or at some cut vectors)."""

    problem: Problem  # the search
    prefix: list[np.ndarray]  # per tier of the chain, prefix sums of its machine's block times
    links: list[LinkCost]  # per cut, its link's costs
    allowed: list[np.ndarray]  # per cut, the positions the pins and forbidden blocks allow
    fixed_bad: np.ndarray | None  # grid cells ruled out whatever the transfers (None: none)
    checks: list[Check]  # caps that depend on the transfers
    cache: SearchCache  # where the order mask comes from
    k: int = field(init=False)  # cuts
    plain: bool = field(init=False)  # latency with no grid-wide constraint: the total is the score

    def __post_init__(self) -> None:
        self.k = len(self.links)
        self.plain = self.fixed_bad is None and not self.checks and self.problem.objective == "latency"

    def terms(self, cols: Sequence[Columns]) -> tuple[list[np.ndarray], float]:
        """The latency as one vector per cut plus a constant: each term depends on one cut only (tier j's
        compute is P_j[end] - P_j[start]), so the total is sum_j h[j][cut j] + const."""
        prefix, links = self.prefix, self.links
        h = [np.where(self.allowed[j], prefix[j] - prefix[j + 1] + enc + links[j].rtt + xfer + dec + links[j].ret,
                      np.inf) for j, (enc, xfer, dec, _) in enumerate(cols)]
        return h, prefix[self.k][self.problem.n]

    def score(self, cols: Sequence[Columns], keep_bound: bool = False,
              cells: tuple[np.ndarray, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(value, total) over the grid with the transfer vectors ``cols`` (one per cut), or at the cut vectors
        ``cells`` (one index array per cut) alone; for latency with ``keep_bound``, total is the latency before
        the caps."""
        k, n, prefix = self.k, self.problem.n, self.prefix
        h, const = self.terms(cols)
        at: Callable[[np.ndarray, int], np.ndarray]
        if cells is None:
            at = lambda v, j: axis(v, j, k)  # noqa: E731
            total = h[0] + const if k == 1 else grid_sum(h, const, self.cache.triangle(n + 1))
        else:
            at = lambda v, j: v[cells[j]]  # noqa: E731
            total = cell_sum(h, const, cells)
        if self.plain:
            return total, total
        latency = self.problem.objective == "latency"
        need = {j for j, _, _ in self.checks} if latency else None
        tier_sec = tier_seconds(prefix, [c[0] for c in cols], [c[2] for c in cols], k, n, need, at)
        bad = self.fixed_bad if cells is None else None  # the cells given are ones the fixed constraints allow
        for j, share, cap in self.checks:
            over = tier_sec[j] > (cap if share is None else share * total)
            bad = over if bad is None else bad | over
        if latency:  # the value is the total where feasible (total is a fresh array)
            bound = total.copy() if keep_bound else total
            if bad is not None:
                np.copyto(total, np.inf, where=bad)
            return total, bound
        stages = max_of([*tier_sec, *(at(c[1], j) for j, c in enumerate(cols))])
        np.copyto(stages, np.inf, where=~np.isfinite(total) if bad is None else bad | ~np.isfinite(total))
        return stages, total


@dataclass
class Best:
    """Per cut vector, the best value over the transfer combinations scored, its latency and which it was."""

    value: np.ndarray  # the objective's value (inf: infeasible)
    total: np.ndarray  # the latency
    which: np.ndarray | None  # index into combos (None: one combination)
    combos: list[Sequence[Columns]]  # the combinations scored, the first the cheapest per cut
    at_pick: Callable[[int], tuple[int, ...]]  # flat index into value -> the cut vector


def _best_per_cell(problem: Problem, scorer: Scorer) -> Best:
    """The coupled caps (and, for throughput, the max over stages) make the best transfer of a cut depend on
    the others and on the cuts: score every combination of option slots (only the cuts with a choice expand)."""
    links, latency = scorer.links, problem.objective == "latency"
    per_cut = [link.columns(bool(scorer.checks) or not latency) for link in links]
    combos: list[Sequence[Columns]] = list(itertools.product(*per_cut))
    if not latency and scorer.k == 2 and scorer.fixed_bad is None and not scorer.checks and ROW_BOUND:
        found = _throughput_by_rows(problem, scorer, combos)
        if found is not None:
            return found
    cells = None  # throughput: the cut vectors where another combination may do better than the first
    if len(combos) > 1:
        # the cheapest transfer per cut first: for latency, where it passes the caps nothing does better;
        # elsewhere another choice reaches at best the cap-free latency, so the others are scored only if that
        # could enter the top N. For throughput its values bound the top N from above.
        cheapest = tuple(link.columns(False)[0] for link in links)
        value, bound = scorer.score(cheapest, keep_bound=True)
        flat = value.ravel()
        m = min(problem.top_n, flat.size)
        worst = np.partition(flat, m - 1)[m - 1]
        if latency:
            combos = [cheapest, *combos] if np.any((bound < worst) & np.isinf(value)) else [cheapest]
            total = value
        else:
            total = bound
            combos = [cheapest, *combos]
            keep = np.isfinite(total) if scorer.fixed_bad is None else np.isfinite(total) & ~scorer.fixed_bad
            floor_within(links, scorer.prefix, scorer.k, problem.n, worst, keep)  # a floor above cannot enter
            if np.count_nonzero(keep) * (len(combos) - 1) <= SPARSE_SHARE * keep.size:
                cells = np.nonzero(keep)
    else:
        value, total = scorer.score(combos[0])
    if cells is not None:
        return _best_at_cells(scorer, combos, value[cells], total[cells], cells)
    return _best_over_grid(latency, scorer, combos, value, total)


def _throughput_by_rows(problem: Problem, scorer: Scorer, combos: list[Sequence[Columns]]) -> Best | None:
    """:func:`_best_per_cell` for throughput over two cuts from the rows that can hold the top N
    (:mod:`planner.rowbound`); None where they are too many for the sparse scoring (score the grid)."""
    size, m = problem.n + 1, min(problem.top_n, (problem.n + 1) ** 2)
    if m < 1:
        return None
    cheapest = tuple(link.columns(False)[0] for link in scorer.links)
    cells = throughput_rows(scorer, cheapest, m)
    if len(combos) > 1 and len(cells[0]) * len(combos) > SPARSE_SHARE * size * size:
        return None
    value, total = scorer.score(cheapest, cells=cells)
    if len(combos) > 1:
        return _best_at_cells(scorer, [cheapest, *combos], value, total, cells)
    return Best(value, total, None, [cheapest], lambda p: (int(cells[0][p]), int(cells[1][p])))


def _best_at_cells(scorer: Scorer, combos: list[Sequence[Columns]], value: np.ndarray, total: np.ndarray,
                   cells: tuple[np.ndarray, ...]) -> Best:
    """The lower value, then the lower latency, at the kept cut vectors (``value``/``total``: the first
    combination's there): the top N is there."""
    which = np.zeros(len(cells[0]), dtype=np.int32)
    for c, cols in enumerate(combos[1:], 1):
        v, t = scorer.score(cols, cells=cells)
        better = (v < value) | ((v == value) & (t < total))
        value, total, which = np.where(better, v, value), np.where(better, t, total), np.where(better, c, which)
    return Best(value, total, which, combos, lambda p: tuple(int(a[p]) for a in cells))


def _best_over_grid(latency: bool, scorer: Scorer, combos: list[Sequence[Columns]], value: np.ndarray,
                    total: np.ndarray) -> Best:
    which = np.zeros(value.shape, dtype=np.int32) if len(combos) > 1 else None
    for c, cols in enumerate(combos[1:], 1):
        v, t = scorer.score(cols)
        if latency:  # value is total: the lower one wins
            better = v < value
            np.copyto(value, v, where=better)
        else:  # the lower value, then the lower latency
            better = (v < value) | ((v == value) & (t < total))
            value, total = np.where(better, v, value), np.where(better, t, total)
        assert which is not None  # more than one combination
        np.copyto(which, c, where=better)
    shape = value.shape
    return Best(value, total, which, combos, lambda p: tuple(int(a) for a in np.unravel_index(p, shape)))


def _top(problem: Problem, best: Best, chain: tuple[int, ...], combo: tuple[Profile, ...],
         links: list[LinkCost]) -> list[Candidate]:
    """The ``top_n`` feasible cut vectors of ``best`` by the search's key (ties in value go to the lower latency,
    then the earlier cuts; unordered: the search sorts them all)."""
    flat = best.value.ravel()
    tflat = best.total.ravel()
    picks = smallest(flat, tflat, problem.top_n)
    out = []
    k = len(chain) - 1
    for p in picks:
        if not np.isfinite(flat[p]):
            continue
        cuts = best.at_pick(p)
        cols = best.combos[0 if best.which is None else int(best.which.ravel()[p])]
        slots = tuple(int(col[3][a]) for col, a in zip(cols, cuts, strict=True))
        out.append(Candidate((float(flat[p]), float(tflat[p]), k, cuts), combo, chain, cuts, links, slots))
    return out
