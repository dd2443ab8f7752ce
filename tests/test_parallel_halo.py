"""Halo exchange between workers (RFS/DPFP, issue 13): the worker's bounded tile store, the crop-part
checks, Tiles.FetchRegion's checks and role policy, and a parallel stage over real worker processes
whose later blocks take their input from the workers' kept tiles — equal to the unsplit model, and
with a worker killed mid-frame the frame falls back to gather and scatter and is not lost."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest
import torch

from runtime.agent.parallel import CoordinatorOptions, ParallelCoordinator, region_msg
from runtime.contracts.errors import InvalidInput, NotFound, PermissionDenied, TooLarge
from runtime.daemon.auth import AuthInterceptor, Identity, Refused
from runtime.models.loader import load_model
from runtime.parallel.plan import ParallelStage, TiledBlock
from runtime.parallel.receptive import Region
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import tiles_pb2, tiles_pb2_grpc
from runtime.wire.security import SecurityOptions
from runtime.wire.transport import TransportOptions
from runtime.worker.server import AUTH_POLICY
from runtime.worker.tile_store import Peers, TileStore, check_parts, key_of

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(240)]

TOL = 1e-5
MODEL = "resnet18"
# maxpool .. add_2 as a 1x2 grid, then add_2 .. add_4 and add_4 .. add_6 as row bands, both by halo exchange
BLOCKS = (("maxpool", "add_2", (1, 1), 2, False), ("add_2", "add_4", (2, 1), 1, True), ("add_4", "add_6", (1, 1), 1, True))


def _key(seq: int, region=(0, 2, 0, 2)) -> tuple:
    return key_of(pb.FrameHeader(agent_id="a", seq=seq, model_id="m"), "s", Region.of(*region))


TOKEN = bytes(range(16))  # a frame's halo_token


def test_the_tile_store_is_bounded_by_bytes_count_and_age():
    now = [0.0]
    store = TileStore(max_bytes=3 * 64, max_tiles=2, ttl_seconds=5.0, clock=lambda: now[0])
    t = torch.zeros(1, 4, 2, 2)  # 64 bytes
    store.put(_key(1), t, TOKEN)
    store.put(_key(2), t, TOKEN)
    store.put(_key(3), t, TOKEN)  # a third: the oldest goes (count)
    assert store.get(_key(1), TOKEN) is None and store.get(_key(3), TOKEN) is not None and len(store) == 2 and store.evicted == 1
    store.put(_key(4), torch.zeros(1, 8, 2, 2), TOKEN)  # 128 bytes: room for it alone with one of 64
    assert store.bytes <= 3 * 64 and store.get(_key(4), TOKEN) is not None
    now[0] = 5.0  # past the TTL
    assert store.get(_key(4), TOKEN) is None and len(store) == 0 and store.bytes == 0
    with pytest.raises(TooLarge, match="tile store"):
        store.put(_key(5), torch.zeros(1, 16, 2, 2), TOKEN)
    store.put(_key(6, (10, 14, 20, 22)), torch.arange(8.0).reshape(1, 1, 4, 2), TOKEN)
    assert store.region(_key(6, (10, 14, 20, 22)), Region.of(12, 14, 21, 22), TOKEN).flatten().tolist() == [5.0, 7.0]
    with pytest.raises(NotFound, match="not kept here"):
        store.region(_key(7), Region.of(0, 1, 0, 1), TOKEN)
    with pytest.raises(InvalidInput):
        TileStore(max_bytes=0)


def _part(address: str, tile: tuple, region: tuple) -> tiles_pb2.CropPart:
    return tiles_pb2.CropPart(address=address, tile=region_msg(Region.of(*tile)), region=region_msg(Region.of(*region)))


def test_crop_parts_must_cover_the_crop_exactly():
    crop = Region.of(0, 10, 0, 8)
    good = [_part("", (0, 6, 0, 8), (0, 6, 0, 8)), _part("w2:1", (6, 12, 0, 8), (6, 10, 0, 8))]
    assert [(a, w) for a, _, w in check_parts(good, crop)] == [("", Region.of(0, 6, 0, 8)), ("w2:1", Region.of(6, 10, 0, 8))]
    with pytest.raises(InvalidInput, match="cover 48 of the crop's 80"):
        check_parts(good[:1], crop)
    with pytest.raises(InvalidInput, match="overlaps"):
        check_parts([*good, _part("", (0, 6, 0, 8), (5, 6, 0, 8))], crop)
    with pytest.raises(InvalidInput, match="inside its tile"):
        check_parts([_part("", (0, 6, 0, 8), (0, 10, 0, 8))], crop)
    with pytest.raises(InvalidInput, match="at most"):
        check_parts([good[0]] * 65, crop)


def test_fetch_region_is_for_workers_and_agents():
    """Workers read their neighbours' kept tiles; an agent its own frame's kept tiles back after a failed
    exchange (runtime.agent.parallel_recover). Both need the frame's halo_token; no other role may call it."""
    assert AUTH_POLICY["FetchRegion"] == frozenset({"worker", "agent"})
    auth = AuthInterceptor(SecurityOptions(), AUTH_POLICY)
    auth.authorize("/edgesplit.v1.Tiles/FetchRegion", Identity("worker", "w2", "token"))
    auth.authorize("/edgesplit.v1.Tiles/FetchRegion", Identity("agent", "a1", "token"))
    with pytest.raises(Refused) as e:
        auth.authorize("/edgesplit.v1.Tiles/FetchRegion", Identity("planner", "p1", "token"))
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("region, code, phrase", [
    ((0, 2, 0, 2), grpc.StatusCode.NOT_FOUND, "not kept here"),
    ((0, 9, 0, 2), grpc.StatusCode.INVALID_ARGUMENT, "not inside the stored tile"),
    ((3, 3, 0, 2), grpc.StatusCode.INVALID_ARGUMENT, "is empty"),
    (None, grpc.StatusCode.INVALID_ARGUMENT, "16-byte token"),  # no halo_token
])
def test_fetch_region_refuses_what_is_not_kept_or_outside(worker, region, code, phrase):
    _, port = worker
    req = tiles_pb2.FetchRegionRequest(header=pb.FrameHeader(agent_id="a", seq=1, model_id=MODEL, split_id="add_2"),
                                       tile=region_msg(Region.of(0, 4, 0, 4)), region=tiles_pb2.TileRegion(
                                           row_start=region[0], row_stop=region[1], col_start=region[2], col_stop=region[3])
                                       if region else region_msg(Region.of(0, 2, 0, 2)), halo_token=TOKEN if region else b"")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, pytest.raises(grpc.RpcError) as e:
        tiles_pb2_grpc.TilesStub(ch).FetchRegion(req, timeout=30)
    assert e.value.code() == code and phrase in e.value.details()


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def image(loaded):
    return torch.randn(loaded.input_shape, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def reference(loaded, image):
    with torch.inference_mode():
        return loaded.full(image)


def _stage(addresses, halo=True):
    return ParallelStage(tuple(addresses), tuple(TiledBlock(a, b, s, grid_cols=c, halo=h and halo)
                                                 for a, b, s, c, h in BLOCKS))


def _close(y, ref):
    return float((y - ref).abs().max() / ref.abs().max()) <= TOL


async def _frames(loaded, stage, image, n=1, on_block=None, in_flight=1, early=True):
    coord = ParallelCoordinator(loaded, stage, CoordinatorOptions(tile_deadline_seconds=30, halo_early=early))
    try:
        out = [await coord.run_frame(image, on_block=on_block if i == 0 else None) for i in range(n)]
        if in_flight > 1:  # frames in flight at once: each reads only its own kept tiles
            out += await asyncio.gather(*(coord.run_frame(image) for _ in range(in_flight)))
        return out, coord.halo_fallbacks, coord.metrics.registry
    finally:
        await coord.close()


def test_halo_exchange_between_workers_equals_the_unsplit_model(start_worker, loaded, image, reference):
    workers = [start_worker("--torch-threads", "1", "--halo-peer", "127.0.0.1") for _ in range(2)]
    addresses = [f"127.0.0.1:{port}" for _, port in workers]
    frames, fallbacks, _ = asyncio.run(asyncio.wait_for(_frames(loaded, _stage(addresses), image, n=2, in_flight=3), 180))
    assert fallbacks == 0 and len(frames) == 5
    for y, reports in frames:
        assert _close(y, reference)
        kept = [r for r in reports if r.block < 2]
        assert kept and all(r.received_bytes == 0 and r.ran_on in addresses for r in kept)  # nothing gathered
        later = [r for r in reports if r.block > 0]  # crops named as parts, not sent: a few hundred bytes
        assert all(0 < r.sent_bytes < 1000 for r in later)
        assert all(r.received_bytes > 0 for r in reports if r.block == 2)  # the last block is gathered
    gframes, _, _ = asyncio.run(asyncio.wait_for(_frames(loaded, _stage(addresses, halo=False), image), 120))
    y_gather, gathered = gframes[0]
    assert _close(y_gather, reference) and all(r.received_bytes > 0 for r in gathered)


def test_worker_killed_mid_frame_resumes_with_gather_and_loses_nothing(start_worker, loaded, image, reference):
    """The victim dies after block 0: its kept tile is lost with it, the survivor's is fetched back; only the
    lost tile of block 0 is computed again (on the survivor), then blocks 1 and 2 by gather and scatter.
    Block 1 is sent after block 0's answers (halo_early=False): with early dispatch the survivor may already
    have fetched the victim's part and computed block 1 when the victim dies (tests/test_parallel_halo_early.py)."""
    (victim, vport), (_, sport) = (start_worker("--torch-threads", "1", "--halo-peer", "127.0.0.1") for _ in range(2))
    victim_addr, survivor = f"127.0.0.1:{vport}", f"127.0.0.1:{sport}"

    def kill_after_first_block(i, reports):
        if i == 0:  # both keep their block-0 tiles; the victim dies before block 1 fetches from it
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)

    frames, fallbacks, registry = asyncio.run(asyncio.wait_for(
        _frames(loaded, _stage([victim_addr, survivor]), image, n=2, on_block=kill_after_first_block, early=False), 200))
    assert fallbacks == 2  # this frame and the next (the victim stays dead)
    assert registry.get_sample_value("edgesplit_agent_halo_fallbacks_total") == 2
    assert registry.get_sample_value("edgesplit_agent_halo_recovered_tiles_total", {"how": "fetched"}) == 2
    for y, reports in frames:
        assert _close(y, reference)
        first = [r for r in reports if r.block == 0]
        assert len(first) == 3  # its two tiles, and the victim's again: the survivor's was not recomputed
        assert [r.ran_on for r in first].count(survivor) == 2
        assert all(r.ran_on == survivor for r in reports if r.block > 0 and r.ran_on)  # nothing more on the victim


