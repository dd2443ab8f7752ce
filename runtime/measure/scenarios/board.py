"""The board's head times, as every strategy's cost model sees them.

One factor (local p50 / the sum of per-block medians) fixes the whole model's time on the board but not how it
splits between head and tail: the quota's ~45 ms stalls land in whichever blocks cross a period's end, and in the
run of 2026-12-03 a 33-of-94-block EfficientNet-Lite0 head was priced at ~250 ms and took ~360 ms with its
encode. So the harness prices heads from what the board measured:

* a prior for every cut at once: the median, over whole passes through the blocks, of the time from the pass's
  start to the end of each block (:func:`runtime.measure.scenarios.device.prefix_heads`), scaled so the whole
  model takes the local run's p50;
* before the first plans, each strategy's best few heads by that prior (``--head-candidates`` per strategy and
  link, default 3; ``--head-budget-s`` seconds of board time at most, best first), timed on their own (below);
* every head a strategy picks and not timed yet, timed on its own on the board (head, TL encoder, codec encode, as
  the agent runs them); the plans are made again with those times, and a newly picked head is timed in turn (at
  most ``rounds`` times).

A head is timed as a frame runs when frames go one at a time: after the board sat idle for one quota period (it
does while the frame's bytes cross the link and the edge runs the tail), so it starts with the period's whole
budget. Timed back to back instead, a small head waited for the next period (MobileNetV2's features_0_0: 23.9 ms
on its own against 1.0 ms in whole passes on 2026-12-03) and a large one paid stalls a frame after an idle link
does not (:func:`runtime.measure.scenarios.device.time_heads`).

The same profile goes to Scission, ScissionLite and edgesplit (each derives its transfers from it)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from runtime.contracts.costmodel import Link
from runtime.contracts.profile import Profile, Transfer
from runtime.measure.scenarios import costs

PEERS = ("scission", "scissionlite", "edgesplit")  # the strategies whose plans come from a cost model


@dataclass
class Heads:
    """Board head times: the prefix prior, and the heads timed on their own (cut -> ms per frame)."""

    prefix_ms: list[float]  # prior head time per cut (0 .. n), medians of whole passes
    prefix_runs: int
    total_ms: float  # the whole model on the board: the local run's p50
    head_ms: dict[int, list[float]] = field(default_factory=dict)
    encode_ms: dict[tuple[int, str], list[float]] = field(default_factory=dict)  # (cut, transfer) -> TL + codec
    timed: list[dict] = field(default_factory=list)  # what was timed, in order, with sample counts
    skipped: list[dict] = field(default_factory=list)  # candidate heads left untimed when the time budget ran out

    def curve(self) -> tuple[list[float], float]:
        return costs.head_curve(self.prefix_ms, {k: statistics.median(v) for k, v in self.head_ms.items()},
                                self.total_ms)

    def apply(self, dev: Profile) -> Profile:
        """``dev`` whose heads cost what the board measured (and the timed encodes theirs)."""
        out = costs.with_board_heads(dev, self.curve()[0])
        for (cut, name), ms in self.encode_ms.items():
            out = costs.with_encode(out, cut, name, statistics.median(ms) / 1e3)
        return out

    def wanted(self, plans: dict, names: list[str], tl_path: str) -> list[dict]:
        """The picked heads (and transfers) not timed yet, one entry per cut (the input cut has no head; its codecs
        are timed frame by frame)."""
        out: dict[int, dict] = {}
        for p in plans.values():
            for k in PEERS:
                job = p.get(k)
                if not job or job["split"] == names[0]:
                    continue
                cut = names.index(job["split"])
                if (cut, job["transfer"]) in self.encode_ms:
                    continue
                own = job["tl_id"] and job["tl_id"] != costs.REFERENCE_TL  # ScissionLite's pool: not in its model
                c = out.setdefault(cut, {"split": job["split"], "cut": cut, "transfers": []})
                if all(t["transfer"] != job["transfer"] for t in c["transfers"]):
                    c["transfers"].append({"transfer": job["transfer"], "codec": job["codec"],
                                           "tl": tl_path if own else ""})
        return list(out.values())

    def add(self, got: list[dict], why: str = "picked") -> None:
        for g in got:
            self.head_ms.setdefault(g["cut"], []).extend(g["head_ms"])
            for t in g["transfers"]:
                ms = [a + b for a, b in zip(t["tl_ms"], t["encode_ms"], strict=True)]
                self.encode_ms[(g["cut"], t["transfer"])] = ms
                self.timed.append({"split": g["split"], "cut": g["cut"], "transfer": t["transfer"],
                                   "head_ms": statistics.median(g["head_ms"]), "prior_ms": self.prefix_ms[g["cut"]],
                                   "encode_ms": statistics.median(ms), "frames": len(g["head_ms"]), "why": why})

    def summary(self) -> dict:
        curve, scale = self.curve()
        return {"prefix_runs": self.prefix_runs, "prefix_scaled_by": scale, "timed": self.timed,
                "curve_ms": curve, "skipped": self.skipped}


def estimate_ms(dev: Profile, edge: Profile, link: Link, cut: int, t: Transfer) -> float:
    """The first estimate of a two-tier plan cut after ``cut`` blocks that sends ``t``: the board's head and encode,
    the bytes over the link and its RTT, the edge's decode and tail (the result's way back, the same for every cut,
    left out)."""
    head = sum(b.seconds for b in dev.blocks[:cut])
    tail = sum(b.seconds for b in edge.blocks[cut:])
    dec = next((e.decode_seconds for e in edge.transfers_after(cut) if e.name == t.name), 0.0)
    return (head + t.encode_seconds + t.bytes / link.bandwidth_bytes_per_second + link.rtt_seconds + dec + tail) * 1e3


def top_heads(peers: dict[str, tuple[Profile, Profile, float]], links: list[Link], per_link: int, names: list[str],
              tl_path: str, done: Heads) -> list[dict]:
    """Each strategy's best ``per_link`` heads (distinct cuts, neither the input nor the whole model) on each link by
    :func:`estimate_ms`, transfers below the strategy's fidelity floor (where measured) left out, with the transfers
    that made them; those not timed yet, best first (the first of every strategy and link, then the second...), in
    the shape :meth:`Heads.wanted` gives. ``peers``: strategy -> (device profile, edge profile, fidelity floor)."""
    ranked: list[list[tuple[int, Transfer]]] = []
    for dev, edge, floor in peers.values():
        for link in links:
            scored = sorted((estimate_ms(dev, edge, link, k, t), k, t) for k in range(1, dev.n_blocks)
                            for t in dev.transfers_after(k) if t.fidelity is None or t.fidelity >= floor)
            best: dict[int, Transfer] = {}
            for _, k, t in scored:
                if len(best) == per_link:
                    break
                best.setdefault(k, t)
            ranked.append(list(best.items()))
    out: dict[int, dict] = {}
    for i in range(per_link):
        for picks in ranked:
            if i >= len(picks):
                continue
            k, t = picks[i]
            if (k, t.name) in done.encode_ms:
                continue
            own = t.tl_id and t.tl_id != costs.REFERENCE_TL
            c = out.setdefault(k, {"split": names[k], "cut": k, "transfers": []})
            if all(x["transfer"] != t.name for x in c["transfers"]):
                c["transfers"].append({"transfer": t.name, "codec": t.codec, "tl": tl_path if own else ""})
    return list(out.values())


def plan_with_board_heads(heads: Heads, dev: Profile, plan: Callable[[Profile], dict], time: Callable[..., list],
                          names: list[str], tl_path: str, rounds: int = 3,
                          candidates: Callable[[Profile], list[dict]] | None = None,
                          budget_s: float | None = None) -> tuple[dict, Profile]:
    """Plan every strategy on ``dev`` with the board's heads; time the picked heads not timed yet (``time``: the
    board child), plan again; until nothing new is picked or ``rounds`` timings were made. With ``candidates``
    (:func:`top_heads` on the priced profile), those heads are timed first, within ``budget_s`` seconds of the
    board's time (``time(todo, budget_s)`` returns the ones it timed). Returns (plans, dev)."""
    priced = heads.apply(dev)
    if candidates is not None:
        todo = candidates(priced)
        if todo:
            got = time(todo, budget_s)
            heads.add(got, "candidate")
            timed = {g["cut"] for g in got}
            heads.skipped.extend({"split": c["split"], "cut": c["cut"]} for c in todo if c["cut"] not in timed)
            priced = heads.apply(dev)
    plans = plan(priced)
    for _ in range(rounds):
        todo = heads.wanted(plans, names, tl_path)
        if not todo:
            break
        heads.add(time(todo))
        priced = heads.apply(dev)
        plans = plan(priced)
    return plans, priced
