"""The Tiles servicer: one tile of a fused block (RFS/DPFP spatial parallelism) per call.

A coordinator (``runtime.agent.parallel``) cuts the output of a fused block of conv/pool layers
into tiles and sends each worker the crop of the block input its tile reads, halo included. The
worker rebuilds the tile's regions itself with :class:`runtime.parallel.tiled.TiledSegment` from
the block (``split_id`` .. ``end_split``), the full input size and the output region, refuses a
crop that is not exactly that region, computes the tile and answers it.

Halo exchange (``runtime.worker.tile_store``): with ``keep_output`` the tile stays in the worker's
bounded :class:`TileStore` and the answer carries no tile; a request with ``parts`` instead of a
crop assembles its crop from stored tiles, its own and its neighbours' (``Tiles.FetchRegion``).
Such a request may come before the tiles it reads are computed (the coordinator's early dispatch):
a kept tile's key is expected while its request runs, and reads of it wait (``TileStore.wait``); a
request waits for its own parts before it takes a queue slot (at most ``MAX_WAITING`` at once).

Everything is checked before anything is allocated: ids (as frames), the input size against
``MAX_SIDE`` and, with the block's channel counts, the decoded crop and the answered tile against
the worker's ``max_tensor_bytes``. Tiles share the worker's admission (``--max-concurrency``,
``--max-queue``), executor and drain with frames.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc
import torch
from prometheus_client import Counter, Histogram

from runtime.contracts.errors import InvalidInput, NotFound, Overloaded, PreconditionFailed, TooLarge
from runtime.daemon.metrics_http import STAGE_BUCKETS
from runtime.models.loader import LoadedModel
from runtime.parallel.receptive import Region, TileRegions
from runtime.parallel.tiled import TiledSegment
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import tensor_pb2, tiles_pb2, tiles_pb2_grpc
from runtime.wire.chain import check_route
from runtime.wire.codec import decode_tensor, get_codec
from runtime.worker.service import InferenceService, check_header
from runtime.worker.tile_store import (
    EXPECT_GRACE_SECONDS,
    FETCH_TIMEOUT_SECONDS,
    MAX_PARTS,
    MAX_WAITING,
    Peers,
    TileStore,
    assemble,
    check_parts,
    check_token,
    fetch_answer,
    key_of,
    region_of,
)

SERVICE_NAME = tiles_pb2.DESCRIPTOR.services_by_name["Tiles"].full_name

MAX_SIDE = 16_384
"""Largest block-input height or width a tile request may name (pixels)."""

MAX_SEGMENTS = 64
"""Fused blocks kept ready per worker (each holds only geometry and references to the model's layers)."""


@dataclass(frozen=True)
class Prepared:
    """A checked tile request: the block, the tile's regions and what the crop is made of."""

    seg: TiledSegment
    regions: TileRegions
    c_in: int
    end_split: str  # the block's end, by name (kept tiles are stored under it)
    parts: list[tuple[str, Region, Region]]  # (address, stored tile, region) when the crop comes in parts


class TileSegments:
    """TiledSegments built on first use per (model, block start, block end), at most MAX_SEGMENTS."""

    def __init__(self) -> None:
        self._segments: dict[tuple[str, str, str], TiledSegment] = {}
        self._lock = asyncio.Lock()

    async def get(self, loaded: LoadedModel, a: str, b: str, executor: Executor | None) -> TiledSegment:
        key = (loaded.name, a, b)
        seg = self._segments.get(key)
        if seg is not None:
            return seg
        async with self._lock:
            if key not in self._segments:
                if len(self._segments) >= MAX_SEGMENTS:
                    self._segments.pop(next(iter(self._segments)))  # the oldest: rebuilt if asked again
                loop = asyncio.get_running_loop()
                self._segments[key] = await loop.run_in_executor(executor, TiledSegment, loaded.sliced, a, b)
            return self._segments[key]


def _check_request(req: tiles_pb2.TileRequest) -> tuple[int, int]:
    h = req.header
    if not h.end_split:
        raise InvalidInput("header.end_split is empty; a tile names the fused block it belongs to: split_id .. end_split")
    if h.next_hops:
        raise InvalidInput("a tile request cannot be chained (header.next_hops must be empty)")
    if not (1 <= req.input_height <= MAX_SIDE and 1 <= req.input_width <= MAX_SIDE):
        raise InvalidInput(f"input size {req.input_height}x{req.input_width} is out of range; each side 1..{MAX_SIDE}")
    if req.parts and (req.crop.buffer or req.crop.shape):
        raise InvalidInput("a tile request carries either a crop or crop parts (halo exchange), not both")
    if req.crop.codec == tensor_pb2.CODEC_ANS:
        raise InvalidInput("tile crops cannot be entropy-coded (codec ans); use raw, fp16 or int8, with or without lz4")
    if req.keep_output or req.parts:
        check_token(req.halo_token)  # the frame's capability for its kept tiles
    return int(req.input_height), int(req.input_width)


class TilesService(tiles_pb2_grpc.TilesServicer):
    """Serves InferTile on the worker's admission, executor and loaded models."""

    def __init__(self, inference: InferenceService, store: TileStore | None = None):
        self.inference = inference
        self.segments = TileSegments()
        self.store = store or TileStore()  # kept tiles for the halo exchange (bounded; runtime.worker.tile_store)
        self.waiting = 0  # requests waiting for their own crop parts (early dispatch), at most MAX_WAITING
        # channels to neighbours, this worker's credentials, only to its --halo-peer addresses
        self.peers = Peers(inference.config.transport(), inference.config.halo_peers)
        r = inference.metrics.registry
        self.tiles = Counter("edgesplit_worker_tiles", "Tiles of fused blocks computed (spatial parallelism)",
                             ["model"], registry=r)
        self.tile_seconds = Histogram("edgesplit_worker_tile_seconds", "Compute time of one tile of a fused block",
                                      buckets=STAGE_BUCKETS, registry=r)
        self.halo_parts = Counter("edgesplit_worker_halo_parts", "Crop parts of halo-exchanged tiles, by where they "
                                  "came from (local: this worker's store; peer: fetched from a neighbour)", ["source"],
                                  registry=r)
        self.halo_bytes = Counter("edgesplit_worker_halo_bytes", "Bytes of crop parts of halo-exchanged tiles (raw "
                                  "float32), by where they came from (local: this worker's store; peer: fetched from a "
                                  "neighbour)", ["source"], registry=r)

    async def _plan(self, req: tiles_pb2.TileRequest) -> Prepared:
        """The block, the tile's regions and the crop's parts, after every check."""
        in_hw = _check_request(req)
        h = req.header
        check_header(h)  # ids present and bounded, as for frames
        if h.tl_id:
            raise InvalidInput("a tile request cannot name a Transfer Layer; send the crop of the feature map itself")
        loaded = await self.inference.tails.model(h.model_id)  # NotFound unless served here
        if h.model_digest and h.model_digest != loaded.digest:
            raise PreconditionFailed(f"model {h.model_id!r} weights differ: coordinator has {h.model_digest}, worker "
                                     f"has {loaded.digest}; deploy the same weights on both")
        a = loaded.split(h.split_id)  # NotFound with the valid range
        b = check_route(loaded, a, h.end_split, ())  # InvalidInput: empty or backwards block
        if b is None:
            raise InvalidInput(f"the fused block {a.name}..{h.end_split} runs to the model output, which cannot be "
                               "tiled; end it before global pooling and the classifier")
        seg = await self.segments.get(loaded, a.name, b.name, self.inference.executor)  # InvalidInput: not tileable
        out_region = region_of(req.output)
        regions = seg.regions(in_hw, [out_region])[0]  # InvalidInput: off the map, input too small
        if regions.input != region_of(req.input):
            raise InvalidInput(f"the crop covers {region_of(req.input)}, but output tile {out_region} of block "
                               f"{a.name}..{b.name} at input {in_hw[0]}x{in_hw[1]} reads {regions.input}")
        c_in, c_out = int(a.out_shape[1]), int(b.out_shape[1])
        want = [1, c_in, *regions.input.shape]
        parts = check_parts(req.parts, regions.input) if req.parts else []
        for address, _, _ in parts:
            if address:  # this worker's own parts need no peer
                self.peers.check(address)
        if not parts and (list(req.crop.shape) != want or req.crop.dtype != "float32"):
            raise InvalidInput(f"crop is {list(req.crop.shape)} {req.crop.dtype}; this tile needs {want} float32")
        max_bytes = self.inference.config.max_tensor_bytes
        if c_out * out_region.area * 4 > max_bytes or c_in * regions.input.area * 4 > max_bytes:
            raise TooLarge(f"the tile ({c_out * out_region.area * 4} bytes) or its crop ({c_in * regions.input.area * 4}) "
                           f"would exceed this worker's max_tensor_bytes {max_bytes}; cut the block into more tiles")
        return Prepared(seg, regions, c_in, b.name, parts)

    async def _pieces(self, req: tiles_pb2.TileRequest, p: Prepared,
                      context: grpc.aio.ServicerContext) -> list[tuple[Region, torch.Tensor]]:
        """The crop's parts: this worker's from its store, the others fetched from the neighbours concurrently."""
        h = req.header
        fetch_header = pb.FrameHeader(agent_id=h.agent_id, seq=h.seq, model_id=h.model_id, split_id=h.split_id)
        remaining = context.time_remaining()
        timeout = min(FETCH_TIMEOUT_SECONDS, remaining) if remaining is not None else FETCH_TIMEOUT_SECONDS
        max_bytes = self.inference.config.max_tensor_bytes

        async def one(address: str, tile: Region, want: Region) -> tuple[Region, torch.Tensor]:
            if not address:
                try:
                    part = self.store.region(key_of(h, h.split_id, tile), want, req.halo_token)
                except NotFound as e:
                    raise PreconditionFailed(f"this worker's own part: {e}") from None
                if tuple(part.shape) != (1, p.c_in, *want.shape):
                    raise PreconditionFailed(f"the kept tile {tile} is {list(part.shape)}, not of this block's input")
                self.halo_parts.labels("local").inc()
                self.halo_bytes.labels("local").inc(part.numel() * part.element_size())
                return want, part
            t = await self.peers.fetch(address, fetch_header, req.halo_token, tile, want, p.c_in, timeout, max_bytes)
            self.halo_parts.labels("peer").inc()
            self.halo_bytes.labels("peer").inc(t.numel() * t.element_size())
            return want, t

        return list(await asyncio.gather(*(one(*part) for part in p.parts)))

    def _compute(self, p: Prepared, pieces: list[tuple[Region, torch.Tensor]] | None, req: tiles_pb2.TileRequest,
                 admitted_at: float) -> tuple[torch.Tensor, tensor_pb2.Tensor | None, pb.StageTimes, str]:
        t0 = time.perf_counter()
        if pieces:
            x = assemble(p.regions.input, pieces)
        else:
            x = decode_tensor(req.crop, max_bytes=self.inference.config.max_tensor_bytes)
        t1 = time.perf_counter()
        with torch.inference_mode():
            y = p.seg.run_tile(x, p.regions)
        t2 = time.perf_counter()
        tile = None if req.keep_output else get_codec(req.output_codec or "raw").encode(y)
        times = pb.StageTimes(queue_seconds=t0 - admitted_at, decode_seconds=t1 - t0, tail_seconds=t2 - t1)
        return y, tile, times, p.end_split

    async def _await_own(self, req: tiles_pb2.TileRequest, timeout: float) -> None:
        """Early dispatch: this worker's own crop parts may still be computing here (or their request on its
        way); wait for them before taking a queue slot, so that waiting requests do not hold the slots the
        tiles they wait for need."""
        own = [p for p in req.parts[:MAX_PARTS] if not p.address]
        if not own:
            return
        check_header(req.header)
        check_token(req.halo_token)
        if self.waiting >= MAX_WAITING:
            raise Overloaded(f"{MAX_WAITING} tile requests already wait for their crop parts on this worker")
        self.waiting += 1
        try:
            for p in own:
                await self.store.wait(key_of(req.header, req.header.split_id, region_of(p.tile)), req.halo_token,
                                      timeout, EXPECT_GRACE_SECONDS)
        finally:
            self.waiting -= 1

    async def InferTile(self, request: tiles_pb2.TileRequest, context: grpc.aio.ServicerContext) -> tiles_pb2.TileResult:
        expected = None
        if request.keep_output:  # reads of this tile wait for it while it is computed (early dispatch)
            check_header(request.header)
            key = key_of(request.header, request.header.end_split, region_of(request.output))
            expected = key if self.store.expect(key, request.halo_token) else None
        try:
            remaining = context.time_remaining()
            await self._await_own(request, min(FETCH_TIMEOUT_SECONDS, remaining) if remaining is not None
                                  else FETCH_TIMEOUT_SECONDS)
            return await self._infer_tile(request, context)
        finally:
            if expected is not None:
                self.store.settle(expected)

    async def _infer_tile(self, request: tiles_pb2.TileRequest, context: grpc.aio.ServicerContext) -> tiles_pb2.TileResult:
        svc = self.inference

        peer_bytes = 0  # crop parts fetched from the neighbours (FetchRegion payloads), for the agent's byte count

        async def prepare() -> tuple[Prepared, list[tuple[Region, torch.Tensor]] | None, float]:
            nonlocal peer_bytes
            get_codec(request.output_codec or "raw")  # InvalidInput with the valid names
            p = await self._plan(request)
            pieces = await self._pieces(request, p, context) if p.parts else None  # halo exchange
            peer_bytes = sum(t.numel() * t.element_size() for (address, _, _), (_, t) in zip(p.parts, pieces or [],
                                                                                             strict=bool(pieces)) if address)
            svc.metrics.received_bytes.inc(len(request.crop.buffer))
            return p, pieces, time.perf_counter()

        # the worker's queue bound and drain cover tiles too; the slot is freed when the compute ends
        y, tile, times, end_split = await svc.run_admitted(prepare, lambda p: self._compute(p[0], p[1], request, p[2]))
        self.tiles.labels(request.header.model_id).inc()
        self.tile_seconds.observe(times.tail_seconds)
        if tile is None:  # keep_output: the next block's workers fetch what they need of it
            self.store.put(key_of(request.header, end_split, region_of(request.output)), y, request.halo_token)
            return tiles_pb2.TileResult(header=request.header, output=request.output, times=times, peer_bytes=peer_bytes)
        return tiles_pb2.TileResult(header=request.header, output=request.output, tile=tile, times=times,
                                    peer_bytes=peer_bytes)

    async def FetchRegion(self, request: tiles_pb2.FetchRegionRequest,
                          context: grpc.aio.ServicerContext) -> tiles_pb2.FetchRegionResult:
        """A part of a kept tile: for a neighbour assembling its crop (halo exchange), or the agent's own
        frame's tile back after a failed exchange (runtime.agent.parallel_recover); the frame's halo_token."""
        check_header(request.header)  # ids present and bounded
        check_token(request.halo_token)
        remaining = context.time_remaining()  # a tile still computing there (early dispatch) is waited for
        await self.store.wait(key_of(request.header, request.header.split_id, region_of(request.tile)),
                              request.halo_token, min(FETCH_TIMEOUT_SECONDS, remaining) if remaining is not None
                              else FETCH_TIMEOUT_SECONDS)
        return fetch_answer(self.store, request, self.inference.config.max_tensor_bytes)
