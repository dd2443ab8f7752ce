"""How the planner ranks configurations for one agent, re-costs the plan it runs, and writes a Plan.

Pure functions over profiles, links and constraints (no service state, no I/O): the service calls
:func:`rank` and :func:`predict` in its one-thread executor. A Transfer Layer is usable only where
both the agent and the worker hold it, so the device profile each search sees is limited to those
(:func:`limit_device`), and the ranking runs one search per candidate worker (a local-only search
gives the configurations without a worker) and merges them best first.

Chained plans (device -> edge -> cloud, the runtime's worker chaining): for every edge-tier
worker that registered the address of a cloud-tier worker among its next tiers (its
``--next-tier`` allowlist; the planner cannot change it, so it never routes a frame to an address
the edge would refuse), both of them workers the agent may use, one more search runs over the three tiers with both workers required
(:class:`Chain`); the configurations with fewer tiers come from the searches above. The edge ->
cloud hop uses codecs only (a forwarding worker drops Transfer Layers, :func:`forwarding`), and
its link is the planner's configured worker-to-worker link (no agent measures it). Chains are
edge -> cloud only: the search names tiers, and a frame crosses each tier once.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from planner import workload
from planner.cache import IdentityMemo
from planner.search import search
from planner.store import AgentRecord, LinkRecord, WorkerRecord
from planner.tables import SearchCache
from runtime.contracts.constraints import resolve
from runtime.contracts.costmodel import Configuration, Constraints, Link, Network, Tier
from runtime.contracts.profile import Profile, Transfer
from runtime.contracts.tiers import CLOUD, DEVICE, EDGE
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

PROFILES = 256  # derived profiles a DecisionCache keeps

Route = tuple[tuple[int, str, str, str], ...]  # per later worker: (cut before it, worker id, codec, TL id)
PlanKey = tuple[str, int, str, str, Route]  # worker id ("" = local), split index, codec, TL id, route


def plan_route(plan: pb.Plan) -> Route:
    """The chained part of ``plan`` as a key: () when its worker runs the whole tail."""
    cuts = [plan.end_split_index, *(h.end_split_index for h in plan.next_hops[:-1])]
    return tuple((cut, h.worker_id, h.codec, h.tl_id) for cut, h in zip(cuts, plan.next_hops, strict=False))


def plan_key(plan: pb.Plan) -> PlanKey:
    return (plan.worker_id, plan.split_index, plan.codec, plan.tl_id, plan_route(plan))


@dataclass(frozen=True)
class Candidate:
    """One worker the agent may use, with the inputs of its search."""

    worker_id: str
    address: str
    tier: str
    profile: Profile
    tl_ids: frozenset[str]
    link: Link
    next_tiers: frozenset[str] = frozenset()  # addresses it forwards chained frames to


@dataclass(frozen=True)
class Chain:
    """An edge worker that forwards to a cloud worker: the inputs of one device -> edge -> cloud search."""

    first: Candidate  # the edge worker (the agent's link is first.link)
    second: Candidate  # the cloud worker; second.address is one of first.next_tiers
    link: Link  # first -> second (the planner's worker-to-worker link)


@dataclass(frozen=True)
class Ranked:
    config: Configuration
    worker_id: str = ""  # "" = local
    address: str = ""
    next_hops: tuple[tuple[str, str], ...] = ()  # (worker id, address) of each worker after the first


def search_constraints(c: pb.Constraints, device: Profile, pins: dict[int, str] | None = None) -> Constraints | None:
    """The search's constraints for wire constraints ``c`` (checked at registration), with ``pins``
    added; None when ``pins`` place a block on another tier than ``c`` does (never without ``pins``:
    :func:`agent_constraints`)."""
    cons = agent_constraints(c, device)
    if not pins:
        return cons
    if any(pins.get(b, t) != t for b, t in cons.pin_blocks.items()):
        return None
    return dataclasses.replace(cons, pin_blocks={**cons.pin_blocks, **pins})


def agent_constraints(c: pb.Constraints, device: Profile) -> Constraints:
    """The search's constraints for wire constraints ``c`` alone (no pins added)."""
    return resolve(c, device)


