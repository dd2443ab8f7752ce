"""Scission-grade split search: rank every configuration of blocks over tiers, under constraints.

A configuration gives each tier a contiguous range of blocks (device first, then edge, cloud ...;
any tier but the device's origin role may be empty), picks one machine per tier, and for every
cut between consecutive non-empty tiers one transfer (codec, optionally after a Transfer Layer).

The search is exhaustive but vectorised: for each machine combination and each pattern of
non-empty tiers, the latency of every cut vector is one numpy expression over a grid of
(n+1)^k cells (k = tiers after the device), built from prefix sums of block times and per-cut
link costs. Per cut, the transfer is the cheapest one that passes the constraints that involve
that cut's transfer alone (upload cap, fidelity floor, and the time cap of the first and the last
non-empty tier: the device's time is its blocks plus its encode, the last tier's its blocks plus
its decode): link costs are additive and one cut's choice does not touch another's, so for
latency this is exact. A share cap, or a time cap on a middle tier (decode of one cut plus encode
of the next), couples the transfer choices with each other and with the cuts; there, every
combination of transfer slots is scored over the grid (one grid at a time) and each cut vector
keeps its best feasible combination, which is exact too. The throughput objective (the slowest
stage: a tier's compute plus its encode and decode, or a link's transfer) is not additive, so a
slower but smaller transfer can lower it: there the per-cut latency choice only gives an upper
bound on the top N, a lower bound per cut vector (each stage with its own cheapest option) drops
the cut vectors that cannot reach it, and the combinations are scored over the rest (over the
whole grid where few drop), which is exact.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np

from runtime.contracts.costmodel import OBJECTIVES, Configuration, Constraints, Hop, Network, Stage, Tier
from runtime.contracts.profile import Profile, Transfer
from runtime.contracts.errors import InvalidInput

MAX_GRID_CELLS = 30_000_000  # (n+1)^k cells per machine combination and pattern
SPARSE_SHARE = 1.0  # throughput: combinations x kept cut vectors up to this x grid cells are scored at those alone


@dataclass
class _LinkCost:
    """Per cut a in 0..n: the chosen transfer and its parts (inf where no transfer is allowed).

    ``choice``/``encode``/``xfer``/``decode`` are the per-cut cheapest allowed option; the ``*_all``
    matrices (n+1, K) hold every option slot (``xfer_all`` is inf where the option is not allowed)."""

    choice: np.ndarray  # index into options[a], -1 = none
    encode: np.ndarray
    rtt: float
    xfer: np.ndarray
    decode: np.ndarray
    ret: np.ndarray
    options: list[tuple[Transfer, ...]]
    enc_all: np.ndarray
    xfer_all: np.ndarray
    dec_all: np.ndarray

    @property
    def total(self) -> np.ndarray:
        return self.encode + self.rtt + self.xfer + self.decode + self.ret

    @property
    def multi(self) -> bool:
        """Some cut has more than one allowed transfer."""
        return bool((np.isfinite(self.xfer_all).sum(axis=1) > 1).any())

    @cached_property
    def floors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per cut, the least encode, transfer and decode over its allowed options (inf where none)."""
        ok = np.isfinite(self.xfer_all)
        return (np.where(ok, self.enc_all, np.inf).min(axis=1), self.xfer_all.min(axis=1),
                np.where(ok, self.dec_all, np.inf).min(axis=1))

    def columns(self, expand: bool) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """(encode, xfer, decode, slot per cut) vectors: the cheapest option only, or every option slot."""
        if not (expand and self.multi):
            return [(self.encode, self.xfer, self.decode, self.choice)]
        rows = self.xfer_all.shape[0]
        return [(self.enc_all[:, s], self.xfer_all[:, s], self.dec_all[:, s], np.full(rows, s))
                for s in range(self.xfer_all.shape[1]) if np.isfinite(self.xfer_all[:, s]).any()]


def _check_profiles(tiers: Sequence[Tier]) -> tuple[str, list[str]]:
    first = None
    for t in tiers:
        for p in t.profiles:
            if first is None:
                first = p
            elif p.model != first.model or [b.name for b in p.blocks] != [b.name for b in first.blocks]:
                raise InvalidInput(f"profiles disagree: {p.machine} has {p.model} with {p.n_blocks} blocks, "
                                   f"{first.machine} has {first.model} with {first.n_blocks}; all tiers need "
                                   f"profiles of the same model with the same blocks")
    if first is None:
        raise InvalidInput("no profiles to plan with")
    return first.model, [b.name for b in first.blocks]


