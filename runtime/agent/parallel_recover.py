"""Resuming a parallel frame whose halo exchange failed (RFS/DPFP, issue 13).

A halo exchange has one attempt per tile: when a tile of a halo block fails (its worker died, a peer
refused, a kept tile expired), the coordinator does not run the frame's stage again from its first
block. :func:`recover` rebuilds the stage's output from what is still valid, block by block from the
last one back, and only as far back as needed:

* a tile already gathered on the coordinator is used as it is;
* a tile kept on a worker (``keep_output``) is fetched back from it whole (``Tiles.FetchRegion``
  with the frame's ``halo_token``: an agent reads its own frame's kept tiles, never another's);
* only the tiles missing (never computed, or lost with their worker) are computed again, by gather
  and scatter (:meth:`ParallelCoordinator._tile`: the planned worker if healthy, then any other
  healthy one, then the coordinator itself), from the previous block's map rebuilt the same way.

So a worker killed at a later block costs the lost tiles and the failed block, not the first,
most expensive block again; the frame is never lost (if this fails too, the coordinator runs the
stage again from its first block). Counted in ``edgesplit_agent_halo_recovered_tiles_total{how}``
(``fetched``, ``recomputed``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import grpc
import torch

from runtime.agent.parallel_halo import StoredMap
from runtime.agent.parallel_maps import TileMap, TileReport, region_msg
from runtime.contracts.errors import EdgesplitError, InvalidInput, from_rpc_error
from runtime.models.loader import LoadedModel
from runtime.parallel.plan import ParallelStage
from runtime.parallel.receptive import Region, TileRegions
from runtime.parallel.tiled import TiledSegment
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import tiles_pb2, tiles_pb2_grpc
from runtime.wire.codec import decode_tensor

logger = logging.getLogger(__name__)

LOST = ("UNAVAILABLE", "DEADLINE_EXCEEDED")
"""Failure codes after which a worker is left out of the rest of the frame (it is gone or stuck)."""


class Coordinator(Protocol):  # what recover needs of runtime.agent.parallel.ParallelCoordinator
    loaded: LoadedModel
    stage: ParallelStage
    options: Any  # CoordinatorOptions and TileMetrics: runtime.agent.parallel imports this module (no cycle)
    metrics: Any
    segments: list[TiledSegment]

    def bands(self, i: int, in_hw: tuple[int, int]) -> list[tuple[str, Region]]: ...

    def _stub(self, address: str) -> tiles_pb2_grpc.TilesStub: ...

    async def _tile(self, i: int, in_hw: tuple[int, int], reg: TileRegions, crop: torch.Tensor,
                    report: TileReport, healthy: list[str]) -> torch.Tensor: ...


def _lost_workers(reports: Sequence[TileReport]) -> set[str]:
    """Workers whose halo attempt failed as gone or stuck ("ADDRESS: CODE" in a report's failures)."""
    out = set()
    for r in reports:
        for f in r.failures:
            address, _, code = f.rpartition(": ")
            if code in LOST:
                out.add(address)
    return out


async def fetch_back(coord: Coordinator, b: int, holder: str, tile: Region, seq: int, token: bytes) -> torch.Tensor:
    """Tile ``tile`` of the map at block ``b``'s input, as kept by ``holder`` for frame ``seq``."""
    split = coord.loaded.split(coord.stage.blocks[b - 1].end)
    header = pb.FrameHeader(agent_id=coord.options.agent_id, seq=seq, model_id=coord.loaded.name, split_id=split.name)
    req = tiles_pb2.FetchRegionRequest(header=header, tile=region_msg(tile), region=region_msg(tile), halo_token=token)
    try:
        res = await coord._stub(holder).FetchRegion(req, timeout=coord.options.tile_deadline_seconds)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None
    want = [1, int(split.out_shape[1]), *tile.shape]
    if list(res.part.shape) != want or res.part.dtype != "float32":
        raise InvalidInput(f"worker {holder} gave back a kept tile of {list(res.part.shape)} {res.part.dtype}; wanted {want}")
    return decode_tensor(res.part, max_bytes=coord.options.transport.max_message_bytes * 4)


async def _given_back(coord: Coordinator, m: StoredMap, b: int, seq: int, token: bytes, healthy: list[str],
                      out: TileMap) -> list[int]:
    """Fetch back every kept tile of ``m`` into ``out``; the tiles that could not be had."""
    async def one(k: int) -> int | None:
        holder = m.holders[k]
        if holder not in healthy:
            return k
        try:
            out.put(k, await fetch_back(coord, b, holder, m.tiles[k], seq, token))
        except (EdgesplitError, asyncio.TimeoutError) as e:
            code = e.code.name if isinstance(e, EdgesplitError) else "DEADLINE_EXCEEDED"
            logger.info("kept tile %s of block %d on %s not given back (%s): computed again", m.tiles[k], b - 1,
                        holder, code)
            if code in LOST and holder in healthy:
                healthy.remove(holder)
            return k
        coord.metrics.halo_recovered.labels("fetched").inc()
        return None

    kept = [k for k, done in enumerate(m.done) if done]
    return [k for k in await asyncio.gather(*(one(k) for k in kept)) if k is not None]


async def _map_at(coord: Coordinator, maps: list[TileMap | StoredMap], b: int, seq: int, token: bytes, healthy: list[str],
                  reports: list[TileReport]) -> torch.Tensor:
    """The whole map at block ``b``'s input (``b`` = the number of blocks: the stage's output)."""
    m = maps[b]
    if isinstance(m, TileMap) and all(m.done):
        return m.full()
    if b == 0:
        raise RuntimeError("the stage's input map is incomplete")  # never: it is the frame itself
    out = TileMap(m.hw, m.tiles)
    if isinstance(m, StoredMap):
        missing = await _given_back(coord, m, b, seq, token, healthy, out)
    else:
        missing = []
        for k, done in enumerate(m.done):
            if done:
                out.put(k, m.tile(k))
    missing += [k for k, done in enumerate(m.done) if not done]
    if missing:
        i = b - 1
        x = await _map_at(coord, maps, i, seq, token, healthy, reports)
        in_hw = maps[i].hw
        planned = coord.bands(i, in_hw)
        regions = coord.segments[i].regions(in_hw, [m.tiles[k] for k in missing])

        async def again(k: int, reg: TileRegions) -> None:
            o = reg.output
            report = TileReport(i, (o.rows.start, o.rows.stop), planned[k][0], cols=(o.cols.start, o.cols.stop), seq=seq)
            reports.append(report)
            crop = x[..., reg.input.rows.start: reg.input.rows.stop, reg.input.cols.start: reg.input.cols.stop].contiguous()
            report.ready_at = time.perf_counter()
            out.put(k, await coord._tile(i, in_hw, reg, crop, report, healthy))
            report.done_at = time.perf_counter()
            coord.metrics.halo_recovered.labels("recomputed").inc()

        await asyncio.gather(*(again(k, reg) for k, reg in zip(missing, regions, strict=True)))
    return out.full()


async def recover(coord: Coordinator, maps: list[TileMap | StoredMap], seq: int, token: bytes, reports: list[TileReport]) -> torch.Tensor:
    """The stage's output for frame ``seq`` after its halo exchange failed. ``maps``: the input map of each
    block the failed run reached and the last block's output (:meth:`ParallelCoordinator._run`), their
    tiles marked done where they were gathered or kept; ``reports`` gets a report per tile computed again."""
    if not maps:
        raise RuntimeError("the failed run left no maps")
    n = len(coord.segments)
    while len(maps) <= n:  # blocks the failed run never reached: every tile missing
        i = len(maps) - 1
        in_hw = maps[i].hw
        maps.append(TileMap(coord.segments[i].out_size(in_hw), [t for _, t in coord.bands(i, in_hw)]))
    healthy = [w for w in coord.stage.workers if w not in _lost_workers(reports)]
    before = len(reports)
    y = await _map_at(coord, maps, n, seq, token, healthy, reports)
    again = reports[before:]
    logger.info("frame %d resumed with gather and scatter: %d tiles computed again (blocks %s)", seq, len(again),
                sorted({r.block for r in again}))
    return y
