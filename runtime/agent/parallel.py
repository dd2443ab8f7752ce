"""Coordinator of a parallel plan stage (RFS/DPFP): fused blocks spread over K workers by spatial tiles.

A :class:`ParallelStage` names consecutive fused blocks (split-point ranges) and the workers; each
block cuts its output into row bands (or a 2-D grid, ``grid_cols``) in proportion to its ``shares`` (one weight per worker, 0 =
that worker sits the block out). For every block the coordinator crops the block input for each
band, halo included (:class:`runtime.parallel.tiled.TiledSegment`), sends the crops to the workers
concurrently (``Tiles.InferTile``), and stitches the answered tiles into the next block's input.

Nothing is lost when a worker fails: a tile whose worker errs, is unreachable or misses
``tile_deadline_seconds`` is sent to the next worker still healthy in this frame, and computed on
the coordinator when none is left (or when its crop would exceed the message limit). A worker that
failed is skipped for the rest of the frame and tried again on the next one.

:meth:`ParallelCoordinator.run_frame` runs a whole frame: the head up to the first block locally,
the stage, and the rest of the model locally or through the caller's ``tail`` (the pushed stage's
tail worker, :mod:`runtime.agent.parallel_push`).

Halo exchange (``TiledBlock.halo``, :mod:`runtime.agent.parallel_halo`): where a block takes its input by
halo exchange, the previous block's tiles stay on their workers, which fetch only the border rows
they need from one another; if anything in it fails, the frame's stage resumes with gather and
scatter from what is still valid (:func:`runtime.agent.parallel_halo.recover`: kept tiles fetched
back, only lost or missing tiles computed again; ``CoordinatorOptions.halo`` False: never use it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import torch
from prometheus_client import CollectorRegistry, Counter, Histogram

from runtime.agent.parallel_halo import HaloFailed, StoredMap
from runtime.agent.parallel_maps import TileMap, TileReport, region_msg
from runtime.agent.parallel_recover import recover
from runtime.contracts.errors import EdgesplitError, InvalidInput, TooLarge, from_rpc_error
from runtime.daemon.metrics_http import STAGE_BUCKETS
from runtime.models.loader import LoadedModel
from runtime.parallel.plan import ParallelStage
from runtime.parallel.receptive import Region, TileRegions, partition
from runtime.parallel.tiled import TiledSegment
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.proto.edgesplit.v1 import tiles_pb2, tiles_pb2_grpc
from runtime.wire.codec import decode_tensor, get_codec
from runtime.wire.framewire import OutFrame
from runtime.wire.transport import TransportOptions

logger = logging.getLogger(__name__)


LOCAL = "local"
T = TypeVar("T")


def _inference(fn: Callable[..., T], *args: object) -> T:
    with torch.inference_mode():
        return fn(*args)


def _block_done(on_block: Callable[[int, list[TileReport]], None] | None, i: int, reports: list[TileReport],
                f: asyncio.Future[list[None]]) -> None:
    if not f.cancelled() and f.exception() is None and on_block is not None:  # exception(): retrieved, not logged
        on_block(i, reports)


@dataclass(frozen=True)
class CoordinatorOptions:
    """How the coordinator talks to the stage's workers."""

    codec: str = ""  # codec of the crops sent and the tiles answered ("": the stage's own; raw is exact)
    tile_deadline_seconds: float = 10.0  # a tile without an answer by then is recomputed elsewhere
    transport: TransportOptions = field(default_factory=TransportOptions)  # channel options (message limit)
    agent_id: str = "coordinator"  # sent in each tile's header
    wavefront: bool = True  # start a tile once the tiles it reads are in (False: wait for the whole block)
    model_digest: bool = True  # send the weights fingerprint (workers with other weights refuse)
    halo: bool = True  # exchange halos between workers where the stage's blocks say so (False: always gather)
    halo_early: bool = True  # send a halo block's tiles once the tiles they read are sent, not answered (the
    # workers wait for kept tiles themselves; False: after the answers, a round through the coordinator per block)


def _check_going(stop: asyncio.Event) -> None:
    if stop.is_set():
        raise HaloFailed("another tile of the frame's stage failed: this one is not sent")


