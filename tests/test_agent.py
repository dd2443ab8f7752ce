"""Agent semantics in-process: every frame gets exactly one result, whatever the worker does."""

from __future__ import annotations

import asyncio

import pytest
import torch

from runtime.agent.client import Agent
from runtime.agent.config import AgentOptions, InitialPlan
from runtime.agent.sources import open_source
from runtime.models.loader import load_model
from runtime.wire.codec import get_codec
from runtime.worker.config import WorkerConfig
from runtime.worker.server import serve

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

SPLIT = "add"  # early split of resnet18: most compute is in the tail, so frames stay in flight


@pytest.fixture(scope="module")
def loaded():
    return load_model("resnet18")


@pytest.fixture(scope="module")
def frames(loaded):
    return [f.tensor for f in open_source(loaded.spec, "synthetic", 12)]



def _expected(loaded, frames):
    with torch.inference_mode():
        return [loaded.full(x) for x in frames]


async def _run_all(agent: Agent, frames, on_result=None):
    async def one(x):
        r = await agent.infer(x)
        if on_result:
            await on_result(r)
        return r

    return await asyncio.gather(*(one(x) for x in frames))


@pytest.mark.timeout(120)
def test_worker_stopping_with_frames_in_flight(loaded, frames):
    expected = _expected(loaded, frames)

    async def scenario():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, max_queue=64))
        agent = Agent(loaded, InitialPlan(loaded.split(SPLIT), get_codec("raw"), worker=f"127.0.0.1:{ws.port}"),
                      AgentOptions(deadline_seconds=30, reconnect=60))
        await agent.start()
        stopped = asyncio.Event()

        async def kill_after_first_edge_result(r):
            if r.where == "edge" and not stopped.is_set():
                stopped.set()
                # stop only once a frame is on the wire (waiting for its result): on a slow, busy
                # machine the worker can otherwise have answered every frame sent so far
                stream = agent.active.stream
                for _ in range(2000):  # bounded: at most ~2 s
                    if stream._pending:
                        break
                    await asyncio.sleep(0.001)
                await ws.server.stop(0)  # cancels the stream with frames still queued on the worker

        try:
            results = await _run_all(agent, frames, kill_after_first_edge_result)
        finally:
            await agent.close()
            await ws.server.stop(0)
        return results

    results = asyncio.run(scenario())
    assert sorted(r.seq for r in results) == list(range(len(frames)))  # one each, no duplicates
    edge = [r for r in results if r.where == "edge"]
    local = [r for r in results if r.where == "local"]
    assert edge and local, [(r.where, r.fallback_reason) for r in results]
    # frames waiting on the stream when it broke say so (the reader or a concurrent write noticed first)
    broken = ("stream failed", "stream closed", "write failed")
    assert any(any(b in r.fallback_reason for b in broken) for r in local), [r.fallback_reason for r in local]
    for r, x_ref in zip(sorted(results, key=lambda r: r.seq), expected, strict=True):
        assert torch.equal(r.output, x_ref), (r.seq, r.where)


@pytest.mark.timeout(120)
def test_missed_deadline_runs_locally_and_late_results_are_dropped(loaded, frames):
    expected = _expected(loaded, frames[:4])

    async def scenario():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, max_queue=64))
        agent = Agent(loaded, InitialPlan(loaded.split(SPLIT), get_codec("raw"), worker=f"127.0.0.1:{ws.port}"),
                      AgentOptions(deadline_seconds=0.001))
        await agent.start()
        try:
            results = await _run_all(agent, frames[:4])
            await ws.service.wait_idle(30)  # the worker finishes (or drops) the abandoned frames; late results are dropped
            assert not agent.stream._pending  # nothing left waiting, nothing resolved twice
            reg = agent.metrics.registry
            assert reg.get_sample_value("edgesplit_agent_fallbacks_total", {"reason": "deadline"}) == 4
            assert reg.get_sample_value("edgesplit_agent_frames_total", {"where": "local"}) == 4
            assert reg.get_sample_value("edgesplit_agent_stage_seconds_count", {"stage": "head"}) == 4
            # the deadline covers the send too: a frame whose deadline passed before it was written is never sent
            assert reg.get_sample_value("edgesplit_agent_sent_bytes_total") <= 4 * (loaded.split(SPLIT).fp32_bytes + 64)
        finally:
            await agent.close()
            await ws.drain_and_stop(1)
        return results

    results = asyncio.run(scenario())
    assert sorted(r.seq for r in results) == [0, 1, 2, 3]
    for r, want in zip(sorted(results, key=lambda r: r.seq), expected, strict=True):
        assert r.where == "local" and r.fallback_reason.startswith("deadline")
        assert torch.equal(r.output, want)