@dataclass
class _Table:
    """A profile's transfers as arrays: row a = the tensor after a blocks, column = option slot."""

    names: list[tuple[str, ...]]
    options: list[tuple[Transfer, ...]]
    nbytes: np.ndarray  # (n+1, K), inf where a row has fewer options
    encode: np.ndarray
    decode: np.ndarray
    fidelity: np.ndarray  # nan = not measured
    is_tl: np.ndarray
    seconds: np.ndarray  # prefix sums of block times, length n+1
    params: np.ndarray  # prefix sums of param_bytes


_TABLES: dict[int, tuple[Profile, _Table]] = {}  # id -> (profile kept alive, table); live re-planning reuses it


def _table(p: Profile) -> _Table:
    hit = _TABLES.get(id(p))
    if hit is not None and hit[0] is p:
        return hit[1]
    options = [p.transfers_after(a) for a in range(p.n_blocks + 1)]
    width = max(len(o) for o in options)
    missing = (np.inf, 0.0, 0.0, np.nan, 0.0)
    cells = np.array([[(t.bytes, t.encode_seconds, t.decode_seconds,
                        np.nan if t.fidelity is None else t.fidelity, 1.0 if t.tl_id else 0.0) for t in o]
                      + [missing] * (width - len(o)) for o in options], dtype=np.float64)
    nbytes, enc, dec, fid = cells[..., 0], cells[..., 1], cells[..., 2], cells[..., 3]
    tl = cells[..., 4] > 0
    table = _Table([tuple(t.name for t in o) for o in options], options, nbytes, enc, dec, fid, tl,
                   _prefix(p, "seconds"), _prefix(p, "param_bytes"))
    if len(_TABLES) > 256:
        _TABLES.clear()
    _TABLES[id(p)] = (p, table)
    return table


def _receiver_decode(sender: _Table, receiver: _Table) -> np.ndarray:
    """The receiver's measured decode time per option; the sender's figure where it has none."""
    if sender.names == receiver.names:
        return receiver.decode
    dec = sender.decode.copy()
    for a, names in enumerate(sender.names):
        theirs = dict(zip(receiver.names[a], receiver.decode[a])) if a < len(receiver.names) else {}
        for i, name in enumerate(names):
            if name in theirs:
                dec[a, i] = theirs[name]
    return dec


def _link_cost(sender: Profile, receiver: Profile, src_tier: str, dst_tier: str, network: Network,
               constraints: Constraints, include_return: bool, result_bytes: int,
               sender_cap: float | None = None, receiver_cap: float | None = None) -> _LinkCost:
    """``sender_cap``: the time cap of a sender that runs blocks [0, a) (the device); ``receiver_cap``:
    that of a receiver that runs [a, n) (the last tier). Each involves this cut's transfer only."""
    n = sender.n_blocks
    link = network.link(sender.machine, receiver.machine, src_tier, dst_tier)
    bw = link.bandwidth_bytes_per_second
    st, rt = _table(sender), _table(receiver)
    dec = _receiver_decode(st, rt)
    xfer = st.nbytes / bw
    allowed = np.isfinite(st.nbytes)
    cap = constraints.max_upload_bytes.get(src_tier)
    if cap is not None:
        allowed &= st.nbytes <= cap
    if constraints.min_fidelity > 0:
        allowed &= ~st.is_tl | (st.fidelity >= constraints.min_fidelity)  # nan (unmeasured) fails
    if sender_cap is not None:  # same arithmetic as _tier_seconds, so the grid agrees
        allowed &= st.seconds[:, None] + st.encode <= sender_cap
    if receiver_cap is not None:
        allowed &= (rt.seconds[n] - rt.seconds)[:, None] + dec <= receiver_cap
    xfer = np.where(allowed, xfer, np.inf)
    cost = st.encode + xfer + dec
    choice = np.argmin(cost, axis=1)
    rows = np.arange(n + 1)
    none = ~np.isfinite(cost[rows, choice])
    pick = lambda m: np.where(none, np.inf, m[rows, choice])  # noqa: E731
    ret = np.full(n + 1, result_bytes / bw if include_return else 0.0)
    return _LinkCost(np.where(none, -1, choice), pick(st.encode), link.rtt_seconds, pick(xfer), pick(dec), ret,
                     st.options, st.encode, xfer, dec)


