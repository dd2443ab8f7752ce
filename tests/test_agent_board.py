"""The agent's board thread (Agent.executor, runtime.wire.handoff.submit): a frame's board work handed to it and its
result, or its exception, back on the event loop; a frame cancelled or an agent closed while a job is on it; the
stream probes' RTT echoes in the agent's histogram."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
import torch

from runtime.agent.client import Agent
from runtime.agent.config import InitialPlan
from runtime.models.loader import load_model
from runtime.wire.codec import get_codec


@pytest.fixture(scope="module")
def loaded():
    return load_model("digits_cnn")


class Gate(torch.nn.Module):
    """A head that blocks on the board thread until released, then is the model's own."""

    def __init__(self, head):
        super().__init__()
        self.head, self.entered, self.release = head, threading.Event(), threading.Event()
        self.thread = ""

    def forward(self, x):
        self.thread = threading.current_thread().name
        self.entered.set()
        assert self.release.wait(10.0)
        return self.head(x)


async def _entered(gate: Gate) -> None:
    for _ in range(500):  # bounded: 5 s
        if gate.entered.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the head never started on the board thread")


def test_an_exception_in_the_head_reaches_the_caller_and_the_board_lives_on(loaded):
    x = torch.rand(1, 3, 28, 28)

    class Broken(torch.nn.Module):
        def forward(self, h):
            raise RuntimeError("head broke on the board")

    async def main():
        agent = Agent(loaded, InitialPlan(loaded.split("output"), get_codec("raw")))
        agent.inline_board_seconds = 0.0  # every frame on the board thread
        try:
            agent.active = dataclasses.replace(agent.active, head=Broken())
            with pytest.raises(RuntimeError, match="head broke on the board"):
                await agent.infer(x)
            assert agent._board_jobs == 0 and agent._frames == 0
            agent.active = dataclasses.replace(agent.active, head=loaded.head("output"))
            r = await agent.infer(x)
            return r, agent.board_handoffs
        finally:
            await agent.close()

    r, handoffs = asyncio.run(main())
    assert torch.equal(r.output, loaded.full(x)) and handoffs == 2


def test_a_cancelled_frame_leaves_its_job_to_end_and_the_next_frame_runs(loaded):
    x = torch.rand(1, 3, 28, 28)

    async def main():
        agent = Agent(loaded, InitialPlan(loaded.split("output"), get_codec("raw")))
        gate = Gate(loaded.head("output"))
        try:
            agent.active = dataclasses.replace(agent.active, head=gate)
            task = asyncio.create_task(agent.infer(x))
            await _entered(gate)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            busy = agent._board_jobs  # the job still runs on the board: its slot is held
            gate.release.set()
            for _ in range(500):  # bounded: 5 s for the job to end and hand its slot back
                if not agent._board_jobs:
                    break
                await asyncio.sleep(0.01)
            after = agent._board_jobs
            r = await agent.infer(x)
            return busy, after, r, gate.thread
        finally:
            gate.release.set()
            await agent.close()

    busy, after, r, thread = asyncio.run(main())
    assert (busy, after) == (1, 0)
    assert thread.startswith("board") and r.where == "local" and torch.equal(r.output, loaded.full(x))


def test_close_with_a_frame_on_the_board_thread(loaded):
    """close() does not wait for the board's job; the frame in flight still gets its result once the job ends, the
    thread then ends, and a frame after close is refused."""
    x = torch.rand(1, 3, 28, 28)

    async def main():
        agent = Agent(loaded, InitialPlan(loaded.split("output"), get_codec("raw")))
        gate = Gate(loaded.head("output"))
        agent.active = dataclasses.replace(agent.active, head=gate)
        task = asyncio.create_task(agent.infer(x))
        await _entered(gate)
        await asyncio.wait_for(agent.close(), 5.0)  # returns with the job still on the board
        closed_before_job = not task.done()
        gate.release.set()
        r = await asyncio.wait_for(task, 5.0)
        (thread,) = agent.executor._threads  # its one worker
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 5.0)
        agent.inline_board_seconds = 0.0  # (a lone short frame would run on the loop)
        with pytest.raises(RuntimeError, match=r"after (interpreter )?shutdown"):
            await agent.infer(x)
        return closed_before_job, r, thread.is_alive()

    closed_before_job, r, alive = asyncio.run(main())
    assert closed_before_job and not alive
    assert r.where == "local" and torch.equal(r.output, loaded.full(x))


def test_the_streams_idle_probe_echoes_feed_the_rtt_histogram(loaded):
    """EdgeStream.on_rtt (each idle stream probe's round trip, tests/test_stream_probe.py) is read by the agent:
    edgesplit_agent_stream_rtt_seconds."""
    async def main():
        agent = Agent(loaded, InitialPlan(loaded.split("output"), get_codec("raw")))
        try:
            stream = agent._new_stream("127.0.0.1:1")  # not opened: the hook is set when the stream is made
            assert stream.on_rtt is not None
            stream.on_rtt(0.0007)
            stream.on_rtt(0.003)
            return agent.metrics.registry
        finally:
            await agent.close()

    reg = asyncio.run(main())
    name = "edgesplit_agent_stream_rtt_seconds"
    assert reg.get_sample_value(f"{name}_count") == 2
    assert reg.get_sample_value(f"{name}_bucket", {"le": "0.001"}) == 1
    assert abs(reg.get_sample_value(f"{name}_sum") - 0.0037) < 1e-9
