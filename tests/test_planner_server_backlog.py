"""A burst of calls larger than gRPC core's default backlog of calls not yet taken by the server
(planner.server.SERVER_ARGS): when a replica dies, the survivor gets three calls per agent at once.
With core's defaults (1,000 soft / 3,000 hard) the excess ended CANCELLED "CANCELLED" at the caller,
without reaching the planner."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from planner.server import PENDING_CALLS
from tests.planner_procs import kill, start_planner

pytestmark = pytest.mark.timeout(120)

BURST = 4_000  # above core's default hard limit (3,000), below PENDING_CALLS


def test_a_burst_past_cores_default_backlog_is_served_not_cancelled(tmp_path):
    assert BURST < PENDING_CALLS
    p, address = start_planner(str(tmp_path / "p.sqlite"), tmp_path)
    try:
        async def main() -> collections.Counter:
            channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1), ("n", i)])
                        for i in range(4)]
            try:
                stubs = [health_pb2_grpc.HealthStub(c) for c in channels]
                for s in stubs:
                    await s.Check(health_pb2.HealthCheckRequest(), timeout=10)

                async def one(i: int) -> str:
                    try:
                        await stubs[i % 4].Check(health_pb2.HealthCheckRequest(), timeout=60)
                        return "OK"
                    except grpc.aio.AioRpcError as e:
                        return f"{e.code().name}: {e.details()}"

                os.kill(p.pid, signal.SIGSTOP)  # the calls pile up; once it runs, core holds them all at once
                try:
                    calls = [asyncio.ensure_future(one(i)) for i in range(BURST)]
                    t = time.monotonic()
                    while time.monotonic() - t < 1.0:
                        await asyncio.sleep(0.05)  # let the client send them
                finally:
                    os.kill(p.pid, signal.SIGCONT)
                return collections.Counter(await asyncio.gather(*calls))
            finally:
                for c in channels:
                    await c.close()

        outcomes = asyncio.run(main())
    finally:
        kill(p)
    assert outcomes == {"OK": BURST}
