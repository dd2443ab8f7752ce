"""How the planner ranks configurations for one agent, re-costs the plan it runs, and writes a Plan.

Pure functions over profiles, links and constraints (no service state, no I/O): the service calls
:func:`rank` and :func:`predict` in its one-thread executor. A Transfer Layer is usable only where
both the agent and the worker hold it, so the device profile each search sees is limited to those
(:func:`limit_device`), and the ranking runs one search per candidate worker (a local-only search
gives the configurations without a worker) and merges them best first.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from planner.constraints import resolve
from planner.costmodel import Configuration, Constraints, Link, Network, Tier
from planner.profile import Profile
from planner.search import search
from planner.store import AgentRecord, LinkRecord, WorkerRecord
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

PlanKey = tuple[str, int, str, str]  # worker id ("" = local), split index, codec, TL id


def plan_key(plan: pb.Plan) -> PlanKey:
    return (plan.worker_id, plan.split_index, plan.codec, plan.tl_id)


@dataclass(frozen=True)
class Candidate:
    """One worker the agent may use, with the inputs of its search."""

    worker_id: str
    address: str
    tier: str
    profile: Profile
    tl_ids: frozenset[str]
    link: Link


@dataclass(frozen=True)
class Ranked:
    config: Configuration
    worker_id: str = ""  # "" = local
    address: str = ""


def search_constraints(c: pb.Constraints, device: Profile, pins: dict[int, str] | None = None) -> Constraints | None:
    """The search's constraints for wire constraints ``c`` (checked at registration), with ``pins``
    added; None when ``pins`` place a block on another tier than ``c`` does."""
    cons = resolve(c, device)
    if not pins:
        return cons
    if any(pins.get(b, t) != t for b, t in cons.pin_blocks.items()):
        return None
    return dataclasses.replace(cons, pin_blocks={**cons.pin_blocks, **pins})


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
        first = next((i for i, (a, b) in enumerate(zip(ours, names)) if a != b), min(len(ours), len(names)))
        return (f"worker {worker_id}'s profile of {agent.model} has {len(names)} blocks and the agent's has "
                f"{len(ours)}; they first differ at block {first}: profile both with the same edgesplit version")
    if agent.digest and theirs.model_digest and agent.digest != theirs.model_digest:
        return (f"worker {worker_id} profiled {agent.model} with weights {theirs.model_digest} but the agent runs "
                f"{agent.digest}: give both the same weights")
    return ""


def candidates(agent: AgentRecord, device: Profile, workers: Iterable[tuple[WorkerRecord, Mapping[str, Profile]]],
               link_for: Callable[[str], LinkRecord], rtt: float = 0.0, bandwidth: float = 0.0) -> list[Candidate]:
    """The ``workers`` (in the order given) that ``agent`` may use: allowed and included by it, not excluded, and
    able to take its frames; each with its link (``rtt``/``bandwidth`` > 0 override the measured)."""
    allowed = set(agent.workers)
    included = set(agent.constraints.include_workers)
    excluded = set(agent.constraints.exclude_workers)
    out = []
    for rec, worker_profiles in workers:
        wid = rec.id
        if ((allowed and wid not in allowed) or (included and wid not in included) or wid in excluded
                or incompatibility(agent, device, wid, worker_profiles)):
            continue
        lk = link_for(wid)
        link = Link(rtt or lk.rtt_seconds, bandwidth or lk.bandwidth_bytes_per_second)
        out.append(Candidate(wid, rec.address, rec.tier, worker_profiles[agent.model],
                             frozenset(agent.tl_ids) & frozenset(rec.tl_ids), link))
    return out


def limit_device(device: Profile, tl_ids: frozenset[str],
                 cut_transfer: tuple[int, str, str] | None = None) -> Profile | None:
    """``device`` limited to TLs held on both ends, optionally to one transfer (cut, codec, TL id) at
    one cut; None when that transfer is not among them."""
    p = device
    usable = lambda t: not t.tl_id or t.tl_id in tl_ids  # noqa: E731
    if any(not usable(t) for b in p.blocks for t in b.transfers) or any(not usable(t) for t in p.input_transfers):
        p = dataclasses.replace(p, input_transfers=tuple(filter(usable, p.input_transfers)),
                                blocks=tuple(dataclasses.replace(b, transfers=tuple(filter(usable, b.transfers)))
                                             for b in p.blocks))
    if cut_transfer is not None:
        cut, codec, tl_id = cut_transfer
        match = tuple(t for t in p.transfers_after(cut) if t.codec == codec and t.tl_id == tl_id)
        if not match:
            p = None
        elif cut == 0:
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
        return ("", device.n_blocks, "", "")
    hop = r.config.hops[0]
    return (r.worker_id, hop.cut, hop.transfer.codec, hop.transfer.tl_id)


def rank(agent: AgentRecord, device: Profile, cands: list[Candidate], devices: list[Profile], top_n: int,
         include_return: bool, exclude: PlanKey | None = None) -> tuple[list[Ranked], float]:
    """One search per candidate worker (with ``devices[i]`` for ``cands[i]``) and one local search,
    merged best first; returns the ``top_n`` best but ``exclude``, and the seconds it took."""
    t0 = time.perf_counter()
    goal = objective(agent)
    cons = search_constraints(agent.constraints, device)
    local = [Tier("device", (device,))]
    found = [Ranked(c) for c in search(local, Network({}), cons, goal, 1, include_return)] if _searchable(cons, local) else []
    per_worker = top_n + 1 + (exclude is not None)  # room for the local one and an excluded one
    for cand, dev in zip(cands, devices):
        net = Network({(dev.machine, cand.profile.machine): cand.link})
        tiers = [Tier("device", (dev,)), Tier(cand.tier, (cand.profile,))]
        if not _searchable(cons, tiers):  # pins to the other worker tier
            continue
        for cfg in search(tiers, net, cons, goal, per_worker, include_return):
            if cfg.hops:  # local configurations come from the device-only search above
                found.append(Ranked(cfg, cand.worker_id, cand.address))
    found.sort(key=lambda r: (score(r.config, goal), r.config.seconds, len(r.config.hops)))
    if exclude is not None:
        found = [r for r in found if config_key(device, r) != exclude]
    return found[:top_n], time.perf_counter() - t0


def predict(agent: AgentRecord, device: Profile, plan: pb.Plan, cand: Candidate | None, dev: Profile | None,
            include_return: bool) -> Configuration | None:
    """The predicted configuration of ``plan`` now, None when infeasible.

    ``cand`` is the plan's worker as a candidate now (None: not one), ``dev`` the device profile
    limited to the plan's transfer at its cut (None: that transfer is gone)."""
    goal = objective(agent)
    if plan.model_id != agent.model:
        return None
    if not plan.worker_id:
        tiers = [Tier("device", (device,))]
        cons = search_constraints(agent.constraints, device)
        got = search(tiers, Network({}), cons, goal, 1, include_return) if _searchable(cons, tiers) else []
        return got[0] if got else None
    if cand is None or dev is None or cand.address != plan.worker_address:
        return None
    pins = {b: ("device" if b < plan.split_index else cand.tier) for b in range(device.n_blocks)}
    cons = search_constraints(agent.constraints, device, pins)
    if cons is None:  # the agent's pins put a block elsewhere
        return None
    net = Network({(dev.machine, cand.profile.machine): cand.link})
    got = search([Tier("device", (dev,)), Tier(cand.tier, (cand.profile,))], net, cons, goal, 1, include_return)
    return got[0] if got and got[0].hops else None


def to_plan(agent: AgentRecord, device: Profile, r: Ranked, reason: str) -> pb.Plan:
    """The Plan message for a ranked configuration (no version yet: the store assigns it)."""
    cfg = r.config
    plan = pb.Plan(agent_id=agent.id, model_id=agent.model, predicted_seconds=cfg.seconds,
                   predicted_fps=cfg.fps, predicted_bytes=cfg.upload_bytes, reason=reason,
                   created_unix=time.time())
    plan.breakdown_seconds.update(cfg.breakdown())
    if not cfg.hops:
        plan.split_id, plan.split_index = "output", device.n_blocks
    else:
        hop = cfg.hops[0]
        plan.split_id, plan.split_index = hop.split, hop.cut
        plan.codec, plan.tl_id = hop.transfer.codec, hop.transfer.tl_id
        plan.worker_id, plan.worker_address = r.worker_id, r.address
    return plan
