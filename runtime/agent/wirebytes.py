"""Bytes on the wire per frame and the board's encode time, per (split, codec), as the agent measured them.

A profile's transfer bytes are those of its calibration inputs: a JPEG of a photo, an int8 map of one
image. The frames a board sends can differ a great deal (issue 11: MobileNetV2's JPEG of noise frames
was 12.9 KB against the profile's 4-6 KB, so at 0.1 Mbit/s the planner kept a plan that took three
times its prediction), and the board's own encode time differs from the profiling machine's (a JPEG
encode of 0.96 ms in the profile took 7-11 ms on the quota-limited board). Every frame sent to a worker
gives one sample of both; the planner prices those transfers with them (Telemetry.wire) and falls back
to the profile where a (split, codec) was never measured, or was measured more than its TTL ago.

* bytes: an EWMA (weight ``ALPHA``) of ``FrameResult.wire_bytes``; the first sample sets it;
* encode: the median of the last ``WINDOW`` encode stages (a frame that waited for the GIL is one
  outlier, not a trend);
* each entry carries its sample count and the time of its last sample; at most ``MAX_ENTRIES`` are
  kept (the oldest goes), and a report holds those measured within ``max_age`` seconds.
"""

from __future__ import annotations

import statistics
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ALPHA = 0.3  # EWMA weight of a new bytes sample
WINDOW = 16  # encode samples the median is taken over
MAX_ENTRIES = 64  # (split, codec) pairs kept (and reported at most)
MAX_AGE_SECONDS = 300.0  # an entry with no sample for this long is not reported


@dataclass
class WireEntry:
    mean_bytes: float = 0.0
    samples: int = 0
    updated: float = 0.0  # clock time of the last sample
    encodes: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))

    @property
    def encode_seconds(self) -> float:
        """Median of the recent encode stages; 0.0 when none was timed."""
        return statistics.median(self.encodes) if self.encodes else 0.0


class WireTable:
    """Per (split, codec): smoothed bytes per frame and median encode time over the frames sent to a worker."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, alpha: float = ALPHA,
                 max_age: float = MAX_AGE_SECONDS) -> None:
        if not (0 < alpha <= 1 and max_age > 0):
            raise ValueError(f"alpha must be in (0, 1] and max_age > 0, got {alpha}, {max_age}")
        self.clock, self.alpha, self.max_age = clock, alpha, max_age
        self.entries: OrderedDict[tuple[str, str], WireEntry] = OrderedDict()

    def observe(self, result: Any, encode: bool = True) -> bool:
        """One finished frame (a FrameResult); True when it gave a sample (it was sent to a worker). ``encode``
        False: its bytes count, its encode time does not (a configuration's start-up frames, runtime.agent.telemetry:
        a JPEG encode priced at 14.8 ms from them against 1.5 ms after, issue 11)."""
        if result.where != "edge" or result.wire_bytes <= 0 or not result.split or not result.codec:
            return False
        key = (result.split, result.codec)
        e = self.entries.pop(key, None) or WireEntry()
        self.entries[key] = e  # the most recent last
        while len(self.entries) > MAX_ENTRIES:
            self.entries.popitem(last=False)
        b = float(result.wire_bytes)
        e.mean_bytes = b if e.samples == 0 else self.alpha * b + (1 - self.alpha) * e.mean_bytes
        e.samples += 1
        e.updated = self.clock()
        enc = result.times.get("encode")
        if encode and enc is not None and enc >= 0:
            e.encodes.append(enc)
        return True

    def mean(self, split: str, codec: str) -> float:
        """Smoothed bytes per frame of (split, codec); 0.0 when never measured."""
        e = self.entries.get((split, codec))
        return e.mean_bytes if e is not None else 0.0

    def report(self) -> list[tuple[str, str, float, float, int, float]]:
        """(split, codec, mean bytes, encode seconds, samples, age seconds) of the entries measured
        within ``max_age``, most recent first."""
        now = self.clock()
        out = []
        for (split, codec), e in reversed(self.entries.items()):
            age = max(0.0, now - e.updated)
            if e.samples and age <= self.max_age:
                out.append((split, codec, e.mean_bytes, e.encode_seconds, e.samples, age))
        return out