def _searchable(cons: Constraints, tiers: list[Tier]) -> bool:
    """Whether a search over ``tiers`` can honour the pins (the search refuses a pin to an absent tier)."""
    names = {t.name for t in tiers}
    return all(t in names for t in cons.pin_blocks.values())


def incompatibility(agent: AgentRecord, device: Profile, worker_id: str, worker_profiles: Mapping[str, Profile]) -> str:
    """Why the worker with ``worker_profiles`` cannot take frames of ``agent`` ("" when it can)."""
    theirs = worker_profiles.get(agent.model)
    if theirs is None:
        return f"worker {worker_id} has no profile of {agent.model} (it serves {sorted(worker_profiles)})"
    ours = [b.name for b in device.blocks]
    names = [b.name for b in theirs.blocks]
    if names != ours:
        first = next((i for i, (a, b) in enumerate(zip(ours, names, strict=False)) if a != b), min(len(ours), len(names)))
        return (f"worker {worker_id}'s profile of {agent.model} has {len(names)} blocks and the agent's has "
                f"{len(ours)}; they first differ at block {first}: profile both with the same edgesplit version")
    if agent.digest and theirs.model_digest and agent.digest != theirs.model_digest:
        return (f"worker {worker_id} profiled {agent.model} with weights {theirs.model_digest} but the agent runs "
                f"{agent.digest}: give both the same weights")
    return ""


def candidates(agent: AgentRecord, device: Profile, workers: Iterable[tuple[WorkerRecord, Mapping[str, Profile]]],
               link_for: Callable[[str], LinkRecord | None], rtt: float = 0.0,
               bandwidth: float = 0.0, incompatible: Callable[..., str] | None = None) -> list[Candidate]:
    """The ``workers`` (in the order given) that ``agent`` may use: allowed and included by it, not excluded, and
    able to take its frames; each with its link (``rtt``/``bandwidth`` > 0 override the measured). A worker
    whose link is unknown (``link_for`` None) and not overridden is left out: unknown is not fast.
    ``incompatible``: :func:`incompatibility`, or a memo of it."""
    incompatible = incompatible or incompatibility
    allowed = set(agent.workers)
    included = set(agent.constraints.include_workers)
    excluded = set(agent.constraints.exclude_workers)
    out = []
    for rec, worker_profiles in workers:
        wid = rec.id
        if ((allowed and wid not in allowed) or (included and wid not in included) or wid in excluded
                or incompatible(agent, device, wid, worker_profiles)):
            continue
        lk = link_for(wid)
        if lk is None and not bandwidth:
            continue
        link = Link(rtt or (lk.rtt_seconds if lk else 0.0), bandwidth or (lk.bandwidth_bytes_per_second if lk else 0.0))
        out.append(Candidate(wid, rec.address, rec.tier, worker_profiles[agent.model],
                             frozenset(agent.tl_ids) & frozenset(rec.tl_ids), link, frozenset(rec.next_tiers)))
    return out


def chains(cands: Iterable[Candidate], link: Link) -> list[Chain]:
    """Every (edge, cloud) pair of ``cands`` in which the edge worker forwards to the cloud worker's address."""
    cands = list(cands)
    return [Chain(f, s, link) for f in cands if f.tier == EDGE
            for s in cands if s.tier == CLOUD and s.address in f.next_tiers]


@dataclass
class DecisionCache:
    """What decisions reuse: the search's transfer tables, and profiles derived here, kept as the same
    objects so that those tables are found again. The re-planner owns one; without one a call makes
    its own."""

    search: SearchCache = field(default_factory=SearchCache)  # transfer tables per profile object
    profiles: IdentityMemo = field(default_factory=lambda: IdentityMemo(PROFILES))  # derived profiles


def _own(cache: DecisionCache | None) -> DecisionCache:
    return cache if cache is not None else DecisionCache()


