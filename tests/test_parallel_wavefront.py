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
