"""One frame's result as the agent reports it (exactly one per frame, edge or local)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class FrameResult:
    """Exactly one per frame, whether it ran on the edge or locally."""

    seq: int
    frame: str
    output: torch.Tensor
    where: str  # "edge" or "local"
    split: str
    codec: str
    plan_version: int = 0
    fallback_reason: str = ""
    wire_bytes: int = 0
    raw_bytes: int = 0  # the split's output as the head computed it (before TL and codec); metric raw_bytes
    times: dict[str, float] = field(default_factory=dict)  # seconds by stage
    refined: bool = False  # an ambiguous edge result replaced by the board's exact tail (see refine_margin)
    worker: str = ""  # address of the worker the frame was sent to ("" when none): its link's key in self.link
    sent_at: float = 0.0  # time.perf_counter() when it was handed to its link (0.0: never sent; runtime.agent.edge)
    predicted_seconds: float = 0.0  # the plan's predicted latency (0: no prediction; set by the planner link)
    # a frame through a parallel stage: per worker that computed tiles of it (the stage's workers, "local"),
    # each tile's round trip in seconds, and per stage worker its failed tile attempts (runtime.agent.parallel_push)
    tile_seconds: dict[str, list[float]] = field(default_factory=dict)
    tile_failures: dict[str, int] = field(default_factory=dict)

    def top1(self) -> tuple[int, float]:
        probs = torch.softmax(self.output.reshape(-1).float(), dim=0)
        score, idx = probs.max(dim=0)
        return int(idx), float(score)

    def to_json(self, labels: tuple[str, ...] | None) -> dict:
        idx, score = self.top1()
        return {
            "seq": self.seq,
            "frame": self.frame,
            "class_index": idx,
            "label": labels[idx] if labels and idx < len(labels) else None,
            "score": round(score, 6),
            "where": self.where,
            "fallback_reason": self.fallback_reason or None,
            "split": self.split,
            "codec": self.codec,
            "plan_version": self.plan_version,
            "wire_bytes": self.wire_bytes,
            "refined": self.refined,
            "times_ms": {k: round(v * 1e3, 3) for k, v in self.times.items()},
            "predicted_ms": round(self.predicted_seconds * 1e3, 3) if self.predicted_seconds else None,
            **({"tile_ms": {w: [round(v * 1e3, 3) for v in vs] for w, vs in self.tile_seconds.items()},
                "tile_failures": self.tile_failures} if self.tile_seconds or self.tile_failures else {}),
        }


def top1_margin(output: torch.Tensor) -> float:
    """p1 - p2 of the softmax over a result's scores (1.0 when there is a single score)."""
    scores = output.reshape(-1).float()
    if scores.numel() < 2:
        return 1.0
    top = torch.softmax(scores, 0).topk(2).values
    return float(top[0] - top[1])
