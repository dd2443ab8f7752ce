"""Early dispatch of halo blocks (issue 13): the coordinator sends block i+1's tiles once block i's requests
are sent, not answered, and the workers wait for the kept tiles themselves (TileStore.expect / wait). The
store's waits are bounded and token-checked; over real worker processes on loopback the output equals the
unsplit model, later blocks' requests go out before the tiles they read are in, and with halo_early=False
they do not (the round through the coordinator per block)."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import torch

from runtime.agent.parallel import CoordinatorOptions, ParallelCoordinator
from runtime.contracts.errors import NotFound
from runtime.parallel.receptive import Region
from runtime.worker.tile_store import TileStore
from tests.test_parallel_halo import TOKEN, _close, _key, _stage, image, loaded, reference  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(240)]

OTHER = bytes(16)  # another frame's token


def test_a_read_waits_for_an_expected_tile_and_only_for_it():
    async def main():
        store, t = TileStore(), torch.ones(1, 2, 2, 2)
        assert store.expect(_key(1), TOKEN)
        waiting = asyncio.ensure_future(store.wait(_key(1), TOKEN, 5.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # expected, not kept yet
        store.put(_key(1), t, TOKEN)
        store.settle(_key(1))
        await asyncio.wait_for(waiting, 1.0)
        assert store.region(_key(1), Region.of(0, 1, 0, 2), TOKEN).shape == (1, 2, 1, 2)

        t0 = time.monotonic()  # neither kept nor expected: answered at once, as before early dispatch
        await store.wait(_key(2), TOKEN, 5.0)
        assert store.expect(_key(3), TOKEN)
        await store.wait(_key(3), OTHER, 5.0)  # another frame's token: no wait either
        assert time.monotonic() - t0 < 1.0
        failed = asyncio.ensure_future(store.wait(_key(3), TOKEN, 5.0))
        await asyncio.sleep(0.05)
        store.settle(_key(3))  # its request failed: the read goes on and finds nothing
        await asyncio.wait_for(failed, 1.0)
        with pytest.raises(NotFound):
            store.region(_key(3), Region.of(0, 1, 0, 1), TOKEN)

        t0 = time.monotonic()  # bounded: an expected tile never settled, an unknown one within the grace
        assert store.expect(_key(4), TOKEN)
        await store.wait(_key(4), TOKEN, 0.2)
        await store.wait(_key(5), TOKEN, 5.0, unknown_wait=0.2)
        assert 0.3 <= time.monotonic() - t0 < 3.0
        late = asyncio.ensure_future(store.wait(_key(6), TOKEN, 5.0, unknown_wait=2.0))
        await asyncio.sleep(0.05)
        assert store.expect(_key(6), TOKEN)  # its request arrives after the read: waited for
        await asyncio.sleep(0.05)
        assert not late.done()
        store.put(_key(6), t, TOKEN)
        store.settle(_key(6))
        await asyncio.wait_for(late, 1.0)
        assert store.get(_key(6), TOKEN) is not None

        small = TileStore(max_tiles=1)  # at most max_tiles keys expected
        assert small.expect(_key(7), TOKEN) and not small.expect(_key(8), TOKEN)

    asyncio.run(asyncio.wait_for(main(), 30))


async def _run(model, stage, x, early: bool, n: int = 2):
    coord = ParallelCoordinator(model, stage, CoordinatorOptions(tile_deadline_seconds=30, halo_early=early))
    try:
        return [await coord.run_frame(x) for _ in range(n)], coord.halo_fallbacks
    finally:
        await coord.close()


def _read_before_answered(reports) -> int:
    """Tiles of a halo block sent before every tile of the previous block had answered."""
    return sum(1 for r in reports if r.block > 0 and r.sent_at
               < max(p.answered_at for p in reports if p.block == r.block - 1))


def test_early_dispatch_equals_the_unsplit_model_and_skips_the_round(start_worker, loaded, image, reference):  # noqa: F811
    workers = [start_worker("--torch-threads", "1", "--halo-peer", "127.0.0.1") for _ in range(2)]
    stage = _stage([f"127.0.0.1:{port}" for _, port in workers])
    early, fell = asyncio.run(asyncio.wait_for(_run(loaded, stage, image, True), 180))
    acked, fell_acked = asyncio.run(asyncio.wait_for(_run(loaded, stage, image, False), 180))
    assert fell == fell_acked == 0
    assert all(_close(y, reference) for y, _ in early + acked)
    assert all(_read_before_answered(reports) > 0 for _, reports in early)  # sent while block i still computed
    assert all(_read_before_answered(reports) == 0 for _, reports in acked)


def test_a_worker_killed_mid_frame_under_early_dispatch_loses_nothing(start_worker, loaded, image, reference):  # noqa: F811
    """The victim dies once block 0 is in, while block 1's requests already wait on both workers: the frame
    resumes from what is still valid and equals the unsplit model; so does the next (the victim stays dead)."""
    (victim, vport), (_, sport) = (start_worker("--torch-threads", "1", "--halo-peer", "127.0.0.1") for _ in range(2))
    addresses = [f"127.0.0.1:{vport}", f"127.0.0.1:{sport}"]

    def kill_after_first_block(i, reports):
        if i == 0:
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)

    async def go():
        coord = ParallelCoordinator(loaded, _stage(addresses), CoordinatorOptions(tile_deadline_seconds=30))
        try:
            out = [await coord.run_frame(image, on_block=kill_after_first_block if n == 0 else None) for n in range(2)]
            return out, coord.halo_fallbacks
        finally:
            await coord.close()

    frames, fallbacks = asyncio.run(asyncio.wait_for(go(), 200))
    assert len(frames) == 2 and fallbacks == 2
    assert all(_close(y, reference) for y, _ in frames)
    assert all(r.ran_on != addresses[0] for r in frames[1][1])  # nothing more on the victim


def test_workers_older_than_early_dispatch_turn_it_off_after_one_frame(monkeypatch, loaded, image, reference):  # noqa: F811
    """A worker from before early dispatch neither expects a kept tile nor waits for its own crop parts: a halo
    block sent early finds its part not kept (FAILED_PRECONDITION). The frame is not lost (the stage resumes),
    and the coordinator sends halo blocks after the answers from then on, so only that one frame pays."""
    import time as _time

    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve
    from runtime.worker.tiles import TilesService

    async def no_wait(self, req, timeout):  # the old worker: no wait for its own parts
        return None

    compute = TilesService._compute

    def slow_compute(self, *args):  # each tile takes 30 ms at least: block i+1 always arrives before block i is kept
        _time.sleep(0.03)
        return compute(self, *args)

    monkeypatch.setattr(TileStore, "expect", lambda self, key, token: False)
    monkeypatch.setattr(TilesService, "_await_own", no_wait)
    monkeypatch.setattr(TilesService, "_compute", slow_compute)

    async def main():
        servers = [await serve(WorkerConfig(listen="127.0.0.1:0", halo_peers=("127.0.0.1",))) for _ in range(2)]
        coord = ParallelCoordinator(loaded, _stage([f"127.0.0.1:{s.port}" for s in servers]),
                                    CoordinatorOptions(tile_deadline_seconds=30, halo_early=True))
        try:
            first, _ = await coord.run_frame(image)
            assert coord.halo_fallbacks == 1 and coord.early_off and not coord.early
            later = [(await coord.run_frame(image))[0] for _ in range(2)]
            assert coord.halo_fallbacks == 1  # after the answers: the old workers find their parts
            return [first, *later]
        finally:
            await coord.close()
            for s in servers:
                await s.drain_and_stop(1)

    outs = asyncio.run(asyncio.wait_for(main(), 180))
    assert all(_close(y, reference) for y in outs)


def test_requests_waiting_for_their_own_parts_are_bounded():
    """At most MAX_WAITING tile requests wait on a worker for their own crop parts (early dispatch); the next is
    answered RESOURCE_EXHAUSTED at once, before it takes a queue slot or waits."""
    import grpc

    from runtime.proto.edgesplit.v1 import inference_pb2 as ipb
    from runtime.proto.edgesplit.v1 import tiles_pb2, tiles_pb2_grpc
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve
    from runtime.worker.tile_store import MAX_WAITING

    async def main():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0"))
        try:
            assert ws.tiles is not None
            ws.tiles.waiting = MAX_WAITING  # as if 64 requests waited now
            region = tiles_pb2.TileRegion(row_start=0, row_stop=2, col_start=0, col_stop=2)
            req = tiles_pb2.TileRequest(
                header=ipb.FrameHeader(agent_id="a", seq=1, model_id="resnet18", split_id="add_2", end_split="add_4"),
                input_height=28, input_width=28, output=region, input=region, halo_token=TOKEN,
                parts=[tiles_pb2.CropPart(tile=region, region=region)])
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}") as ch:
                stub = tiles_pb2_grpc.TilesStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.InferTile(req, timeout=10)
                assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "wait for their crop parts" in (e.value.details() or "")
                assert ws.tiles.waiting == MAX_WAITING and ws.service._admitted == 0  # no slot taken
                ws.tiles.waiting = MAX_WAITING - 1  # one place left: it waits (its grace), then the request's own checks
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.InferTile(req, timeout=10)
                assert e.value.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
                assert ws.tiles.waiting == MAX_WAITING - 1 and ws.service._admitted == 0
        finally:
            await ws.drain_and_stop(1)

    asyncio.run(asyncio.wait_for(main(), 60))
