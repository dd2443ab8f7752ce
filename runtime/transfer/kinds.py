"""The Transfer Layer kinds and bottleneck ratios, without torch (the CLI's choices need them)."""

from __future__ import annotations

KINDS = ("reference", "bottleneck", "transform")
RATIOS = (2, 4, 5, 6, 8, 12, 16, 20, 24, 32, 64)  # >= 8: 2x2 pooling, channels / (R / 4)