def test_a_worker_dials_only_its_halo_peers_and_the_frame_falls_back(start_worker, loaded, image, reference):
    """The crop parts' addresses come from the agent: a worker started without --halo-peer (the default)
    refuses to dial them (its credentials would go to an address of the agent's choosing), PERMISSION_DENIED,
    and the coordinator resumes the stage with gather and scatter: block 0's kept tiles are fetched back, the
    later blocks computed again; the frame is right and not lost."""
    workers = [start_worker("--torch-threads", "1") for _ in range(2)]
    addresses = [f"127.0.0.1:{port}" for _, port in workers]
    frames, fallbacks, registry = asyncio.run(asyncio.wait_for(_frames(loaded, _stage(addresses), image, n=2), 180))
    assert fallbacks == 1 and registry.get_sample_value("edgesplit_agent_halo_fallbacks_total") == 1
    y, reports = frames[1]  # after the refusal the stage gathers every block: no second fallback
    assert _close(y, reference) and all(r.received_bytes > 0 and not r.failures for r in reports)
    y, reports = frames[0]
    assert _close(y, reference)
    assert len([r for r in reports if r.block == 0]) == 2  # kept, and fetched back by the agent: not recomputed
    assert registry.get_sample_value("edgesplit_agent_halo_recovered_tiles_total", {"how": "fetched"}) == 2
    assert all(r.received_bytes > 0 for r in reports if r.block > 0 and r.ran_on)  # the later blocks gathered


