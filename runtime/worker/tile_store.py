"""Halo exchange between workers (RFS/DPFP, issue 13): the worker's store of kept tiles and its peers.

When a parallel stage's next block takes its input by halo exchange (``ParallelBlock.halo_input``),
the coordinator asks each worker to keep its output tile (``TileRequest.keep_output``) instead of
answering it, and sends the next block's requests with no crop: only the parts of the previous
block's stored tiles that the crop covers (``TileRequest.parts``). The worker cuts its own part from
its :class:`TileStore` and fetches the border rows/columns it lacks from its neighbours
(``Tiles.FetchRegion``, worker role only) concurrently, then assembles the crop and computes.

:class:`TileStore` is bounded three ways, oldest evicted first: ``max_bytes`` (default
:data:`DEFAULT_MAX_BYTES`), ``max_tiles`` (:data:`DEFAULT_MAX_TILES`) and a time to live
(:data:`DEFAULT_TTL_SECONDS`); a tile evicted or expired is answered NOT_FOUND and the coordinator
falls back to gathering the map itself. Everything runs on the event loop: no locks.

Every kept tile is stored with its frame's capability, ``halo_token`` (:data:`TOKEN_BYTES` random
bytes the coordinator draws per frame's parallel stage): the key alone (agent id, seq, model, split,
region) is guessable, so a read (own part or ``FetchRegion``) with another token is answered exactly
as a tile not kept (NOT_FOUND), compared in constant time.

Early dispatch (the coordinator's ``CoordinatorOptions.halo_early``): the next block's request may
reach a worker before the tiles it reads are computed. A request that keeps its output registers
its key as *expected* (:meth:`TileStore.expect`, at most ``max_tiles`` keys, with the frame's token)
until it ends; a read of an expected key waits for it (:meth:`TileStore.wait`, bounded by the
call's deadline and :data:`FETCH_TIMEOUT_SECONDS`), a read of a key neither kept nor expected is
answered at once as before. So a worker starts block i+1 as soon as it and its neighbours have
finished block i, without a round through the coordinator.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import grpc
import torch

from runtime.contracts.errors import (
    EdgesplitError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    TooLarge,
    from_rpc_error,
)
from runtime.parallel.receptive import Region
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import tiles_pb2, tiles_pb2_grpc
from runtime.wire.codec import decode_tensor, get_codec
from runtime.wire.transport import TransportOptions

DEFAULT_MAX_BYTES = 256 * 2**20
"""Bytes of kept tiles a worker holds at most (a 4-worker VGG-16 frame keeps about 2 MB per worker)."""
DEFAULT_MAX_TILES = 1024
"""Kept tiles a worker holds at most."""
DEFAULT_TTL_SECONDS = 10.0
"""A kept tile is dropped this long after it was stored (a frame's next block reads it within milliseconds)."""
MAX_PARTS = 64
"""Parts one tile request may assemble its crop from."""
MAX_ADDRESS = 256
"""Longest peer address (characters)."""
MAX_PEERS = 64
"""Channels to neighbour workers kept open (the least recently used is closed beyond this)."""
FETCH_TIMEOUT_SECONDS = 10.0
"""A FetchRegion call's deadline when the incoming request has none shorter; also the longest a read of an
expected tile (early dispatch) waits for it."""
EXPECT_GRACE_SECONDS = 1.0
"""How long a request's own crop part that is neither kept nor expected here is waited for (early dispatch: the
request keeping it may still be on its way); then it is answered as not kept (FAILED_PRECONDITION)."""
MAX_WAITING = 64
"""Tile requests that may wait here for their own crop parts (early dispatch) before taking a queue slot."""
TOKEN_BYTES = 16
"""Length of a frame's halo_token (128 random bits: secrets.token_bytes)."""

Key = tuple[str, int, str, str, tuple[int, int, int, int]]  # agent id, seq, model, split, tile region


def key_of(h: pb.FrameHeader, split: str, r: Region) -> Key:
    return (h.agent_id, int(h.seq), h.model_id, split, (r.rows.start, r.rows.stop, r.cols.start, r.cols.stop))


class TileStore:
    """Kept output tiles by (agent, seq, model, split, region); bounded by bytes, count and age."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_tiles: int = DEFAULT_MAX_TILES,
                 ttl_seconds: float = DEFAULT_TTL_SECONDS, clock: Callable[[], float] = time.monotonic):
        if not (max_bytes > 0 and max_tiles > 0 and ttl_seconds > 0):
            raise InvalidInput(f"tile store limits must be > 0, got {max_bytes} bytes, {max_tiles} tiles, {ttl_seconds} s")
        self.max_bytes, self.max_tiles, self.ttl_seconds, self.clock = max_bytes, max_tiles, ttl_seconds, clock
        self._tiles: OrderedDict[Key, tuple[torch.Tensor, float, bytes]] = OrderedDict()  # oldest first; token
        self.bytes = 0
        self.evicted = 0  # dropped for room or age before anyone asked (a fallback's likely cause)
        self._expected: dict[Key, tuple[bytes, asyncio.Event]] = {}  # tiles being computed here: token, settled
        self._news = asyncio.Event()  # set (and replaced) whenever a key is expected or settled

    def _notify(self) -> None:
        self._news.set()
        self._news = asyncio.Event()

    def expect(self, key: Key, token: bytes) -> bool:
        """A request that keeps its output under ``key`` is running here: reads of ``key`` wait for it until
        :meth:`settle`. False (reads are answered at once) when ``max_tiles`` keys are already expected."""
        check_token(token)
        if key in self._expected or len(self._expected) >= self.max_tiles:
            return False
        self._expected[key] = (bytes(token), asyncio.Event())
        self._notify()
        return True

    def settle(self, key: Key) -> None:
        """The request for ``key`` ended (its tile kept, or it failed): the reads waiting for it go on."""
        item = self._expected.pop(key, None)
        if item is not None:
            item[1].set()
            self._notify()

    async def wait(self, key: Key, token: bytes, timeout: float, unknown_wait: float = 0.0) -> None:
        """Until ``key`` is kept or the request expected to keep it ended, at most ``timeout`` seconds; a key
        neither kept nor expected is waited for ``unknown_wait`` seconds at most (its request may be on its
        way), one expected with another token not at all. Then read it with :meth:`region` (NotFound if absent)."""
        now = time.monotonic()
        deadline, unknown_until = now + max(0.0, timeout), now + min(max(0.0, unknown_wait), max(0.0, timeout))
        while self.get(key, token) is None:
            left = deadline - time.monotonic()
            item = self._expected.get(key)
            if item is None:
                left = unknown_until - time.monotonic()
            if left <= 0:
                return
            if item is not None and not hmac.compare_digest(item[0], bytes(token)):
                return  # another frame's capability: answered as a tile not kept
            try:
                await asyncio.wait_for((item[1] if item is not None else self._news).wait(), left)
            except asyncio.TimeoutError:
                return
            if item is not None:
                return  # settled: kept or failed

    def __len__(self) -> int:
        return len(self._tiles)

    def _drop_oldest(self) -> None:
        _, (t, _, _) = self._tiles.popitem(last=False)
        self.bytes -= t.numel() * t.element_size()
        self.evicted += 1

    def _expire(self) -> None:
        now = self.clock()
        while self._tiles and next(iter(self._tiles.values()))[1] <= now:
            self._drop_oldest()

    def put(self, key: Key, tile: torch.Tensor, token: bytes) -> None:
        """Keep ``tile`` under ``key``, readable only with ``token`` (the frame's halo_token)."""
        check_token(token)
        size = tile.numel() * tile.element_size()
        if size > self.max_bytes:
            raise TooLarge(f"a kept tile of {size} bytes exceeds this worker's tile store ({self.max_bytes} bytes); "
                           "use more tiles or let the coordinator gather this block")
        self._expire()
        old = self._tiles.pop(key, None)
        if old is not None:
            self.bytes -= old[0].numel() * old[0].element_size()
        while self._tiles and (self.bytes + size > self.max_bytes or len(self._tiles) >= self.max_tiles):
            self._drop_oldest()
        self._tiles[key] = (tile, self.clock() + self.ttl_seconds, bytes(token))
        self.bytes += size

    def get(self, key: Key, token: bytes) -> torch.Tensor | None:
        """The tile kept under ``key`` with ``token``; None when not kept or kept with another token."""
        self._expire()
        item = self._tiles.get(key)
        if item is None or not hmac.compare_digest(item[2], bytes(token)):
            return None
        return item[0]

    def region(self, key: Key, want: Region, token: bytes) -> torch.Tensor:
        """The part ``want`` (map coordinates) of the kept tile ``key``; NotFound when not kept (or another token)."""
        t = self.get(key, token)
        if t is None:
            raise NotFound(f"tile {key[4]} of {key[2]}@{key[3]} (agent {key[0]!r}, seq {key[1]}) is not kept here "
                           "(never stored, evicted or expired)")
        r0, _, c0, _ = key[4]
        return t[..., want.rows.start - r0: want.rows.stop - r0, want.cols.start - c0: want.cols.stop - c0]


def check_token(token: bytes) -> None:
    """InvalidInput unless ``token`` is a halo_token of exactly TOKEN_BYTES bytes."""
    if len(token) != TOKEN_BYTES:
        raise InvalidInput(f"halo_token is {len(token)} bytes; a request that keeps its output or names crop parts "
                           f"carries its frame's {TOKEN_BYTES}-byte token (secrets.token_bytes({TOKEN_BYTES}), one "
                           "per frame's parallel stage, the same in every request of that frame)")


def region_of(msg: tiles_pb2.TileRegion) -> Region:
    if msg.row_stop <= msg.row_start or msg.col_stop <= msg.col_start:
        raise InvalidInput(f"tile region rows [{msg.row_start}, {msg.row_stop}) x cols [{msg.col_start}, "
                           f"{msg.col_stop}) is empty")
    return Region.of(msg.row_start, msg.row_stop, msg.col_start, msg.col_stop)


def _inside(inner: Region, outer: Region) -> bool:
    return (outer.rows.start <= inner.rows.start and inner.rows.stop <= outer.rows.stop
            and outer.cols.start <= inner.cols.start and inner.cols.stop <= outer.cols.stop)


def _overlap(a: Region, b: Region) -> bool:
    return (a.rows.start < b.rows.stop and b.rows.start < a.rows.stop
            and a.cols.start < b.cols.stop and b.cols.start < a.cols.stop)


def check_parts(parts: Sequence[tiles_pb2.CropPart], crop: Region) -> list[tuple[str, Region, Region]]:
    """(address, stored tile, region) of each part, after checking that the parts cover ``crop`` exactly."""
    if len(parts) > MAX_PARTS:
        raise InvalidInput(f"{len(parts)} crop parts; at most {MAX_PARTS}")
    out: list[tuple[str, Region, Region]] = []
    for i, p in enumerate(parts):
        if len(p.address) > MAX_ADDRESS:
            raise InvalidInput(f"crop part {i}: address longer than {MAX_ADDRESS} characters")
        tile, want = region_of(p.tile), region_of(p.region)
        if not (_inside(want, tile) and _inside(want, crop)):
            raise InvalidInput(f"crop part {i}: region {want} must lie inside its tile {tile} and the crop {crop}")
        if any(_overlap(want, o) for _, _, o in out):
            raise InvalidInput(f"crop part {i}: region {want} overlaps another part")
        out.append((p.address, tile, want))
    if sum(w.area for _, _, w in out) != crop.area:
        raise InvalidInput(f"the crop parts cover {sum(w.area for _, _, w in out)} of the crop's {crop.area} pixels "
                           f"({crop}); they must cover it exactly")
    return out


def assemble(crop: Region, pieces: Sequence[tuple[Region, torch.Tensor]]) -> torch.Tensor:
    """The crop [1, C, rows, cols] from its parts (map coordinates); torch work: call it off the loop."""
    first = pieces[0][1]
    x = first.new_empty((*first.shape[:-2], *crop.shape))
    for r, t in pieces:
        x[..., r.rows.start - crop.rows.start: r.rows.stop - crop.rows.start,
          r.cols.start - crop.cols.start: r.cols.stop - crop.cols.start] = t
    return x


def host_of(address: str) -> str:
    """HOST of HOST:PORT ("[::1]" of "[::1]:50051")."""
    return address.rsplit(":", 1)[0]


class Peers:
    """Channels to neighbour workers (this worker's own credentials), at most MAX_PEERS, and the fetch.

    Only addresses in ``allowed`` (the worker's ``halo_peers``: HOST:PORT exactly, or HOST for any of its
    ports) are dialled: the addresses come from the agent's tile request, and the worker presents its own
    credentials (token or certificate) to whatever it dials."""

    def __init__(self, transport: TransportOptions, allowed: Sequence[str] = ()):
        self.transport = transport
        self.allowed = frozenset(a.strip() for a in allowed)
        self._channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        self.closed = False  # drained: no channel is opened again

    def __len__(self) -> int:
        return len(self._channels)

    def check(self, address: str) -> None:
        """PermissionDenied unless ``address`` is one of the allowed halo peers."""
        if address not in self.allowed and host_of(address) not in self.allowed:
            raise PermissionDenied(f"halo part from {address[:MAX_ADDRESS]!r}: not among this worker's --halo-peer "
                                   f"addresses ({', '.join(sorted(self.allowed)) or 'none: halo exchange is off'})")

    def stub(self, address: str) -> tiles_pb2_grpc.TilesStub:
        if self.closed:
            raise PreconditionFailed("this worker is draining: it fetches no halo parts any more")
        ch = self._channels.pop(address, None)
        if ch is None:
            ch = self.transport.aio_channel(address)
        self._channels[address] = ch
        while len(self._channels) > MAX_PEERS:
            _, old = self._channels.popitem(last=False)
            asyncio.get_running_loop().create_task(old.close())
        return tiles_pb2_grpc.TilesStub(ch)  # type: ignore[no-untyped-call]  # generated, unannotated

    async def fetch(self, address: str, header: pb.FrameHeader, token: bytes, tile: Region, want: Region,
                    channels: int, timeout: float, max_bytes: int) -> torch.Tensor:
        """``want`` of the tile ``tile`` kept by ``address``; PreconditionFailed when it cannot be had."""
        req = tiles_pb2.FetchRegionRequest(header=header, tile=_msg(tile), region=_msg(want), halo_token=token)
        try:
            res = await self.stub(address).FetchRegion(req, timeout=timeout)
        except grpc.RpcError as e:
            err = from_rpc_error(e)
            raise PreconditionFailed(f"halo part {want} from {address}: {err.code.name} {err}") from None
        expect = [1, channels, *want.shape]
        if list(res.part.shape) != expect or res.part.dtype != "float32":
            raise PreconditionFailed(f"halo part from {address} is {list(res.part.shape)} {res.part.dtype}; wanted {expect}")
        try:
            return decode_tensor(res.part, max_bytes=max_bytes)
        except EdgesplitError as e:
            raise PreconditionFailed(f"halo part from {address} does not decode: {e}") from None

    async def close(self) -> None:
        """Close every channel to a neighbour (the worker's drain) and open none again."""
        self.closed = True
        channels = list(self._channels.values())
        self._channels.clear()
        await asyncio.gather(*(ch.close() for ch in channels))


def _msg(r: Region) -> tiles_pb2.TileRegion:
    return tiles_pb2.TileRegion(row_start=r.rows.start, row_stop=r.rows.stop, col_start=r.cols.start, col_stop=r.cols.stop)


def fetch_answer(store: TileStore, req: tiles_pb2.FetchRegionRequest, max_bytes: int) -> tiles_pb2.FetchRegionResult:
    """FetchRegion's answer from ``store``, after checking the request (InvalidInput, NotFound, TooLarge)."""
    h = req.header
    if not (h.agent_id and h.model_id and h.split_id):
        raise InvalidInput("a FetchRegion header needs agent_id, model_id and split_id (the split of the stored map)")
    check_token(req.halo_token)
    tile, want = region_of(req.tile), region_of(req.region)
    if not _inside(want, tile):
        raise InvalidInput(f"region {want} is not inside the stored tile {tile}")
    part = store.region(key_of(h, h.split_id, tile), want, req.halo_token)
    size = part.numel() * part.element_size()
    if size > max_bytes:
        raise TooLarge(f"the part is {size} bytes, above this worker's max_tensor_bytes {max_bytes}")
    return tiles_pb2.FetchRegionResult(part=get_codec("raw").encode(part.contiguous()))