def _axis(v: np.ndarray, axis: int, k: int) -> np.ndarray:
    shape = [1] * k
    shape[axis] = v.shape[0]
    return v.reshape(shape)


class _Candidate:
    __slots__ = ("key", "combo", "chain", "cuts", "links", "slots")

    def __init__(self, key, combo, chain, cuts, links=(), slots=()):
        self.key, self.combo, self.chain, self.cuts = key, combo, chain, cuts
        self.links, self.slots = links, slots  # per cut: its _LinkCost and the chosen option slot


def search(tiers: Sequence[Tier], network: Network, constraints: Constraints = Constraints(),
           objective: str = "latency", top_n: int = 5, include_return: bool = True) -> list[Configuration]:
    """The ``top_n`` best configurations, best first ([] when none satisfies the constraints)."""
    if objective not in OBJECTIVES:
        raise InvalidInput(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
    if not tiers:
        raise InvalidInput("at least one tier (the device) is needed")
    names = [t.name for t in tiers]
    if len(set(names)) != len(names):
        raise InvalidInput(f"tier names repeat: {names}")
    _, block_names = _check_profiles(tiers)
    for b, tier in constraints.pin_blocks.items():
        if tier not in names:
            raise InvalidInput(f"block {b} is pinned to tier {tier!r}, which is not one of {names}")
    n = len(block_names)
    machines = []
    for t in tiers:
        ms = tuple(p for p in t.profiles if (not constraints.include_machines or p.machine in constraints.include_machines)
                   and p.machine not in constraints.exclude_machines)
        if not ms and (t.required or t is tiers[0]):
            return []  # the constraints leave no machine for a tier that must run
        machines.append(ms)
    if not tiers[0].profiles:
        raise InvalidInput(f"the device tier {tiers[0].name!r} needs a profile (frames start there)")
    device_required = tiers[0].required or constraints.raw_input_stays or constraints.pin_blocks.get(0) == tiers[0].name

    found: list[_Candidate] = []
    cache: dict[tuple, _LinkCost] = {}
    later = range(1, len(tiers))
    for k in range(0, len(tiers)):
        for subset in itertools.combinations(later, k):
            chain = (0, *subset)
            if any(tiers[i].required and i not in chain for i in range(len(tiers))):
                continue
            if k > 0 and (n + 1) ** k > MAX_GRID_CELLS:
                raise InvalidInput(f"{n} blocks over {k + 1} non-empty tiers is {(n + 1) ** k} configurations per "
                                   f"machine set, above the {MAX_GRID_CELLS} this search evaluates at once")
            for combo in itertools.product(*(machines[i] for i in chain)):
                found.extend(_evaluate(tiers, chain, combo, n, network, constraints, objective, include_return,
                                       device_required, top_n, cache))
    found.sort(key=lambda c: c.key)
    return [_build(tiers, c, n, objective) for c in found[:top_n]]


def _prefix(p: Profile, attr: str = "seconds") -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum([getattr(b, attr) for b in p.blocks], dtype=np.float64)])


def _links(tiers, chain, combo, network, constraints, include_return, cache):
    out = []
    result_bytes = combo[0].blocks[-1].output_bytes
    k = len(chain) - 1
    caps = constraints.max_tier_seconds
    for j in range(1, len(chain)):
        # the first tier's and the last tier's time caps involve this cut's transfer only: masked per option
        scap = caps.get(tiers[chain[0]].name) if j == 1 else None
        rcap = caps.get(tiers[chain[k]].name) if j == k else None
        key = (id(combo[j - 1]), id(combo[j]), chain[j - 1], chain[j], scap, rcap)
        if key not in cache:
            cache[key] = _link_cost(combo[j - 1], combo[j], tiers[chain[j - 1]].name, tiers[chain[j]].name,
                                    network, constraints, include_return, result_bytes, scap, rcap)
        out.append(cache[key])
    return out


