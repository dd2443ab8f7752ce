"""InFlight's watcher is a timer (issue 14): frames answered within ``min_late_seconds`` are never looked at
and leave nothing scheduled; a frame in flight longer is looked at every ``period`` until it is answered."""

from __future__ import annotations

import asyncio

import pytest

from runtime.agent.inflight import InFlight
from runtime.agent.telemetry import LinkEstimator

pytestmark = pytest.mark.timeout(60)

FAST = 50e6  # bytes/s


def _counting(flight: InFlight) -> list[float]:
    looks: list[float] = []
    look = flight.look

    def counted(now: float) -> int:
        looks.append(now)
        return look(now)

    flight.look = counted  # type: ignore[method-assign]
    return looks


def test_frames_answered_before_they_could_be_late_are_never_looked_at():
    async def scenario():
        link = LinkEstimator()
        link.add_bandwidth_sample(FAST, "w:1")
        flight = InFlight(link, min_late_seconds=0.1)
        looks = _counting(flight)
        for seq in range(20):
            flight.sent("w:1", seq, 10_000)
            await asyncio.sleep(0.005)
            flight.done("w:1", seq, 10_000)
        armed = flight._timer
        await asyncio.sleep(0.2)
        await flight.close()
        return looks, armed, flight.bytes("w:1")

    looks, armed, left = asyncio.run(scenario())
    assert looks == [] and armed is None and left == 0


def test_a_frame_in_flight_is_looked_at_every_period_after_min_late_until_answered():
    async def scenario():
        link = LinkEstimator()
        link.add_bandwidth_sample(FAST, "w:1")
        flight = InFlight(link, min_late_seconds=0.1, period=0.05)
        looks = _counting(flight)
        flight.sent("w:1", 1, 10_000)
        flight.sent("w:1", 2, 10_000)  # a second frame does not add a second timer
        await asyncio.sleep(0.33)
        flight.done("w:1", 1, 10_000)
        during = len(looks)
        await asyncio.sleep(0.1)
        flight.done("w:1", 2, 10_000)
        after = len(looks)
        await asyncio.sleep(0.2)
        await flight.close()
        return during, after, len(looks), flight.late

    during, after, total, late = asyncio.run(scenario())
    assert 2 <= during <= 6  # at ~0.10, 0.15, ... 0.30 s (fewer when this machine's loop runs late)
    assert after > during and total == after  # nothing looked at once the last frame was answered
    assert late == 2  # both were far past 3x their 0.2 ms at FAST: taken as late
