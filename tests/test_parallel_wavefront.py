"""The coordinator's wavefront (runtime.agent.parallel.TileMap, issue 13): a tile of the next fused
block is cropped as soon as the tiles it reads are in, never from a part of the map not yet written."""

from __future__ import annotations

import asyncio

import pytest
import torch

from runtime.agent.parallel import TileMap
from runtime.parallel.receptive import Region, partition

pytestmark = pytest.mark.timeout(30)


def test_a_crop_waits_only_for_the_tiles_it_overlaps():
    tiles = list(partition((8, 6), [1.0, 1.0]))  # rows [0,4) and [4,8)
    full = torch.arange(2 * 8 * 6, dtype=torch.float32).reshape(1, 2, 8, 6)

    async def go():
        m = TileMap((8, 6), tiles)
        top = asyncio.ensure_future(m.crop(Region.of(0, 3, 0, 6)))  # inside tile 0
        halo = asyncio.ensure_future(m.crop(Region.of(2, 6, 1, 5)))  # reads both tiles
        await asyncio.sleep(0)
        assert not top.done() and not halo.done()
        m.put(0, full[..., 0:4, :])
        await asyncio.sleep(0)
        assert top.done() and not halo.done()  # tile 1 is still out: the halo crop waits
        assert torch.equal(top.result(), full[..., 0:3, :])
        m.put(1, full[..., 4:8, :])
        assert torch.equal(await halo, full[..., 2:6, 1:5])
        assert torch.equal(m.full(), full)

    asyncio.run(go())


def test_a_failed_tile_fails_the_crops_that_read_it_and_a_misfit_is_refused():
    tiles = list(partition((4, 4), [1.0, 1.0], cols=2))  # columns [0,2) and [2,4)

    async def go():
        m = TileMap((4, 4), tiles)
        with pytest.raises(Exception, match="does not fit"):
            m.put(0, torch.zeros(1, 1, 4, 3))
        waiting = asyncio.ensure_future(m.crop(Region.of(0, 4, 1, 3)))
        await asyncio.sleep(0)
        m.fail(ConnectionError("worker gone"))
        with pytest.raises(RuntimeError, match="failed") as e:
            await waiting
        assert isinstance(e.value.__cause__, ConnectionError)
        with pytest.raises(RuntimeError, match="not complete"):
            m.full()

    asyncio.run(go())


def test_stitching_does_not_depend_on_the_inference_mode_left_on_the_loop_thread():
    """The cause of test_parallel_cli's rare failure: a frame awaited its tail inside torch.inference_mode
    on the event loop, so another frame's first tile, stitched meanwhile, made its map an inference tensor,
    and its next tile (stitched outside the mode) raised "Inplace update to inference tensor"."""
    tiles = list(partition((4, 4), [1.0, 1.0]))
    full = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    m = TileMap((4, 4), tiles)
    with torch.inference_mode():
        m.put(0, full[..., 0:2, :].clone())
    m.put(1, full[..., 2:4, :])  # raised RuntimeError before
    assert torch.equal(m.full(), full) and not m.full().is_inference()


def test_the_coordinator_never_holds_inference_mode_across_an_await():
    from runtime.agent.parallel import ParallelCoordinator
    from runtime.models.loader import load_model
    from runtime.parallel.plan import ParallelStage, TiledBlock

    loaded = load_model("digits_cnn")
    first = loaded.sliced.split_points[1].name
    coord = ParallelCoordinator(loaded, ParallelStage(("127.0.0.1:1",), (TiledBlock("input", first, (1.0,)),),
                                                      model=loaded.name))
    seen = []

    async def go():
        async def watch():  # runs on the loop while the frame's head/tail are computed in the executor
            for _ in range(200):
                seen.append(torch.is_inference_mode_enabled())
                await asyncio.sleep(0.0005)

        w = asyncio.ensure_future(watch())
        x = torch.zeros(loaded.input_shape)  # the block's worker is unreachable: its tile runs locally
        await asyncio.gather(coord.run_frame(x), coord.run_frame(x))
        w.cancel()
        await coord.close()

    asyncio.run(go())
    assert seen and not any(seen)