def _evaluate(tiers, chain, combo, n, network, constraints, objective, include_return, device_required, top_n, cache):
    k = len(chain) - 1
    prefix = [_table(p).seconds for p in combo]
    if k == 0:  # everything on the device
        for b, tier in constraints.pin_blocks.items():
            if tier != tiers[0].name:
                return []
        if any(tiers[0].name in f for f in constraints.forbid_blocks.values()):
            return []
        total = float(prefix[0][n])
        if not _caps_ok_scalar(tiers, constraints, combo[0], total):
            return []
        return [_Candidate((total if objective == "latency" else total, total, 0, ()), combo, chain, ())]
    links = _links(tiers, chain, combo, network, constraints, include_return, cache)
    # constraints on one cut each: masks of the per-axis vectors
    idx = np.arange(n + 1)
    allowed = [np.ones(n + 1, dtype=bool) for _ in range(k)]
    if device_required:
        allowed[0] &= idx >= 1
    allowed[k - 1] &= idx < n
    pos = {tiers[i].name: j for j, i in enumerate(chain)}
    coupled_forbid = []
    for b, tname in constraints.pin_blocks.items():  # block b runs on tier t <=> start(t) <= b < end(t)
        if tname not in pos:
            return []
        j = pos[tname]
        if j > 0:
            allowed[j - 1] &= idx <= b
        if j < k:
            allowed[j] &= idx > b
    for b, forbidden in constraints.forbid_blocks.items():
        for tname in forbidden & pos.keys():
            j = pos[tname]
            if j == 0:
                allowed[0] &= idx <= b
            elif j == k:
                allowed[k - 1] &= idx > b
            else:
                coupled_forbid.append((j, b))
    const = prefix[k][n]
    # constraints over the grid that do not depend on the transfers
    fixed_bad = None
    if coupled_forbid or any(tiers[i].name in constraints.max_memory_bytes for i in chain):
        ax = [_axis(idx, j, k) for j in range(k)]
        fixed_ok = np.ones((n + 1,) * k, dtype=bool)
        for j, b in coupled_forbid:
            fixed_ok &= ~((ax[j - 1] <= b) & (ax[j] > b))
        for j, i in enumerate(chain):
            tname = tiers[i].name
            if tname in constraints.max_memory_bytes:
                pm = _table(combo[j]).params
                used = (_axis(pm, j, k) if j < k else pm[n]) - (_axis(pm, j - 1, k) if j > 0 else 0.0)
                fixed_ok &= used <= constraints.max_memory_bytes[tname]
        fixed_bad = ~fixed_ok
    # caps over the grid that depend on the transfers (end tiers' time caps are already masked per option)
    checks = []
    for j, i in enumerate(chain):
        tname = tiers[i].name
        if 0 < j < k and tname in constraints.max_tier_seconds:
            checks.append((j, None, constraints.max_tier_seconds[tname]))
        if tname in constraints.max_tier_share:
            checks.append((j, constraints.max_tier_share[tname], None))
    plain = fixed_bad is None and not checks and objective == "latency"

    def score(cols, keep_bound=False, cells=None):
        """(value, total) over the grid with the transfer vectors ``cols`` (one per cut), or at the cut vectors
        ``cells`` (one index array per cut) alone; for latency with ``keep_bound``, total is the latency before
        the caps."""
        # Each term of the latency depends on one cut only: tier j's compute is P_j[end] - P_j[start],
        # so the total is a sum of one vector per axis (h[j] for the cut where chain[j+1] starts).
        h = [np.where(allowed[j], prefix[j] - prefix[j + 1] + enc + links[j].rtt + xfer + dec + links[j].ret, np.inf)
             for j, (enc, xfer, dec, _) in enumerate(cols)]
        if cells is None:
            at = lambda v, j: _axis(v, j, k)  # noqa: E731
            total = h[0] + const if k == 1 else _grid_sum(h, const)
        else:
            at = lambda v, j: v[cells[j]]  # noqa: E731
            total = _cell_sum(h, const, cells)
        if plain:
            return total, total
        need = None if objective != "latency" else {j for j, _, _ in checks}
        tier_sec = _tier_seconds(prefix, [c[0] for c in cols], [c[2] for c in cols], k, n, need, at)
        bad = fixed_bad if cells is None else None  # the cells given are ones the fixed constraints allow
        for j, share, cap in checks:
            over = tier_sec[j] > (cap if share is None else share * total)
            bad = over if bad is None else bad | over
        if objective == "latency":  # the value is the total where feasible (total is a fresh array)
            bound = total.copy() if keep_bound else total
            if bad is not None:
                np.copyto(total, np.inf, where=bad)
            return total, bound
        stages = _max_of([*tier_sec, *(at(c[1], j) for j, c in enumerate(cols))])
        np.copyto(stages, np.inf, where=~np.isfinite(total) if bad is None else bad | ~np.isfinite(total))
        return stages, total

    # the coupled caps (and, for throughput, the max over stages) make the best transfer of a cut depend on the
    # others and on the cuts: score every combination of option slots (only the cuts with a choice expand)
    per_cut = [link.columns(bool(checks) or objective != "latency") for link in links]
    combos = list(itertools.product(*per_cut))
    cells = None  # throughput: the cut vectors where another combination may do better than the first
    if len(combos) > 1:
        # the cheapest transfer per cut first: for latency, where it passes the caps nothing does better;
        # elsewhere another choice reaches at best the cap-free latency, so the others are scored only if that
        # could enter the top N. For throughput its values bound the top N from above.
        cheapest = tuple(link.columns(False)[0] for link in links)
        value, bound = score(cheapest, keep_bound=True)
        flat = value.ravel()
        m = min(top_n, flat.size)
        worst = np.partition(flat, m - 1)[m - 1]
        if objective == "latency":
            combos = [cheapest, *combos] if np.any((bound < worst) & np.isinf(value)) else [cheapest]
            total = value
        else:
            total = bound
            combos = [cheapest, *combos]
            keep = np.isfinite(total) if fixed_bad is None else np.isfinite(total) & ~fixed_bad
            _floor_within(links, prefix, k, n, worst, keep)  # one whose floor is above cannot enter the top N
            if np.count_nonzero(keep) * (len(combos) - 1) <= SPARSE_SHARE * keep.size:
                cells = np.nonzero(keep)
    else:
        value, total = score(combos[0])
    if cells is not None:  # the lower value, then the lower latency, at the kept cut vectors: the top N is there
        value, total, which = value[cells], total[cells], np.zeros(len(cells[0]), dtype=np.int32)
        for c, cols in enumerate(combos[1:], 1):
            v, t = score(cols, cells=cells)
            better = (v < value) | ((v == value) & (t < total))
            value, total, which = np.where(better, v, value), np.where(better, t, total), np.where(better, c, which)
        at_pick = lambda p: tuple(int(a[p]) for a in cells)  # noqa: E731
    else:
        which = np.zeros(value.shape, dtype=np.int32) if len(combos) > 1 else None
        for c, cols in enumerate(combos[1:], 1):
            v, t = score(cols)
            if objective == "latency":  # value is total: the lower one wins
                better = v < value
                np.copyto(value, v, where=better)
            else:  # the lower value, then the lower latency
                better = (v < value) | ((v == value) & (t < total))
                value, total = np.where(better, v, value), np.where(better, t, total)
            np.copyto(which, c, where=better)
        at_pick = lambda p: tuple(int(a) for a in np.unravel_index(p, value.shape))  # noqa: E731
    flat = value.ravel()
    m = min(top_n, flat.size)
    picks = np.argpartition(flat, m - 1)[:m] if m < flat.size else np.arange(flat.size)
    out = []
    tflat = total.ravel()
    for p in picks:
        if not np.isfinite(flat[p]):
            continue
        cuts = at_pick(p)
        cols = combos[0 if which is None else int(which.ravel()[p])]
        slots = tuple(int(col[3][a]) for col, a in zip(cols, cuts))
        out.append(_Candidate((float(flat[p]), float(tflat[p]), k, cuts), combo, chain, cuts, links, slots))
    return out


