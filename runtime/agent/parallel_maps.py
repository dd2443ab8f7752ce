"""A parallel stage's maps and tile reports (RFS/DPFP, issue 13), shared by the coordinator
(:mod:`runtime.agent.parallel`) and the recovery after a failed halo exchange
(:mod:`runtime.agent.parallel_recover`).

:class:`TileMap` is one block's output map gathered on the coordinator, filled tile by tile;
:class:`TileReport` what happened to one tile of one block.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from runtime.contracts.errors import InvalidInput
from runtime.parallel.receptive import Region
from runtime.proto.edgesplit.v1 import tiles_pb2


class TileMap:
    """One block's output map, filled tile by tile: a crop waits only for the tiles it overlaps."""

    def __init__(self, hw: tuple[int, int], tiles: list[Region]):
        self.hw, self.tiles = hw, tiles
        self._events = [asyncio.Event() for _ in tiles]
        self.done = [False] * len(tiles)  # tile k was stitched in (a failure sets the events, never this)
        self._map: torch.Tensor | None = None
        self._error: BaseException | None = None

    @classmethod
    def ready(cls, x: torch.Tensor) -> TileMap:
        m = cls((int(x.shape[-2]), int(x.shape[-1])), [Region.full(int(x.shape[-2]), int(x.shape[-1]))])
        m._map = x
        m._events[0].set()
        m.done[0] = True
        return m

    def put(self, k: int, tile: torch.Tensor) -> None:
        r = self.tiles[k]
        if tuple(tile.shape[-2:]) != r.shape:
            raise InvalidInput(f"tile {tuple(tile.shape[-2:])} does not fit region {r} of {self.hw}")
        with torch.inference_mode(False):  # whatever mode a caller left on the loop thread: always a normal tensor
            if self._map is None:
                self._map = tile.new_empty((*tile.shape[:-2], *self.hw))
            self._map[..., r.rows.start: r.rows.stop, r.cols.start: r.cols.stop] = tile
        self.done[k] = True
        self._events[k].set()

    def fail(self, e: BaseException) -> None:
        self._error = e
        for ev in self._events:
            ev.set()

    async def crop(self, want: Region) -> torch.Tensor:
        for r, ev in zip(self.tiles, self._events, strict=True):
            if r.rows.start < want.rows.stop and want.rows.start < r.rows.stop and \
                    r.cols.start < want.cols.stop and want.cols.start < r.cols.stop:
                await ev.wait()
        if self._error is not None or self._map is None:
            raise RuntimeError("a tile this crop reads failed") from self._error
        return self._map[..., want.rows.start: want.rows.stop, want.cols.start: want.cols.stop].contiguous()

    def tile(self, k: int) -> torch.Tensor:
        """Tile ``k`` as stitched (only when ``done[k]``)."""
        r = self.tiles[k]
        if not self.done[k] or self._map is None:
            raise RuntimeError(f"tile {k} is not in")
        return self._map[..., r.rows.start: r.rows.stop, r.cols.start: r.cols.stop]

    def full(self) -> torch.Tensor:
        if self._map is None or not all(ev.is_set() for ev in self._events) or self._error is not None:
            raise RuntimeError("the map is not complete")
        return self._map


@dataclass
class TileReport:
    """What happened to one tile of one block."""

    block: int
    rows: tuple[int, int]  # output rows [start, stop)
    planned: str  # the worker it was planned on
    ran_on: str = ""  # where it was computed in the end (an address or "local")
    seconds: float = 0.0  # coordinator's wall time for the tile where it ran (round trip or local compute)
    compute_seconds: float = 0.0  # the worker's own compute time (the local compute for "local")
    worker_seconds: float = 0.0  # all the worker reported: queue + decode + compute (local: the compute)
    sent_bytes: int = 0
    received_bytes: int = 0
    failures: list[str] = field(default_factory=list)  # "ADDRESS: CODE" of each failed attempt
    cols: tuple[int, int] = (0, 0)  # output columns [start, stop) (the full width for row bands)
    # timeline (time.perf_counter() on the coordinator; 0 = not reached): where a block's time goes
    ready_at: float = 0.0  # the tiles this crop reads were in and the crop was cut
    sent_at: float = 0.0  # the request was encoded and handed to gRPC (last attempt)
    answered_at: float = 0.0  # the answer arrived (before decoding it)
    done_at: float = 0.0  # the tile was decoded and stitched into the block's output map
    queue_seconds: float = 0.0  # worker-reported: waiting for its executor slot
    decode_seconds: float = 0.0  # worker-reported: decoding the crop
    seq: int = 0  # the frame's sequence number in the tile's header (frames in flight each have their own)
    peer_bytes: int = 0  # halo exchange: crop bytes its worker fetched from neighbours (TileResult.peer_bytes)
    early: bool = False  # halo exchange, early dispatch: sent before the tiles it reads had answered


def region_msg(r: Region) -> tiles_pb2.TileRegion:
    """``r`` on the wire (the coordinator's tile requests, its fetches of kept tiles)."""
    return tiles_pb2.TileRegion(row_start=r.rows.start, row_stop=r.rows.stop, col_start=r.cols.start,
                                col_stop=r.cols.stop)
