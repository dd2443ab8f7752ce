"""The coordinator's side of the halo exchange between workers (RFS/DPFP, issue 13).

Between two fused blocks whose second takes its input by halo exchange (``TiledBlock.halo``), the
coordinator does not gather the map: each worker keeps its output tile (``keep_output``) and the
next block's request names, instead of a crop, the parts of the stored tiles its crop covers and
the workers holding them (``TileRequest.parts``); the worker fetches the border rows/columns from
its neighbours itself (``Tiles.FetchRegion``, :mod:`runtime.worker.tile_store`). Every such request
carries the frame's random ``halo_token`` (drawn per frame's stage): the workers read kept tiles only with it.

:class:`StoredMap` stands for such a map: it knows which worker holds each tile and when it is in.
With early dispatch (``CoordinatorOptions.halo_early``, the default) the next block's request goes
once the requests of the tiles it reads are sent, naming their planned workers, not once they have
answered: the workers wait for the kept tiles themselves (``runtime.worker.tile_store``), and a block
starts without a round through the coordinator.
A halo tile has one attempt on its planned worker; any failure raises :class:`HaloFailed`, and the
coordinator runs the frame's stage again with today's gather and scatter, where a failed tile is
recomputed elsewhere (the frame is not lost).
"""

from __future__ import annotations

import asyncio

from runtime.parallel.receptive import Region


class HaloFailed(RuntimeError):
    """A tile of a halo-exchanged block could not be computed or kept where planned."""


def intersect(a: Region, b: Region) -> Region | None:
    r0, r1 = max(a.rows.start, b.rows.start), min(a.rows.stop, b.rows.stop)
    c0, c1 = max(a.cols.start, b.cols.start), min(a.cols.stop, b.cols.stop)
    return Region.of(r0, r1, c0, c1) if r0 < r1 and c0 < c1 else None


class StoredMap:
    """A block's output map kept on the workers, tile by tile: which worker holds each tile, and when."""

    def __init__(self, hw: tuple[int, int], tiles: list[Region], planned: list[str] | None = None):
        self.hw, self.tiles = hw, tiles
        self.holders = [""] * len(tiles)
        self.planned = planned or [""] * len(tiles)  # the worker each tile's request goes to (early dispatch)
        self._events = [asyncio.Event() for _ in tiles]
        self._sent = [asyncio.Event() for _ in tiles]
        self.done = [False] * len(tiles)  # tile k is kept by holders[k] (a failure sets the events, never this)
        self._error: BaseException | None = None

    def put_at(self, k: int, address: str) -> None:
        self.holders[k] = address
        self.done[k] = True
        self._events[k].set()

    def sent(self, k: int) -> None:
        """Tile k's request is handed to gRPC (its worker will keep the tile under the expected key)."""
        self._sent[k].set()

    def fail(self, e: BaseException) -> None:
        self._error = e
        for ev in (*self._events, *self._sent):
            ev.set()

    async def early_parts(self, want: Region) -> list[tuple[str, Region, Region]]:
        """As :meth:`parts`, once the requests of the tiles ``want`` overlaps are sent (not answered), with
        their planned workers as holders."""
        return await self._parts(want, self._sent, self.planned)

    async def parts(self, want: Region) -> list[tuple[str, Region, Region]]:
        """(holder, stored tile, part of ``want`` in it) for every tile ``want`` overlaps, once they are in."""
        return await self._parts(want, self._events, self.holders)

    async def _parts(self, want: Region, events: list[asyncio.Event], holders: list[str]) -> list[tuple[str, Region, Region]]:
        out = []
        for k, (r, ev) in enumerate(zip(self.tiles, events, strict=True)):
            part = intersect(r, want)
            if part is None:
                continue
            await ev.wait()
            if self._error is not None:
                raise HaloFailed("a stored tile this crop reads failed") from self._error
            out.append((holders[k], r, part))  # read after the wait: a holder is set when its tile is in
        return out