@pytest.mark.timeout(120)
def test_frames_given_up_on_a_left_link_say_so_not_deadline(loaded, frames):
    """EdgeStream.give_up (the agent left a collapsed link; runtime.agent.fallbacks): the frames waiting on it
    run on the board at once, with reason "given up: ..." and metric label given_up, not deadline."""
    expected = _expected(loaded, frames[:1])

    async def scenario():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, max_queue=64))
        agent = Agent(loaded, InitialPlan(loaded.split(SPLIT), get_codec("raw"), worker=f"127.0.0.1:{ws.port}"),
                      AgentOptions(deadline_seconds=30.0))
        await agent.start()
        try:
            given = []
            for _ in range(20):  # bounded: until one frame was waiting for its result when given up
                task = asyncio.create_task(agent.infer(frames[0]))
                while not task.done() and not agent.stream._pending:
                    await asyncio.sleep(0.0005)
                n = agent.stream.give_up("the link collapsed: the agent left it") if agent.stream._pending else 0
                r = await task
                if n:
                    given.append(r)
                    break
            reg = agent.metrics.registry
            assert given, "no frame was ever in flight to give up"
            assert reg.get_sample_value("edgesplit_agent_fallbacks_total", {"reason": "given_up"}) == 1
            assert reg.get_sample_value("edgesplit_agent_fallbacks_total", {"reason": "deadline"}) == 0
        finally:
            await agent.close()
            await ws.drain_and_stop(1)
        return given[0]

    r = asyncio.run(scenario())
    assert r.where == "local" and r.fallback_reason.startswith("given up: the link collapsed")
    assert torch.equal(r.output, expected[0])


@pytest.mark.timeout(60)
def test_no_worker_configured_runs_everything_locally(loaded, frames):
    async def scenario():
        agent = Agent(loaded, InitialPlan(loaded.split(SPLIT), get_codec("int8+lz4")))
        await agent.start()
        try:
            return await _run_all(agent, frames[:2])
        finally:
            await agent.close()

    results = asyncio.run(scenario())
    expected = _expected(loaded, frames[:2])
    assert [r.fallback_reason for r in results] == ["no worker configured"] * 2
    assert all(torch.equal(r.output, e) for r, e in zip(results, expected, strict=True))


def test_a_plan_that_sends_nothing_runs_each_frame_as_one_board_job(loaded, frames):
    """With no worker, head and local tail run in one job on the board thread: a second job would
    queue the frame's (trivial) tail behind the next frame's head, up to one head time per frame."""
    async def scenario():
        agent = Agent(loaded, InitialPlan(loaded.split(SPLIT), get_codec("int8+lz4")))
        await agent.start()
        agent.inline_board_seconds = 0.0  # every frame's board work on the board thread, to count its jobs
        try:
            return await _run_all(agent, frames[:4]), agent.board_handoffs
        finally:
            await agent.close()

    results, jobs = asyncio.run(scenario())
    assert jobs == 4
    assert all(r.where == "local" and "local_tail" in r.times for r in results)
    assert all(torch.equal(r.output, e) for r, e in zip(results, _expected(loaded, frames[:4]), strict=True))
