"""The worker's receive and send times in each streamed result (issue 11): the agent takes the
worker's whole hold off its round trip, so every frame gives a bandwidth sample that the worker's
queueing does not bias, and a chunked frame shows how long its bytes took to arrive."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.timeout(120)


def test_edge_held_replaces_the_worker_stages_in_the_bandwidth_sample():
    import torch

    from runtime.agent.frame import FrameResult
    from runtime.agent.telemetry import LinkEstimator

    link = LinkEstimator()
    r = FrameResult(0, "f", torch.empty(0), "edge", "s", "raw", wire_bytes=100_000, worker="w")
    # 0.2 s end to end; the stages say 0.05 s of work, but the worker held the frame 0.1 s (admission, send wait)
    r.times = {"transfer_edge": 0.2, "edge_queue": 0.0, "edge_decode": 0.01, "edge_tail": 0.04, "edge_held": 0.1}
    link.observe(r)
    assert link.estimate("w").bandwidth.value == pytest.approx(100_000 / 0.1)


def test_streamed_results_carry_the_worker_receive_and_send_times(capsys):
    import torch

    from runtime.agent.client import Agent
    from runtime.agent.config import AgentOptions, InitialPlan
    from runtime.models.loader import load_model
    from runtime.tools.netem import DelayProxy, LinkShape
    from runtime.wire.codec import get_codec
    from runtime.wire.transport import TransportOptions
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    torch.set_num_threads(1)
    loaded = load_model("resnet18")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rate = 2_000_000.0  # 16 Mbit/s

    async def go():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1))
        proxy = await DelayProxy(f"127.0.0.1:{ws.port}", LinkShape(0.005, rate)).start()
        agent = Agent(loaded, InitialPlan(loaded.split("add_2"), get_codec("raw"), worker=proxy.address),
                      AgentOptions(deadline_seconds=30.0, transport=TransportOptions(chunk_bytes=256 * 1024)))
        try:
            await agent.start()
            results = [await agent.infer(x) for _ in range(4)]
            return results, agent.link.estimate(proxy.address).bandwidth.value
        finally:
            await agent.close()
            await proxy.close()
            await ws.drain_and_stop(0.5)

    results, bandwidth = asyncio.run(go())
    assert all(r.where == "edge" for r in results)
    for r in results:
        t = r.times
        # 401 KB in two 256 KiB chunks: the second (~140 KB) arrives after the first, paced by the link
        assert t["edge_receive"] > 0.5 * (r.wire_bytes - 256 * 1024) / rate
        assert t["edge_queue"] + t["edge_decode"] + t["edge_tail"] <= t["edge_held"] < t["transfer_edge"]
    assert 0.5 * rate < bandwidth < 1.5 * rate
    with capsys.disabled():
        print(f"\n16 Mbit/s relay: receive {results[-1].times['edge_receive'] * 1e3:.1f} ms, held "
              f"{results[-1].times['edge_held'] * 1e3:.1f} ms, estimate {bandwidth * 8 / 1e6:.2f} Mbit/s")