_ORDER: dict[int, np.ndarray] = {}


def _grid_sum(h: list[np.ndarray], const: float) -> np.ndarray:
    """sum_j h[j][a_j] + const over the grid, inf where the cuts are not strictly increasing."""
    k, size = len(h), h[0].shape[0]
    if size not in _ORDER:  # 0 where a < b, inf elsewhere
        tri = np.full((size, size), np.inf)
        tri[np.triu_indices(size, 1)] = 0.0
        _ORDER.clear()
        _ORDER[size] = tri
    tri = _ORDER[size]
    total = h[0][:, None] + (h[1] + const)[None, :]
    total += tri
    for j in range(2, k):
        total = total[..., None] + h[j].reshape((1,) * j + (size,))
        total += tri.reshape((1,) * (j - 1) + (size, size))
    return total


def _cell_sum(h: list[np.ndarray], const: float, cells: tuple[np.ndarray, ...]) -> np.ndarray:
    """:func:`_grid_sum` at the cut vectors ``cells`` alone (in the same order of additions)."""
    if len(h) == 1:
        return h[0][cells[0]] + const
    total = h[0][cells[0]] + (h[1] + const)[cells[1]]
    for j in range(2, len(h)):
        total = total + h[j][cells[j]]
    return total


def _max_of(parts: list) -> np.ndarray:
    """The elementwise max of arrays that broadcast together, as a new array: those of one shape first, then
    one pass each into a single array of the full shape (allocating a grid costs more than a pass over it)."""
    by_shape: dict[tuple, np.ndarray] = {}
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


