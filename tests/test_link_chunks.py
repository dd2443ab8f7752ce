"""A frame's stream messages sized by its link (runtime.wire.transport.link_chunk_bytes, issue 14): one message up to
the cap on a fast measured link, what the link carries in 0.25 s on a slow one, 256 KiB while it is unmeasured; the
agent's configured cap is checked."""

from __future__ import annotations

import asyncio

import pytest

from runtime.wire.transport import (
    CHUNK_SECONDS,
    MIN_CHUNK_BYTES,
    UNMEASURED_CHUNK_BYTES,
    MiB,
    link_chunk_bytes,
)

pytestmark = pytest.mark.timeout(120)


def test_chunk_follows_the_link_within_its_bounds():
    assert link_chunk_bytes(MiB, 0.0) == UNMEASURED_CHUNK_BYTES  # unknown is not fast
    assert link_chunk_bytes(100_000, 0.0) == 100_000  # the cap holds for an unmeasured link too
    assert link_chunk_bytes(MiB, 20e6 / 8) == int(20e6 / 8 * CHUNK_SECONDS)  # 20 Mbit/s: 625 KB
    assert link_chunk_bytes(MiB, 1.6e6 / 8) == MIN_CHUNK_BYTES  # 1.6 Mbit/s: 50 KB in 0.25 s, the floor
    assert link_chunk_bytes(MiB, 800e6) == MiB  # loopback: the cap
    assert link_chunk_bytes(8 * 1024, 800e6) == 8 * 1024  # a cap under the floor wins
    from runtime.wire.transport import TransportOptions
    from runtime.worker.config import WorkerConfig

    assert link_chunk_bytes(TransportOptions().chunk_bytes, 800e6) == 4 * MiB  # frames up to 4 MiB: one message
    assert WorkerConfig().transport().chunk_bytes == MiB  # the worker's forwards: no link estimate, 1 MiB as before


def test_an_old_bandwidth_figure_sizes_nothing():
    import time
    from types import SimpleNamespace

    from runtime.agent.edge import CHUNK_FIGURE_MAX_AGE_SECONDS, EdgeSender
    from runtime.agent.telemetry import LinkEstimator
    from runtime.wire.transport import TransportOptions

    link = LinkEstimator()
    sender = EdgeSender(link, None, None, 2.0)  # type: ignore[arg-type]  # only the link is read here
    stream = SimpleNamespace(address="w:1", transport=TransportOptions())
    assert sender._chunk_bytes(stream) == UNMEASURED_CHUNK_BYTES  # never measured
    now = time.monotonic()
    link.add_bandwidth_sample(800e6, "w:1")
    assert sender._chunk_bytes(stream) == 4 * MiB  # fresh and fast: the cap
    link.estimate("w:1").bandwidth.updated = now - CHUNK_FIGURE_MAX_AGE_SECONDS - 1
    assert sender._chunk_bytes(stream) == UNMEASURED_CHUNK_BYTES  # old: unknown again, not fast


def test_agent_config_checks_its_chunk_cap():
    from runtime.agent.config import AgentConfig
    from runtime.contracts.errors import InvalidInput

    assert AgentConfig(worker="127.0.0.1:1", model="resnet18").chunk_bytes == 4 * MiB
    for bad in (0, 1000, 8 * MiB):
        with pytest.raises(InvalidInput, match="chunk_bytes must be"):
            AgentConfig(worker="127.0.0.1:1", model="resnet18", chunk_bytes=bad)


def test_agent_sends_one_message_on_a_fast_link_and_chunks_on_a_slow_one(monkeypatch):
    import torch

    import runtime.wire.stream as stream
    from runtime.agent.client import Agent
    from runtime.agent.config import AgentOptions, InitialPlan
    from runtime.models.loader import load_model
    from runtime.tools.netem import DelayProxy, LinkShape
    from runtime.wire.codec import get_codec
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    counts: list[int] = []
    real = stream.frame_messages

    def counted(request, chunk_bytes):
        msgs = real(request, chunk_bytes)
        counts.append(len(msgs))
        return msgs

    monkeypatch.setattr(stream, "frame_messages", counted)
    torch.set_num_threads(1)
    loaded = load_model("resnet18")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))  # add_2 raw: 401,408 bytes
    slow = 500_000.0  # 4 Mbit/s: 125 KB in 0.25 s

    async def frames(address: str, n: int) -> tuple[list[int], float]:
        agent = Agent(loaded, InitialPlan(loaded.split("add_2"), get_codec("raw"), worker=address),
                      AgentOptions(deadline_seconds=30.0))  # the transport's default cap, 4 MiB
        counts.clear()
        try:
            await agent.start()
            results = [await agent.infer(x) for _ in range(n)]
            assert all(r.where == "edge" for r in results)
            return list(counts), agent.link.estimate(address).bandwidth.value
        finally:
            await agent.close()

    async def go():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1))
        proxy = await DelayProxy(f"127.0.0.1:{ws.port}", LinkShape(0.002, slow)).start()
        try:
            return await frames(f"127.0.0.1:{ws.port}", 4), await frames(proxy.address, 3)
        finally:
            await proxy.close()
            await ws.drain_and_stop(0.5)

    (fast_counts, fast_bw), (slow_counts, slow_bw) = asyncio.run(go())
    # first frame: the link not measured yet, 256 KiB messages; then loopback is fast: the whole frame in one
    assert fast_counts[0] == 2 and fast_counts[1:] == [1, 1, 1], (fast_counts, fast_bw)
    assert slow_counts[0] == 2, slow_counts
    # measured at ~0.5 MB/s: what it carries in 0.25 s, ~125 KB a message (the estimate moves frame to frame)
    assert 0.5 * slow < slow_bw < 1.5 * slow
    assert all(c >= 3 for c in slow_counts[1:]), (slow_counts, slow_bw)
