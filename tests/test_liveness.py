"""Liveness (issue 10 part 6): a silent partition (the project's relay swallowing every byte, no RST)
is noticed by gRPC keep-alive, every frame still gets exactly one result, and the reconnect back-off
stays within 2 s. The detection time is printed (a figure, not an assertion on speed)."""

from __future__ import annotations

import asyncio
import time

import pytest

from runtime.wire.asyncutil import Backoff
from runtime.wire.stream import BACKOFF_JITTER, MAX_BACKOFF_SECONDS
from runtime.wire.transport import TransportOptions

pytestmark = pytest.mark.timeout(120)


def test_defaults_detect_within_eleven_seconds_and_back_off_at_most_two():
    t = TransportOptions()
    # detection bound: a ping every second, dead after 10 s unanswered (a slow link's queued frame
    # must not count as a partition: one 400 KB frame at 1.6 Mbit/s holds a ping 2 s)
    assert t.keepalive_time_ms + t.keepalive_timeout_ms <= 11_000
    assert t.keepalive_timeout_ms >= 5_000
    server = dict(t.server_options())
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= t.keepalive_time_ms  # the pings are welcome
    b = Backoff(1.0, max(1.0, MAX_BACKOFF_SECONDS), jitter=BACKOFF_JITTER)
    delays = [b.next() for _ in range(20)]
    assert max(delays) <= 2.0 and min(delays) >= 0.5


def test_a_silent_partition_is_detected_and_every_frame_gets_one_result(capsys):
    import torch

    from runtime.agent.client import Agent
    from runtime.agent.config import AgentOptions, InitialPlan
    from runtime.models.loader import load_model
    from runtime.tools.netem import DelayProxy
    from runtime.wire.codec import get_codec
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    torch.set_num_threads(1)
    loaded = load_model("digits_cnn")
    x = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))

    async def go():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1))
        proxy = await DelayProxy(f"127.0.0.1:{ws.port}").start()
        plan = InitialPlan(loaded.split("pool1"), get_codec("raw"), worker=proxy.address)
        agent = Agent(loaded, plan, AgentOptions(deadline_seconds=30.0, connect_timeout=2.0))  # far above 2 s
        try:
            await agent.start()
            before = [await agent.infer(x) for _ in range(3)]
            assert [r.where for r in before] == ["edge"] * 3
            stream = agent._streams[proxy.address]
            proxy.blackhole = True
            cut = time.monotonic()
            during = asyncio.gather(*(agent.infer(x) for _ in range(3)))
            while stream.is_open and time.monotonic() - cut < 20.0:
                await asyncio.sleep(0.05)
            detected = time.monotonic() - cut
            results = await asyncio.wait_for(during, 30.0)
            return before, results, detected, stream.is_open
        finally:
            await agent.close()
            await proxy.close()
            await ws.drain_and_stop(0.5)

    before, results, detected, still_open = asyncio.run(go())
    assert not still_open, "the dead stream was never declared dead"
    assert len(results) == 3 and all(r.where == "local" for r in results)  # one result each, run on the board
    assert all(r.top1()[0] == before[0].top1()[0] for r in results)
    with capsys.disabled():
        print(f"\nsilent partition detected after {detected:.2f} s (keep-alive 1 s + 10 s)")
