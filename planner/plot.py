"""Per-split latency stacked into device / transfer / edge (the picture Scission users read)."""

from __future__ import annotations

from planner.search import NO_CONSTRAINTS, search
from runtime.contracts.costmodel import Constraints, Network, Tier
from runtime.contracts.errors import InvalidInput
from runtime.contracts.tiers import CLOUD, DEVICE, EDGE


def per_split(tiers: list[Tier], network: Network, constraints: Constraints = NO_CONSTRAINTS,
              include_return: bool = True) -> list[tuple[int, str, dict[str, float]]]:
    """For every number of device blocks a: (a, split name, seconds by part) of the best configuration."""
    n = tiers[0].profiles[0].n_blocks
    names = ["input"] + [b.name for b in tiers[0].profiles[0].blocks]
    rows = []
    for a in range(n + 1):
        pins = dict(constraints.pin_blocks)
        forbid = dict(constraints.forbid_blocks)
        if a > 0:
            if pins.get(a - 1, tiers[0].name) != tiers[0].name:
                continue
            pins[a - 1] = tiers[0].name
        if a < n:
            forbid[a] = forbid.get(a, frozenset()) | {tiers[0].name}
        cons = Constraints(**{**constraints.__dict__, "pin_blocks": pins, "forbid_blocks": forbid})
        best = search(tiers, network, cons, top_n=1, include_return=include_return)
        if not best:
            continue
        c = best[0]
        parts = {DEVICE: c.stages[0].seconds}
        parts["network"] = sum(h.rtt_seconds + h.transfer_seconds + h.return_seconds for h in c.hops)
        for s in c.stages[1:]:
            parts[s.tier] = parts.get(s.tier, 0.0) + s.seconds
        rows.append((a, names[a] if a < n else "local", parts))
    return rows


def plot_splits(tiers: list[Tier], network: Network, constraints: Constraints, path: str,
                include_return: bool = True) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidInput("--plot needs matplotlib: pip install 'edgesplit[plot]'") from None
    rows = per_split(tiers, network, constraints, include_return)
    if not rows:
        raise InvalidInput("no split satisfies the constraints; nothing to plot")
    parts = [DEVICE, "network"] + [t.name for t in tiers[1:]]
    colors = {DEVICE: "#4c72b0", "network": "#dd8452", EDGE: "#55a868", CLOUD: "#8172b3"}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(rows) + 2), 4.2))
    x = list(range(len(rows)))
    bottom = [0.0] * len(rows)
    for part in parts:
        vals = [r[2].get(part, 0.0) for r in rows]
        ax.bar(x, vals, bottom=bottom, label=part, color=colors.get(part))
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    best = min(range(len(rows)), key=lambda i: bottom[i])
    ax.annotate("best", (best, bottom[best]), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    step = max(1, len(rows) // 30)
    ax.set_xticks(x[::step])
    ax.set_xticklabels([f"{r[0]}" for r in rows][::step], fontsize=7)
    p0 = tiers[0].profiles[0]
    ax.set_xlabel("blocks run on the device (split after block)")
    ax.set_ylabel("predicted end-to-end latency (s)")
    ax.set_title(f"{p0.model}: {' / '.join(t.name for t in tiers)}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