def forwarding(worker: Profile, cache: DecisionCache | None = None) -> Profile:
    """``worker``'s profile as a sender to the next tier: its codec transfers only (a forwarding
    worker sends with a codec and drops Transfer Layers; runtime.worker.forward)."""
    return _own(cache).profiles.get("forwarding", (worker,), lambda: shared_tls(worker, frozenset()))


def _receiving(device: Profile, worker: Profile, cache: DecisionCache) -> Profile:
    """``device`` with each transfer's decode time as ``worker`` measured it.

    In a chained search the edge's profile is :func:`forwarding`'s, which lacks the Transfer
    Layers the device may send it; the search then takes the sender's decode figure, so the
    device's figures are replaced by the edge's own here."""

    def make() -> Profile:
        def patch(own: tuple[Transfer, ...], theirs: tuple[Transfer, ...]) -> tuple[Transfer, ...]:
            dec = {t.name: t.decode_seconds for t in theirs}
            return tuple(dataclasses.replace(t, decode_seconds=dec[t.name]) if t.name in dec else t for t in own)

        blocks = tuple(dataclasses.replace(b, transfers=patch(b.transfers, worker.transfers_after(b.index + 1)))
                       for b in device.blocks)
        return dataclasses.replace(device, blocks=blocks,
                                   input_transfers=patch(device.input_transfers, worker.transfers_after(0)))

    if forwarding(worker, cache) is worker:  # nothing removed: the search finds the edge's figures itself
        return device
    return cache.profiles.get("receiving", (device, worker), make)


def chain_inputs(chain: Chain, device: Profile, forward: Profile | None = None,
                 cache: DecisionCache | None = None) -> tuple[list[Tier], Network]:
    """The tiers and network of ``chain``'s search (``forward``: the edge's sending profile, default
    :func:`forwarding`'s); both workers are required (fewer tiers are searched elsewhere)."""
    cache = _own(cache)
    edge = forward if forward is not None else forwarding(chain.first.profile, cache)
    dev = _receiving(device, chain.first.profile, cache)
    tiers = [Tier(DEVICE, (dev,)), Tier(chain.first.tier, (edge,), required=True),
             Tier(chain.second.tier, (chain.second.profile,), required=True)]
    net = Network({(dev.machine, edge.machine): chain.first.link, (edge.machine, chain.second.profile.machine): chain.link})
    return tiers, net


def shared_tls(device: Profile, tl_ids: frozenset[str]) -> Profile:
    """``device`` limited to transfers whose TL is held on both ends (``tl_ids``) or that need none."""

    def usable(t: Transfer) -> bool:
        return not t.tl_id or t.tl_id in tl_ids

    p = device
    if any(not usable(t) for b in p.blocks for t in b.transfers) or any(not usable(t) for t in p.input_transfers):
        p = dataclasses.replace(p, input_transfers=tuple(filter(usable, p.input_transfers)),
                                blocks=tuple(dataclasses.replace(b, transfers=tuple(filter(usable, b.transfers)))
                                             for b in p.blocks))
    return p


def limit_device(device: Profile, tl_ids: frozenset[str],
                 cut_transfer: tuple[int, str, str] | None = None) -> Profile | None:
    """``device`` limited to TLs held on both ends, optionally to one transfer (cut, codec, TL id) at
    one cut; None when that transfer is not among them."""
    p = shared_tls(device, tl_ids)
    if cut_transfer is not None:
        cut, codec, tl_id = cut_transfer
        match = tuple(t for t in p.transfers_after(cut) if t.codec == codec and t.tl_id == tl_id)
        if not match:
            return None
        if cut == 0:
            p = dataclasses.replace(p, input_transfers=match)
        else:
            blocks = list(p.blocks)
            blocks[cut - 1] = dataclasses.replace(blocks[cut - 1], transfers=match)
            p = dataclasses.replace(p, blocks=tuple(blocks))
    return p


