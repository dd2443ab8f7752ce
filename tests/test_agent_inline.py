"""The board work of a lone frame runs on the event loop's thread (issue 14: no hand-off to the board thread and
back, two thread wake-ups a frame); several frames in flight, a plan's first frame and a long head still go to the
board thread. Counted through Agent.board_handoffs (every job handed to the board thread), not timed."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from runtime.agent.boardplace import BoardPlacement
from runtime.agent.client import Agent
from runtime.agent.config import AgentOptions, InitialPlan
from runtime.agent.sources import open_source
from runtime.models.loader import load_model
from runtime.wire.codec import get_codec
from runtime.worker.config import WorkerConfig
from runtime.worker.server import serve

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

SPLIT = "add"  # an early resnet18 split: a short head, most compute on the worker


@pytest.fixture(scope="module")
def loaded():
    return load_model("resnet18")


@pytest.fixture(scope="module")
def frames(loaded):
    return [f.tensor for f in open_source(loaded.spec, "synthetic", 6)]


def _run(loaded, frames, body, inline_seconds: float = 60.0):
    """``body(agent)`` against a real worker on loopback; the threads the agent's head ran on are recorded."""
    async def scenario():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, max_queue=64))
        agent = Agent(loaded, InitialPlan(loaded.split(SPLIT), get_codec("raw"), worker=f"127.0.0.1:{ws.port}"),
                      AgentOptions(deadline_seconds=30))
        agent.inline_board_seconds = inline_seconds  # the machine's speed out of the test (a head of any length)
        head_encode = agent._head_encode
        threads: list[str] = []

        def recording(plan, x):
            threads.append("loop" if threading.get_ident() == loop_thread else "board")
            return head_encode(plan, x)

        agent._head_encode = recording  # type: ignore[method-assign]  # where each frame's board work ran
        loop_thread = threading.get_ident()
        await agent.start()
        try:
            return await body(agent), threads
        finally:
            await agent.close()
            await ws.server.stop(0)

    return asyncio.run(scenario())


def _expected(loaded, xs):
    with torch.inference_mode():
        return [loaded.full(x) for x in xs]


@pytest.mark.timeout(120)
def test_lone_frames_run_their_head_on_the_loop(loaded, frames):
    async def body(agent):
        return [await agent.infer(x) for x in frames]  # one at a time

    results, threads = _run(loaded, frames, body)
    assert [r.where for r in results] == ["edge"] * len(frames)
    # the plan's first frame goes to the board thread (its board time unknown); every later one stays on the loop
    assert threads == ["board"] + ["loop"] * (len(frames) - 1)
    for r, e in zip(results, _expected(loaded, frames), strict=True):
        assert torch.allclose(r.output, e, atol=1e-4)


@pytest.mark.timeout(120)
def test_frames_in_flight_together_use_the_board_thread(loaded, frames):
    async def body(agent):
        await agent.infer(frames[0])  # the plan's board time is known from here on
        before = agent.board_handoffs
        results = await asyncio.gather(*(agent.infer(x) for x in frames))
        return results, agent.board_handoffs - before

    (results, handoffs), threads = _run(loaded, frames, body)
    assert [r.where for r in results] == ["edge"] * len(frames)
    # the first of the batch starts alone (the loop runs its head before the next one starts); the others overlap
    assert handoffs == len(frames) - 1 and threads[1:].count("board") == len(frames) - 1
    assert sorted(r.seq for r in results) == list(range(1, len(frames) + 1))


@pytest.mark.timeout(120)
def test_a_head_longer_than_the_bound_stays_on_the_board_thread(loaded, frames):
    async def body(agent):
        return [await agent.infer(x) for x in frames[:3]], agent.board_handoffs

    (results, handoffs), threads = _run(loaded, frames, body, inline_seconds=0.0)
    assert handoffs == 3 and threads == ["board"] * 3
    assert [r.where for r in results] == ["edge"] * 3


