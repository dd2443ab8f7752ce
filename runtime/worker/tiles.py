"""The Tiles servicer: one tile of a fused block (RFS/DPFP spatial parallelism) per call.

A coordinator (``runtime.agent.parallel``) cuts the output of a fused block of conv/pool layers
into tiles and sends each worker the crop of the block input its tile reads, halo included. The
worker rebuilds the tile's regions itself with :class:`runtime.parallel.tiled.TiledSegment` from
the block (``split_id`` .. ``end_split``), the full input size and the output region, refuses a
crop that is not exactly that region, computes the tile and answers it.

Everything is checked before anything is allocated: ids (as frames), the input size against
``MAX_SIDE`` and, with the block's channel counts, the decoded crop and the answered tile against
the worker's ``max_tensor_bytes``. Tiles share the worker's admission (``--max-concurrency``,
``--max-queue``), executor and drain with frames.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import torch
from prometheus_client import Counter, Histogram

from runtime.contracts.errors import InvalidInput, PreconditionFailed, TooLarge
from runtime.daemon.metrics_http import STAGE_BUCKETS
from runtime.models.loader import LoadedModel
from runtime.parallel.receptive import Region, TileRegions
from runtime.parallel.tiled import TiledSegment
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import tensor_pb2, tiles_pb2, tiles_pb2_grpc
from runtime.wire.chain import check_route
from runtime.wire.codec import decode_tensor, get_codec
from runtime.worker.service import InferenceService, check_header

SERVICE_NAME = tiles_pb2.DESCRIPTOR.services_by_name["Tiles"].full_name

MAX_SIDE = 16_384
"""Largest block-input height or width a tile request may name (pixels)."""

MAX_SEGMENTS = 64
"""Fused blocks kept ready per worker (each holds only geometry and references to the model's layers)."""


def region_of(msg: tiles_pb2.TileRegion) -> Region:
    if msg.row_stop <= msg.row_start or msg.col_stop <= msg.col_start:
        raise InvalidInput(f"tile region rows [{msg.row_start}, {msg.row_stop}) x cols [{msg.col_start}, "
                           f"{msg.col_stop}) is empty")
    return Region.of(msg.row_start, msg.row_stop, msg.col_start, msg.col_stop)


class TileSegments:
    """TiledSegments built on first use per (model, block start, block end), at most MAX_SEGMENTS."""

    def __init__(self) -> None:
        self._segments: dict[tuple[str, str, str], TiledSegment] = {}
        self._lock = asyncio.Lock()

    async def get(self, loaded: LoadedModel, a: str, b: str, executor) -> TiledSegment:
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
    if req.crop.codec == tensor_pb2.CODEC_ANS:
        raise InvalidInput("tile crops cannot be entropy-coded (codec ans); use raw, fp16 or int8, with or without lz4")
    return int(req.input_height), int(req.input_width)


class TilesService(tiles_pb2_grpc.TilesServicer):
    """Serves InferTile on the worker's admission, executor and loaded models."""

    def __init__(self, inference: InferenceService):
        self.inference = inference
        self.segments = TileSegments()
        r = inference.metrics.registry
        self.tiles = Counter("edgesplit_worker_tiles", "Tiles of fused blocks computed (spatial parallelism)",
                             ["model"], registry=r)
        self.tile_seconds = Histogram("edgesplit_worker_tile_seconds", "Compute time of one tile of a fused block",
                                      buckets=STAGE_BUCKETS, registry=r)

    async def _plan(self, req: tiles_pb2.TileRequest) -> tuple[TiledSegment, TileRegions, int]:
        """The block, the tile's regions and the output channel count, after every check."""
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
        if list(req.crop.shape) != want or req.crop.dtype != "float32":
            raise InvalidInput(f"crop is {list(req.crop.shape)} {req.crop.dtype}; this tile needs {want} float32")
        max_bytes = self.inference.config.max_tensor_bytes
        if c_out * out_region.area * 4 > max_bytes:
            raise TooLarge(f"the answered tile would take {c_out * out_region.area * 4} bytes, above this worker's "
                           f"max_tensor_bytes {max_bytes}; cut the block into more tiles")
        return seg, regions, c_out

    def _compute(self, seg: TiledSegment, regions: TileRegions, req: tiles_pb2.TileRequest, admitted_at: float):
        t0 = time.perf_counter()
        x = decode_tensor(req.crop, max_bytes=self.inference.config.max_tensor_bytes)
        t1 = time.perf_counter()
        with torch.inference_mode():
            y = seg.run_tile(x, regions)
        t2 = time.perf_counter()
        tile = get_codec(req.output_codec or "raw").encode(y)
        times = pb.StageTimes(queue_seconds=t0 - admitted_at, decode_seconds=t1 - t0, tail_seconds=t2 - t1)
        return tile, times

    async def InferTile(self, request: tiles_pb2.TileRequest, context: grpc.aio.ServicerContext) -> tiles_pb2.TileResult:
        svc = self.inference

        async def prepare():
            get_codec(request.output_codec or "raw")  # InvalidInput with the valid names
            seg, regions, _ = await self._plan(request)
            svc.metrics.received_bytes.inc(len(request.crop.buffer))
            return seg, regions, time.perf_counter()

        # the worker's queue bound and drain cover tiles too; the slot is freed when the compute ends
        tile, times = await svc.run_admitted(prepare, lambda p: self._compute(p[0], p[1], request, p[2]))
        self.tiles.labels(request.header.model_id).inc()
        self.tile_seconds.observe(times.tail_seconds)
        return tiles_pb2.TileResult(header=request.header, output=request.output, tile=tile, times=times)