def objective(agent: AgentRecord) -> str:
    return agent.constraints.objective or "latency"


def score(cfg: Configuration, objective: str) -> float:
    """What the objective minimises: seconds per frame, or seconds between frames when pipelined."""
    if objective == "throughput":
        return 0.0 if math.isinf(cfg.fps) else 1.0 / cfg.fps
    return cfg.seconds


def config_key(device: Profile, r: Ranked) -> PlanKey:
    """The :data:`PlanKey` a ranked configuration would have as a plan."""
    if not r.config.hops:
        return ("", device.n_blocks, "", "", ())
    hop = r.config.hops[0]
    route = tuple((h.cut, wid, h.transfer.codec, h.transfer.tl_id) for h, (wid, _) in zip(r.config.hops[1:], r.next_hops, strict=False))
    return (r.worker_id, hop.cut, hop.transfer.codec, hop.transfer.tl_id, route)


def rank(agent: AgentRecord, device: Profile, cands: list[Candidate], devices: list[Profile], top_n: int,
         include_return: bool, exclude: PlanKey | None = None, chained: Iterable[tuple[Chain, Profile]] = (),
         cache: DecisionCache | None = None) -> tuple[list[Ranked], float]:
    """One search per candidate worker (with ``devices[i]`` for ``cands[i]``), one per chain (with its
    device profile) and one local search, merged best first; returns the ``top_n`` best but
    ``exclude``, and the seconds it took."""
    t0 = time.perf_counter()
    cache = _own(cache)
    goal = objective(agent)
    cons = agent_constraints(agent.constraints, device)
    local = [Tier(DEVICE, (device,))]
    found = [Ranked(c) for c in search(local, Network({}), cons, goal, 1, include_return, cache.search)] if _searchable(cons, local) else []
    per_worker = top_n + 1 + (exclude is not None)  # room for the local one and an excluded one
    for cand, dev in zip(cands, devices, strict=False):
        net = Network({(dev.machine, cand.profile.machine): cand.link})
        tiers = [Tier(DEVICE, (dev,)), Tier(cand.tier, (cand.profile,))]
        if not _searchable(cons, tiers):  # pins to the other worker tier
            continue
        for cfg in search(tiers, net, cons, goal, per_worker, include_return, cache.search):
            if cfg.hops:  # local configurations come from the device-only search above
                found.append(Ranked(cfg, cand.worker_id, cand.address))
    for chain, dev in chained:
        tiers, net = chain_inputs(chain, dev, cache=cache)
        if not _searchable(cons, tiers):
            continue
        nxt = ((chain.second.worker_id, chain.second.address),)
        found.extend(Ranked(cfg, chain.first.worker_id, chain.first.address, nxt)
                     for cfg in search(tiers, net, cons, goal, per_worker, include_return, cache.search))
    # stable configurations first (utilisation < 1 on board and link at the agent's frame rate), then with the link's wait
    found.sort(key=lambda r: (*workload.rank_key(r.config, device, score(r.config, goal)), r.config.seconds,
                              len(r.config.hops)))
    if exclude is not None:
        found = [r for r in found if config_key(device, r) != exclude]
    return found[:top_n], time.perf_counter() - t0