class TileMetrics:
    """Per-worker tile times and failures (label values: the stage's workers and "local")."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.tile_seconds = Histogram("edgesplit_agent_tile_seconds", "Round trip of one tile of a parallel stage, "
                                      "by the worker that computed it", ["worker"], buckets=STAGE_BUCKETS,
                                      registry=self.registry)
        self.tile_failures = Counter("edgesplit_agent_tile_failures", "Tile attempts that failed (recomputed "
                                     "elsewhere), by worker and status code", ["worker", "code"], registry=self.registry)
        self.halo_fallbacks = Counter("edgesplit_agent_halo_fallbacks", "Frames whose halo exchange between workers "
                                      "failed and whose stage resumed with gather and scatter", registry=self.registry)
        self.halo_recovered = Counter("edgesplit_agent_halo_recovered_tiles", "After a failed halo exchange, tiles "
                                      "of the frame's maps fetched back from the workers keeping them (fetched) or "
                                      "computed again (recomputed)", ["how"], registry=self.registry)


class ParallelCoordinator:
    """Runs a :class:`ParallelStage` of ``loaded`` over its workers (async; torch work in an executor)."""

    def __init__(self, loaded: LoadedModel, stage: ParallelStage, options: CoordinatorOptions | None = None,
                 metrics: TileMetrics | None = None):
        self.loaded, self.stage = loaded, stage
        self.options = options or CoordinatorOptions()
        self.metrics = metrics or TileMetrics()
        self.codec_name = self.options.codec or stage.codec or "raw"
        self.codec = get_codec(self.codec_name)
        if not self.options.tile_deadline_seconds > 0:
            raise InvalidInput(f"tile_deadline_seconds must be > 0, got {self.options.tile_deadline_seconds}")
        self.segments: list[TiledSegment] = []
        prev = None
        for i, b in enumerate(stage.blocks):
            a, e = loaded.split(b.start), loaded.split(b.end)  # NotFound with the valid range
            if prev is not None and a.index != prev:
                raise InvalidInput(f"block {i} begins at {a.name}, but block {i - 1} ends at split {prev}")
            self.segments.append(TiledSegment(loaded.sliced, a.name, e.name))  # InvalidInput: not tileable
            prev = e.index
        self.first, self.last = loaded.split(stage.blocks[0].start), loaded.split(stage.blocks[-1].end)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coordinator")
        self._seq = random.getrandbits(40)  # frames of two coordinators with one agent id do not share keys
        self.halo_fallbacks = 0  # frames whose halo exchange failed (run again with gather and scatter)
        self.last_fallback = ""  # why the last one did
        self.halo_refused = False  # a worker refused a halo tile (PERMISSION_DENIED: no --halo-peer): gather from now on
        self.early_off = False  # a worker found no tile sent early (one older than early dispatch?): after the answers

    def _stub(self, address: str) -> tiles_pb2_grpc.TilesStub:
        if address not in self._channels:
            self._channels[address] = self.options.transport.aio_channel(address)  # TLS/tokens and interceptors as configured
        return tiles_pb2_grpc.TilesStub(self._channels[address])  # type: ignore[no-untyped-call]  # generated, unannotated

    async def prepare(self, timeout: float = 120.0) -> dict[str, str]:
        """Ask every worker to load the model now (``Inference.Prepare``; the weights fingerprint is
        checked), so the first frame's tiles do not wait for it. Returns the workers that refused or
        did not answer in time, with the status; their tiles fail over as usual."""
        header = pb.FrameHeader(agent_id=self.options.agent_id, model_id=self.loaded.name, split_id=self.first.name,
                                model_digest=self.loaded.digest if self.options.model_digest else "")

        async def one(address: str) -> str:
            self._stub(address)  # opens the channel
            stub = pb_grpc.InferenceStub(self._channels[address])  # type: ignore[no-untyped-call]  # generated, unannotated
            try:
                await stub.Prepare(pb.PrepareRequest(header=header), timeout=timeout)
            except grpc.RpcError as e:
                err = from_rpc_error(e)
                code: str = err.code.name
                logger.warning("worker %s did not prepare %s: %s %s", address, self.loaded.name, code, err)
                return code
            return ""

        codes = await asyncio.gather(*(one(w) for w in self.stage.workers))
        return {w: c for w, c in zip(self.stage.workers, codes, strict=True) if c}

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _compute(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in the coordinator's thread, under ``torch.inference_mode`` there. Never hold
        inference mode across an ``await`` on the event loop: it is the loop thread's state, so every task
        that ran meanwhile (another frame stitching its tiles) would make inference tensors, and the next
        in-place stitch outside the mode fails ("Inplace update to inference tensor outside InferenceMode")."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, _inference, fn, *args)

    # -- one tile -----------------------------------------------------------------------------

    def _header(self, i: int, seq: int) -> pb.FrameHeader:
        block = self.stage.blocks[i]
        return pb.FrameHeader(agent_id=self.options.agent_id, seq=seq, model_id=self.loaded.name,
                              split_id=self.loaded.split(block.start).name, end_split=self.loaded.split(block.end).name,
                              model_digest=self.loaded.digest if self.options.model_digest else "")

    def _request(self, i: int, in_hw: tuple[int, int], reg: TileRegions, crop: torch.Tensor | None, seq: int,
                 keep: bool = False, parts: list[tuple[str, Region, Region]] | None = None,
                 token: bytes = b"") -> tiles_pb2.TileRequest:
        msg = tiles_pb2.TileRequest(header=self._header(i, seq), input_height=in_hw[0], input_width=in_hw[1],
                                    output=region_msg(reg.output), input=region_msg(reg.input),
                                    output_codec=self.codec_name, keep_output=keep, halo_token=token)
        if crop is not None:
            msg.crop.CopyFrom(self.codec.encode(crop))
        for address, tile, want in parts or ():
            msg.parts.add(address=address, tile=region_msg(tile), region=region_msg(want))
        if msg.ByteSize() > self.options.transport.max_message_bytes:
            raise TooLarge(f"tile crop message of {msg.ByteSize()} bytes exceeds the {self.options.transport.max_message_bytes}"
                           "-byte message limit; use more tiles, a smaller codec or a larger --max-message-bytes")
        return msg

    async def _remote(self, address: str, msg: tiles_pb2.TileRequest, report: TileReport) -> torch.Tensor | None:
        """The tile computed by ``address`` (None when it keeps it: ``msg.keep_output``)."""
        t0 = report.sent_at = time.perf_counter()
        try:
            res = await self._stub(address).InferTile(msg, timeout=self.options.tile_deadline_seconds)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        report.answered_at = time.perf_counter()
        tile = None
        if not msg.keep_output:
            tile = decode_tensor(res.tile, max_bytes=self.options.transport.max_message_bytes * 4)
            want = (msg.output.row_stop - msg.output.row_start, msg.output.col_stop - msg.output.col_start)
            if tile.dim() != 4 or tuple(tile.shape[-2:]) != want:
                raise InvalidInput(f"worker {address} answered a tile of shape {list(tile.shape)} for a {want} region")
        report.seconds = time.perf_counter() - t0
        report.compute_seconds = res.times.tail_seconds
        report.worker_seconds = res.times.queue_seconds + res.times.decode_seconds + res.times.tail_seconds
        report.queue_seconds, report.decode_seconds = res.times.queue_seconds, res.times.decode_seconds
        report.sent_bytes += len(msg.crop.buffer) if msg.crop.buffer else msg.ByteSize()
        report.received_bytes = len(res.tile.buffer)
        crop_bytes = (int(self.loaded.split(msg.header.split_id).out_shape[1]) * 4
                      * (msg.input.row_stop - msg.input.row_start) * (msg.input.col_stop - msg.input.col_start))
        if res.peer_bytes > crop_bytes:  # parts cover the crop exactly: more is a worker's error
            raise InvalidInput(f"worker {address} reported {res.peer_bytes} bytes fetched from its neighbours for a "
                               f"crop of {crop_bytes} bytes")
        report.peer_bytes = res.peer_bytes
        return tile

    async def _tile(self, i: int, in_hw: tuple[int, int], reg: TileRegions, crop: torch.Tensor,
                    report: TileReport, healthy: list[str]) -> torch.Tensor:
        """One tile: on its planned worker, then on each other healthy worker, then locally."""
        try:
            msg = self._request(i, in_hw, reg, crop, report.seq)
        except TooLarge as e:
            report.failures.append(f"{report.planned}: {e.code.name}")
        else:
            tile = await self._on_workers(i, msg, report, healthy)
            if tile is not None:
                return tile
        t0 = time.perf_counter()
        tile = await self._compute(self.segments[i].run_tile, crop, reg)
        report.ran_on, report.seconds = LOCAL, time.perf_counter() - t0
        report.compute_seconds = report.worker_seconds = report.seconds
        self.metrics.tile_seconds.labels(LOCAL).observe(report.seconds)
        return tile

    async def _on_workers(self, i: int, msg: tiles_pb2.TileRequest, report: TileReport,
                          healthy: list[str]) -> torch.Tensor | None:
        """The tile from its planned worker, else from each other healthy worker in turn (None: all failed)."""
        for address in [report.planned] + [w for w in healthy if w != report.planned]:
            if address not in healthy:
                continue
            try:
                tile = await self._remote(address, msg, report)
            except (EdgesplitError, asyncio.TimeoutError) as e:
                code = e.code.name if isinstance(e, EdgesplitError) else "DEADLINE_EXCEEDED"
                report.failures.append(f"{address}: {code}")
                self.metrics.tile_failures.labels(address, code).inc()
                logger.warning("tile %s of block %d failed on %s (%s); recomputing elsewhere", report.rows, i,
                               address, code)
                if address in healthy:
                    healthy.remove(address)  # not again in this frame
                continue
            assert tile is not None  # asked for (keep_output False): _remote decoded it
            report.ran_on = address
            self.metrics.tile_seconds.labels(address).observe(report.seconds)
            return tile
        return None

    # -- the stage ----------------------------------------------------------------------------

    def bands(self, i: int, in_hw: tuple[int, int]) -> list[tuple[str, Region]]:
        """Block ``i``'s output tiles (full-width row bands, or a grid of ``grid_cols`` tiles per row)
        and the worker each is planned on."""
        out_hw = self.segments[i].out_size(in_hw)
        block = self.stage.blocks[i]
        used = [(w, s) for w, s in zip(self.stage.workers, block.shares, strict=True) if s > 0]
        cols = block.grid_cols
        if cols > 1 and (len(used) // cols > out_hw[0] or cols > out_hw[1]):
            cols = 1  # a map smaller than the grid (another input size than planned): row bands
        if cols == 1 and len(used) > out_hw[0]:
            used = sorted(used, key=lambda ws: -ws[1])[: out_hw[0]]  # a row each for the largest shares
        tiles = partition(out_hw, [s for _, s in used], cols)
        return [(w, t) for (w, _), t in zip(used, tiles, strict=True)]

    async def run_stage(self, x: torch.Tensor,
                        on_block: Callable[[int, list[TileReport]], None] | None = None) -> tuple[torch.Tensor, list[TileReport]]:
        """The stage's output for its input ``x`` (the map at the first block's start) and a report per tile.
        ``on_block(i, reports)`` is called when all of block ``i``'s tiles are in (progress, logs).

        Wavefront (``CoordinatorOptions.wavefront``): a tile of block i+1 is cropped and sent as soon
        as the tiles of block i its input region overlaps are in, not when the whole block is; a
        slow tile holds back only its neighbours. Otherwise every block waits for the previous one."""
        if x.dim() != 4 or x.shape[0] != 1:
            raise InvalidInput(f"a parallel stage takes one [1, C, H, W] map, got {list(x.shape)}")
        self._seq += 1
        if any(self.halo_input(i) for i in range(len(self.segments))):
            # the frame's seq is taken once: frames in flight must not read each other's kept tiles,
            # and its kept tiles are readable only with this frame's random capability (halo_token)
            seq, token = self._seq, secrets.token_bytes(16)
            maps: list[TileMap | StoredMap] = []
            reports: list[TileReport] = []
            try:
                return await self._run(x, on_block, halo=True, seq=seq, token=token, maps=maps, reports=reports)
            except (HaloFailed, EdgesplitError, RuntimeError) as e:  # never lose the frame: gather and scatter
                self.halo_fallbacks += 1
                self.last_fallback = str(e)
                self.metrics.halo_fallbacks.inc()
                logger.warning("halo exchange failed (%s); the stage resumes with gather and scatter from the tiles "
                               "still valid", e)
                if any(f.endswith(": PERMISSION_DENIED") for r in reports for f in r.failures):
                    self.halo_refused = True  # a configuration (the workers' --halo-peer), not a passing fault
                    logger.warning("a worker refused the halo exchange (start the workers with --halo-peer naming one "
                                   "another); this stage gathers and scatters every block from now on")
                elif self.early and any(r.early and f.endswith(": FAILED_PRECONDITION") for r in reports
                                        for f in r.failures):
                    self.early_off = True  # workers older than early dispatch answer a part not yet kept so
                    logger.warning("a worker did not find a tile sent to it early (a worker older than early "
                                   "dispatch, or one too loaded to wait); this stage sends each halo block after the "
                                   "previous block's answers from now on")
            try:  # the tiles computed and still held are fetched back; only the lost or missing ones run again
                return await recover(self, maps, seq, token, reports), reports
            except (EdgesplitError, RuntimeError, asyncio.TimeoutError) as e:
                logger.warning("resuming the stage failed (%s); it runs again from its first block", e)
                self._seq += 1
        return await self._run(x, on_block, halo=False, seq=self._seq)

    @property
    def early(self) -> bool:
        """Are halo blocks sent once the tiles they read are sent (early dispatch), not answered?"""
        return self.options.halo_early and not self.early_off

    def halo_input(self, i: int) -> bool:
        """Does block ``i`` take its input by halo exchange between workers?"""
        return self.options.halo and not self.halo_refused and 0 < i < len(self.segments) and self.stage.blocks[i].halo

    async def _run(self, x: torch.Tensor, on_block: Callable[[int, list[TileReport]], None] | None,
                   halo: bool, seq: int, token: bytes = b"", maps: list[TileMap | StoredMap] | None = None,
                   reports: list[TileReport] | None = None) -> tuple[torch.Tensor, list[TileReport]]:
        """The stage from ``x``; ``maps`` gets each block's input map and the last block's output, as they
        are made, and ``reports`` each tile's report (both read by :func:`recover` after a failure)."""
        healthy = list(self.stage.workers)
        reports = [] if reports is None else reports
        maps = [] if maps is None else maps
        src: TileMap | StoredMap = TileMap.ready(x)
        maps.append(src)
        tasks: list[asyncio.Future[None]] = []
        stop = asyncio.Event()  # a tile failed: the tiles not yet sent are not sent
        try:
            for i, seg in enumerate(self.segments):
                in_hw = src.hw
                planned = self.bands(i, in_hw)
                regions = seg.regions(in_hw, [r for _, r in planned])
                keep = halo and self.halo_input(i + 1)
                tiles = [reg.output for reg in regions]
                dst = (StoredMap(seg.out_size(in_hw), tiles, [w for w, _ in planned]) if keep
                       else TileMap(seg.out_size(in_hw), tiles))
                block_reports = [TileReport(i, (reg.output.rows.start, reg.output.rows.stop), worker,
                                            cols=(reg.output.cols.start, reg.output.cols.stop), seq=seq)
                                 for (worker, _), reg in zip(planned, regions, strict=True)]
                jobs = [asyncio.ensure_future(self._map_tile(i, in_hw, reg, rep, healthy, src, dst, k, token, stop))
                        for k, (reg, rep) in enumerate(zip(regions, block_reports, strict=True))]
                tasks.extend(jobs)
                done = asyncio.gather(*jobs)
                done.add_done_callback(functools.partial(_block_done, on_block, i, block_reports))
                reports.extend(block_reports)
                maps.append(dst)
                src = dst
                if not self.options.wavefront:
                    await done
            await asyncio.gather(*tasks)
        except Exception:
            stop.set()  # a tile failed: those in flight finish (bounded by the tile deadline), so that recover()
            if tasks:  # finds them gathered or kept, not cancelled half-way; the rest are not sent
                await asyncio.wait(tasks)
            raise
        finally:
            for t in tasks:
                t.cancel()
        assert isinstance(src, TileMap)  # the last block's tiles come back: halo_input(len(segments)) is False
        return src.full(), reports

    async def _map_tile(self, i: int, in_hw: tuple[int, int], reg: TileRegions, report: TileReport, healthy: list[str],
                        src: TileMap | StoredMap, dst: TileMap | StoredMap, k: int, token: bytes,
                        stop: asyncio.Event) -> None:
        try:
            keep = isinstance(dst, StoredMap)
            if isinstance(src, StoredMap):  # halo exchange: the worker assembles its crop from stored tiles
                early = self.early
                parts = await (src.early_parts if early else src.parts)(reg.input)
                report.ready_at, report.early = time.perf_counter(), early
                _check_going(stop)
                tile = await self._halo_tile(i, in_hw, reg, None, parts, report, keep, token, dst, k)
            else:
                crop = await src.crop(reg.input)
                report.ready_at = time.perf_counter()
                _check_going(stop)
                tile = (await self._halo_tile(i, in_hw, reg, crop, None, report, keep, token, dst, k) if keep
                        else await self._tile(i, in_hw, reg, crop, report, healthy))
            if isinstance(dst, StoredMap):
                dst.put_at(k, report.ran_on)
            else:
                assert tile is not None
                dst.put(k, tile)
            report.done_at = time.perf_counter()
        except BaseException as e:
            stop.set()
            dst.fail(e)  # tiles waiting on this one stop too
            raise

    async def _halo_tile(self, i: int, in_hw: tuple[int, int], reg: TileRegions, crop: torch.Tensor | None,
                         parts: list[tuple[str, Region, Region]] | None, report: TileReport, keep: bool,
                         token: bytes, dst: TileMap | StoredMap | None = None, k: int = 0) -> torch.Tensor | None:
        """A tile of a halo exchange (its output kept, or its crop made of stored parts): one attempt on its
        planned worker; any failure raises HaloFailed (the frame's stage then runs with gather and scatter)."""
        address = report.planned
        own = [("" if holder == address else holder, tile, want) for holder, tile, want in parts or ()]
        try:
            msg = self._request(i, in_hw, reg, crop, report.seq, keep, own, token)
            if isinstance(dst, StoredMap):
                dst.sent(k)  # the next block's tiles reading this one may go now (early dispatch)
            tile = await self._remote(address, msg, report)
        except (EdgesplitError, asyncio.TimeoutError) as e:
            code = e.code.name if isinstance(e, EdgesplitError) else "DEADLINE_EXCEEDED"
            report.failures.append(f"{address}: {code}")
            self.metrics.tile_failures.labels(address, code).inc()
            raise HaloFailed(f"tile {report.rows}x{report.cols} of block {i} on {address}: {code} {e}") from None
        report.ran_on = address
        self.metrics.tile_seconds.labels(address).observe(report.seconds)
        return tile

    async def run_frame(self, image: torch.Tensor, on_block: Callable[[int, list[TileReport]], None] | None = None,
                        tail: Callable[[torch.Tensor], Awaitable[torch.Tensor]] | None = None,
                        ) -> tuple[torch.Tensor, list[TileReport]]:
        """A whole frame: head to the first block locally, the stage, then the rest of the model: ``tail(map)``
        when given (the stitched map at the last block's end; e.g. sent to the stage's tail worker, which
        falls back to :meth:`local_tail` itself), else :meth:`local_tail`."""
        x = image if self.first.index == 0 else await self._compute(self.loaded.head(self.first.name), image)
        y, reports = await self.run_stage(x, on_block)
        if self.last.name != "output":
            y = await (tail or self.local_tail)(y)
        return y, reports

    async def local_tail(self, y: torch.Tensor) -> torch.Tensor:
        """The rest of the model after the stage's last block, on the coordinator."""
        return await self._compute(self.loaded.tail(self.last.name), y)

    async def encode_frame(self, y: torch.Tensor) -> OutFrame:
        """``y`` encoded in the stage's codec as an edge frame (the coordinator's thread)."""
        return await self._compute(self.codec.encode_frame, y)