@pytest.mark.timeout(120)
def test_a_new_plan_starts_on_the_board_thread(loaded, frames):
    async def body(agent):
        await agent.infer(frames[0])
        await agent.infer(frames[1])  # on the loop
        before = agent.board_handoffs
        await agent.apply_plan(SPLIT, "raw", version=2)
        r1 = await agent.infer(frames[2])
        r2 = await agent.infer(frames[3])
        return (r1, r2), agent.board_handoffs - before

    ((r1, r2), handoffs), threads = _run(loaded, frames, body)
    assert (r1.plan_version, r2.plan_version) == (2, 2)
    assert handoffs == 1 and threads == ["board", "loop", "board", "loop"]  # each plan's first frame only


@pytest.mark.timeout(120)
def test_stalled_hand_offs_bring_a_long_head_onto_the_loop(loaded, frames):
    """A head over the inline bound still runs on the loop's thread once the hand-offs back are measured to stall
    (here: any hand-off counts as one), and one frame in ``recheck`` goes through the board thread to re-measure."""
    async def body(agent):
        agent.board_place = BoardPlacement(stall_seconds=0.0, stalled_inline_seconds=60.0, recheck=4)
        results = [await agent.infer(frames[i % len(frames)]) for i in range(8)]
        return results, agent.board_place.stalled

    (results, stalled), threads = _run(loaded, frames, body, inline_seconds=1e-9)  # every real head is longer
    assert stalled and [r.where for r in results] == ["edge"] * 8
    # two hand-offs measured first (the plan's first frame, then one more: two are needed), then the loop, every
    # 4th of those frames back through the board thread
    assert threads == ["board", "board", "loop", "loop", "loop", "board", "loop", "loop"]
    assert ["board_return" in r.times for r in results] == [t == "board" for t in threads]
    assert all(r.times["board_return"] >= 0 for r in results if "board_return" in r.times)


@pytest.mark.timeout(120)
def test_hand_offs_that_do_not_stall_keep_a_long_head_on_the_board_thread(loaded, frames):
    async def body(agent):
        agent.board_place = BoardPlacement(stall_seconds=60.0)  # no real hand-off takes a minute
        return [await agent.infer(x) for x in frames[:4]], agent.board_place

    (results, place), threads = _run(loaded, frames, body, inline_seconds=1e-9)
    assert threads == ["board"] * 4 and not place.stalled and len(place.handoffs) == 4
    assert all("board_return" in r.times for r in results)


@pytest.mark.timeout(120)
def test_a_probe_being_timed_keeps_a_long_head_off_the_loop(loaded, frames):
    """While the prober times a call on the loop (runtime.agent.prober: its RTT checks and its payload; likewise
    Agent.probe_rtt), a lone frame's head over the plain inline bound goes through the board thread even with the
    hand-offs stalled: held for the head (up to 0.5 s), the loop would take the answer up that much later and the
    probe would read the link that much slower (a 50 ms probe under a 0.3 s head: ~7x). Once the probe is done, the
    stall rule again."""
    from runtime.agent.prober import ProbeOptions, Prober

    async def body(agent):
        agent.board_place = BoardPlacement(stall_seconds=0.0, stalled_inline_seconds=60.0, recheck=1000)
        results = [await agent.infer(x) for x in frames[:3]]  # board, board (two hand-offs: stalled), loop
        prober = Prober(agent, ProbeOptions())
        probing = asyncio.create_task(prober.probe(agent.active.worker))
        await asyncio.sleep(0)  # the probe's first health check is on the wire, timed
        assert agent.link.timing == 1
        results.append(await agent.infer(frames[3]))  # started while the probe is timed
        sample = await probing
        assert agent.link.timing == 0
        results.append(await agent.infer(frames[4]))
        await prober.close()
        rtt = asyncio.create_task(agent.probe_rtt())  # the planner link's RTT check of the plan's worker: timed too
        await asyncio.sleep(0)
        assert agent.link.timing == 1
        results.append(await agent.infer(frames[5]))
        return results, sample, await rtt

    (results, sample, rtt), threads = _run(loaded, frames, body, inline_seconds=1e-9)  # every real head is longer
    assert [r.where for r in results] == ["edge"] * 6 and sample is not None and rtt is not None
    assert threads == ["board", "board", "loop", "board", "loop", "board"]