def test_halo_peers_match_an_exact_address_or_a_whole_host():
    peers = Peers(TransportOptions(), ("10.0.0.5:50051", "127.0.0.1"))
    peers.check("10.0.0.5:50051")
    peers.check("127.0.0.1:4242")
    for bad in ("10.0.0.5:50052", "10.0.0.6:50051", "evil.example:443", "127.0.0.10:1"):
        with pytest.raises(PermissionDenied, match="halo-peer"):
            peers.check(bad)
    with pytest.raises(PermissionDenied, match="halo exchange is off"):
        Peers(TransportOptions()).check("127.0.0.1:1")


def test_the_plan_carries_halo_input_and_refuses_it_on_the_first_block():
    stage = _stage(["w0:1", "w1:1"])
    assert [b.halo for b in ParallelStage.from_json(stage.to_json()).blocks] == [False, True, True]
    assert [b.halo for b in ParallelStage.from_proto(stage.to_proto(tiles_pb2.ParallelStage())).blocks] == [False, True, True]
    doc = stage.to_json()
    doc["blocks"][0]["halo_input"] = True
    with pytest.raises(InvalidInput, match="false for the first block"):
        ParallelStage.from_json(doc)
    doc["blocks"][0]["halo_input"] = "yes"
    with pytest.raises(InvalidInput, match="halo_input must be true or false"):
        ParallelStage.from_json(doc)