def predict(agent: AgentRecord, device: Profile, plan: pb.Plan, cand: Candidate | None, dev: Profile | None,
            include_return: bool, chain: Chain | None = None, forward: Profile | None = None,
            cache: DecisionCache | None = None) -> Configuration | None:
    """The predicted configuration of ``plan`` now, None when infeasible.

    ``cand`` is the plan's worker as a candidate now (None: not one), ``dev`` the device profile
    limited to the plan's transfer at its cut (None: that transfer is gone). A chained plan needs
    ``chain`` (its two workers now, the edge still forwarding to the cloud) and ``forward``
    (:func:`forwarding_at` its hop's transfer; None: that transfer is gone)."""
    goal = objective(agent)
    if plan.model_id != agent.model:
        return None
    cache = _own(cache)
    if plan.next_hops:
        return _predict_chain(agent, device, plan, dev, include_return, chain, forward, cache)
    if not plan.worker_id:
        tiers = [Tier(DEVICE, (device,))]
        cons = agent_constraints(agent.constraints, device)
        got = search(tiers, Network({}), cons, goal, 1, include_return, cache.search) if _searchable(cons, tiers) else []
        return got[0] if got else None
    if cand is None or dev is None or cand.address != plan.worker_address:
        return None
    pins = {b: (DEVICE if b < plan.split_index else cand.tier) for b in range(device.n_blocks)}
    pinned = search_constraints(agent.constraints, device, pins)
    if pinned is None:  # the agent's pins put a block elsewhere
        return None
    net = Network({(dev.machine, cand.profile.machine): cand.link})
    got = search([Tier(DEVICE, (dev,)), Tier(cand.tier, (cand.profile,))], net, pinned, goal, 1, include_return,
                 cache.search)
    return got[0] if got and got[0].hops else None


def forwarding_at(worker: Profile, cut: int, codec: str, cache: DecisionCache | None = None) -> Profile | None:
    """:func:`forwarding`'s profile limited to one codec at one cut (None: it has no such transfer)."""
    cache = _own(cache)
    return cache.profiles.get(f"forwarding@{cut}:{codec}", (worker,),
                              lambda: limit_device(forwarding(worker, cache), frozenset(), (cut, codec, "")))


def _predict_chain(agent: AgentRecord, device: Profile, plan: pb.Plan, dev: Profile | None, include_return: bool,
                   chain: Chain | None, forward: Profile | None, cache: DecisionCache) -> Configuration | None:
    hop = plan.next_hops[0]
    if (chain is None or dev is None or forward is None or len(plan.next_hops) != 1 or hop.tl_id
            or chain.first.address != plan.worker_address or chain.second.address != hop.address
            or hop.address not in chain.first.next_tiers or not plan.split_index < plan.end_split_index < device.n_blocks):
        return None
    split, end = plan.split_index, plan.end_split_index
    pins = {b: (DEVICE if b < split else chain.first.tier if b < end else chain.second.tier)
            for b in range(device.n_blocks)}
    cons = search_constraints(agent.constraints, device, pins)
    if cons is None:
        return None
    tiers, net = chain_inputs(chain, dev, forward, cache)
    got = search(tiers, net, cons, objective(agent), 1, include_return, cache.search)
    return got[0] if got and len(got[0].hops) == 2 else None


def to_plan(agent: AgentRecord, device: Profile, r: Ranked, reason: str) -> pb.Plan:
    """The Plan message for a ranked configuration (no version yet: the store assigns it)."""
    cfg = r.config
    plan = pb.Plan(agent_id=agent.id, model_id=agent.model, predicted_seconds=cfg.seconds,
                   predicted_fps=cfg.fps, predicted_bytes=cfg.upload_bytes, reason=reason,
                   created_unix=time.time())
    plan.breakdown_seconds.update(cfg.breakdown())
    workload.annotate(plan, cfg, device)  # queue:board shown apart, queue:link added
    if not cfg.hops:
        plan.split_id, plan.split_index = "output", device.n_blocks
    else:
        hop = cfg.hops[0]
        plan.split_id, plan.split_index = hop.split, hop.cut
        plan.codec, plan.tl_id = hop.transfer.codec, hop.transfer.tl_id
        plan.worker_id, plan.worker_address = r.worker_id, r.address
        later = cfg.hops[1:]
        if later:
            plan.end_split, plan.end_split_index = later[0].split, later[0].cut
        for i, (h, (wid, address)) in enumerate(zip(later, r.next_hops, strict=False)):
            end = later[i + 1] if i + 1 < len(later) else None
            plan.next_hops.add(worker_id=wid, address=address, end_split=end.split if end else "",
                               end_split_index=end.cut if end else device.n_blocks, codec=h.transfer.codec,
                               tl_id=h.transfer.tl_id)
    return plan
