"""The metrics behind the dashboard's compression-ratio and split-index panels hold what the panels say:
raw bytes (the split's output before TL and codec) over sent bytes for the same frames, and the split
point index of the plan in effect (real agent and worker on loopback)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from runtime.agent.client import Agent
from runtime.agent.config import AgentOptions, InitialPlan
from runtime.models.loader import load_model
from runtime.wire.codec import get_codec
from runtime.worker.config import WorkerConfig
from runtime.worker.server import serve

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(120)]


def test_compression_ratio_and_split_index_metrics():
    loaded = load_model("digits_cnn")
    frames = [torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    async def scenario():
        worker = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1))
        agent = Agent(loaded, InitialPlan(loaded.split("pool1"), get_codec("int8+lz4"), worker=f"127.0.0.1:{worker.port}"),
                      AgentOptions(deadline_seconds=30.0))
        try:
            await agent.start()
            results = [await agent.infer(x) for x in frames]
            await agent.apply_plan("pool2", "raw", version=2)
            return agent, results, await agent.infer(frames[0])
        finally:
            await agent.close()
            await worker.drain_and_stop(1.0)

    agent, results, after = asyncio.run(scenario())
    assert all(r.where == "edge" for r in (*results, after)), [r.fallback_reason for r in results]
    reg = agent.metrics.registry
    raw, sent = (reg.get_sample_value(f"edgesplit_agent_{m}_bytes_total") for m in ("raw", "sent"))
    pool1 = 16 * 14 * 14 * 4  # fp32 [1, 16, 14, 14]
    pool2 = 32 * 7 * 7 * 4  # fp32 [1, 32, 7, 7], sent raw after the switch
    assert raw == 3 * pool1 + pool2
    assert sent == sum(r.wire_bytes for r in results) + after.wire_bytes
    assert 3 * pool1 / sum(r.wire_bytes for r in results) > 2  # int8+lz4: the panel shows a real ratio
    assert reg.get_sample_value("edgesplit_agent_plan_split_index") == loaded.split("pool2").index
