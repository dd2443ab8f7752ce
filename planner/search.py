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
from collections.abc import Sequence

from planner.cache import IdentityMemo
from planner.evaluate import Candidate, Problem, evaluate
from planner.tables import SearchCache
from runtime.contracts.costmodel import OBJECTIVES, Configuration, Constraints, Hop, Network, Stage, Tier
from runtime.contracts.errors import InvalidInput
from runtime.contracts.profile import Profile

MAX_GRID_CELLS = 30_000_000  # (n+1)^k cells per machine combination and pattern
NO_CONSTRAINTS = Constraints()  # the default: none (Constraints is frozen, so one instance serves all)
LINK_COSTS = 4096  # link cost vectors one search keeps (one per machine pair, tier pair and caps)


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


def _check(tiers: Sequence[Tier], constraints: Constraints, objective: str) -> int:
    """The number of blocks, after checking the search's inputs."""
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
    return len(block_names)


def _machines(tiers: Sequence[Tier], constraints: Constraints) -> list[tuple[Profile, ...]] | None:
    """Per tier, the machines the constraints allow; None when they leave none for a tier that must run."""
    machines = []
    for t in tiers:
        ms = tuple(p for p in t.profiles if (not constraints.include_machines or p.machine in constraints.include_machines)
                   and p.machine not in constraints.exclude_machines)
        if not ms and (t.required or t is tiers[0]):
            return None
        machines.append(ms)
    return machines


def search(tiers: Sequence[Tier], network: Network, constraints: Constraints = NO_CONSTRAINTS,
           objective: str = "latency", top_n: int = 5, include_return: bool = True,
           cache: SearchCache | None = None) -> list[Configuration]:
    """The ``top_n`` best configurations, best first ([] when none satisfies the constraints).

    ``cache``: the transfer tables to reuse (a re-planner keeps one across searches); default: this call's own."""
    n = _check(tiers, constraints, objective)
    machines = _machines(tiers, constraints)
    if machines is None:
        return []  # the constraints leave no machine for a tier that must run
    if not tiers[0].profiles:
        raise InvalidInput(f"the device tier {tiers[0].name!r} needs a profile (frames start there)")
    device_required = tiers[0].required or constraints.raw_input_stays or constraints.pin_blocks.get(0) == tiers[0].name
    problem = Problem(tuple(tiers), n, network, constraints, objective, include_return, device_required, top_n)
    cache = cache if cache is not None else SearchCache()
    link_memo = IdentityMemo(LINK_COSTS)
    found: list[Candidate] = []
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
                found.extend(evaluate(problem, chain, combo, cache, link_memo))
    found.sort(key=lambda c: c.key)
    return [_build(tiers, c, n, objective, cache) for c in found[:top_n]]


def _build(tiers: Sequence[Tier], c: Candidate, n: int, objective: str, cache: SearchCache) -> Configuration:
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
        prefix = cache.table(p).seconds
        compute = float(prefix[ends[j]] - prefix[starts[j]])
        extra = (hops[j - 1].decode_seconds if j > 0 else 0.0) + (hops[j].encode_seconds if j < k else 0.0)
        stages.append(Stage(tiers[chain[j]].name, p.machine, starts[j], ends[j], compute, compute + extra))
    total = sum(s.seconds for s in stages) + sum(h.rtt_seconds + h.transfer_seconds + h.return_seconds for h in hops)
    slowest = max([s.seconds for s in stages] + [h.transfer_seconds for h in hops])
    return Configuration(seconds=total, fps=1.0 / slowest if slowest > 0 else float("inf"), stages=tuple(stages),
                         hops=tuple(hops), objective=objective)