def _floor_within(links, prefix, k, n, bound: float, keep: np.ndarray) -> None:
    """Clears ``keep`` (a grid, in place) where the slowest stage exceeds ``bound`` under any transfers: its
    floor takes each stage with the cheapest option of each cut it involves, in the scores' arithmetic, so
    it never exceeds a score."""
    enc, xfer, dec = zip(*(link.floors for link in links))
    for part in [*_tier_seconds(prefix, enc, dec, k, n), *(_axis(x, j, k) for j, x in enumerate(xfer))]:
        keep &= part <= bound


def _tier_seconds(prefix, encode, decode, k, n, only=None, at=None):
    """Each non-empty tier's time (compute + its encode and decode) over the grid; ``encode[j]`` and
    ``decode[j]`` are cut j's transfer vectors. With ``only``, the other tiers' entries are None;
    ``at(v, j)`` places a per-cut vector of cut j (default: along axis j of the grid)."""
    if at is None:
        at = lambda v, j: _axis(v, j, k)  # noqa: E731
    out = []
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


def _caps_ok_scalar(tiers, constraints, profile, total):
    name = tiers[0].name
    if name in constraints.max_tier_seconds and total > constraints.max_tier_seconds[name]:
        return False
    if name in constraints.max_tier_share and constraints.max_tier_share[name] < 1.0:
        return False
    if name in constraints.max_memory_bytes and sum(b.param_bytes for b in profile.blocks) > constraints.max_memory_bytes[name]:
        return False
    return True


def _build(tiers, c: _Candidate, n: int, objective: str) -> Configuration:
    """The full breakdown of one candidate (only the top N get built)."""
    chain, combo, cuts = c.chain, c.combo, c.cuts
    k = len(chain) - 1
    starts = (0, *cuts)
    ends = (*cuts, n)
    hops = []
    for j, link in enumerate(c.links):
        a, s = cuts[j], c.slots[j]
        t = link.options[a][s]
        src, dst = combo[j], combo[j + 1]
        split = "input" if a == 0 else src.blocks[a - 1].name
        hops.append(Hop(tiers[chain[j]].name, src.machine, tiers[chain[j + 1]].name, dst.machine, a, split, t,
                        float(link.enc_all[a, s]), link.rtt, float(link.xfer_all[a, s]), float(link.dec_all[a, s]),
                        float(link.ret[a])))
    stages = []
    for j in range(k + 1):
        p = combo[j]
        prefix = _table(p).seconds
        compute = float(prefix[ends[j]] - prefix[starts[j]])
        extra = (hops[j - 1].decode_seconds if j > 0 else 0.0) + (hops[j].encode_seconds if j < k else 0.0)
        stages.append(Stage(tiers[chain[j]].name, p.machine, starts[j], ends[j], compute, compute + extra))
    total = sum(s.seconds for s in stages) + sum(h.rtt_seconds + h.transfer_seconds + h.return_seconds for h in hops)
    slowest = max([s.seconds for s in stages] + [h.transfer_seconds for h in hops])
    return Configuration(seconds=total, fps=1.0 / slowest if slowest > 0 else float("inf"), stages=tuple(stages),
                         hops=tuple(hops), objective=objective)
