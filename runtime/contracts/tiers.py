"""Tier names: where a slice of a model may run. The one place they are spelled.

A profile's ``role``, a worker's registered tier, the cost model's tiers, constraints' pins and
the CLI's choices all use these strings.
"""

from __future__ import annotations

DEVICE = "device"  # the board: frames start here
EDGE = "edge"  # an edge worker, one hop from the board
CLOUD = "cloud"  # a worker one hop behind an edge worker

TIERS: tuple[str, ...] = (DEVICE, EDGE, CLOUD)  # in the order a frame crosses them
WORKER_TIERS: tuple[str, ...] = (EDGE, CLOUD)  # the tiers a worker may register as
