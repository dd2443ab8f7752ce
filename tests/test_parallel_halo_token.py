"""The halo exchange's per-frame capability (issue 13 hardening): a kept tile is found by guessable ids
(agent id, seq, model, split, region), so it is stored with its frame's random ``halo_token`` and read
only with it. On a real worker: a tile kept with one token is answered NOT_FOUND to a FetchRegion with
another (the same answer as a tile never kept) and returned with its own; a request that keeps its
output, names crop parts or fetches without a 16-byte token is INVALID_ARGUMENT. (The two-worker frame
equal to the unsplit model, tokens included, is tests/test_parallel_halo.py's.)"""

from __future__ import annotations

import grpc
import pytest
import torch

from runtime.agent.parallel import region_msg
from runtime.contracts.errors import InvalidInput, NotFound
from runtime.models.loader import load_model
from runtime.parallel.receptive import Region
from runtime.parallel.tiled import TiledSegment
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import tiles_pb2, tiles_pb2_grpc
from runtime.wire.codec import decode_tensor, get_codec
from runtime.worker.tile_store import TOKEN_BYTES, TileStore, check_token, key_of

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(120)]

MODEL = "resnet18"
MINE, OTHER = b"\x01" * TOKEN_BYTES, b"\x02" * TOKEN_BYTES


def test_the_store_answers_another_token_as_a_tile_not_kept():
    store = TileStore()
    key = key_of(pb.FrameHeader(agent_id="a", seq=7, model_id="m"), "s", Region.of(0, 2, 0, 2))
    store.put(key, torch.ones(1, 1, 2, 2), MINE)
    assert store.get(key, MINE) is not None and store.get(key, OTHER) is None
    with pytest.raises(NotFound) as wrong:
        store.region(key, Region.of(0, 1, 0, 1), OTHER)
    missing = key_of(pb.FrameHeader(agent_id="a", seq=8, model_id="m"), "s", Region.of(0, 2, 0, 2))
    with pytest.raises(NotFound) as absent:
        store.region(missing, Region.of(0, 1, 0, 1), MINE)
    assert str(wrong.value).replace("seq 7", "seq 8") == str(absent.value)  # nothing tells them apart
    for bad in (b"", b"\x01" * 15, b"\x01" * 17):
        with pytest.raises(InvalidInput, match="16-byte token"):
            check_token(bad)
        with pytest.raises(InvalidInput):
            store.put(key, torch.ones(1, 1, 2, 2), bad)


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL)


def _keep_request(loaded, seq: int, token: bytes) -> tiles_pb2.TileRequest:
    """Block maxpool..add_2, top-left tile of 56x56, its output kept on the worker."""
    seg = TiledSegment(loaded.sliced, "maxpool", "add_2")
    reg = seg.regions((56, 56), [Region.of(0, 14, 0, 28)])[0]
    crop = torch.randn(1, 64, *reg.input.shape, generator=torch.Generator().manual_seed(seq))
    return tiles_pb2.TileRequest(
        header=pb.FrameHeader(agent_id="victim", seq=seq, model_id=MODEL, split_id="maxpool", end_split="add_2",
                              model_digest=loaded.digest),
        input_height=56, input_width=56, output=region_msg(reg.output), input=region_msg(reg.input),
        crop=get_codec("raw").encode(crop), keep_output=True, halo_token=token)


def _fetch(stub, seq: int, token: bytes):
    return stub.FetchRegion(tiles_pb2.FetchRegionRequest(
        header=pb.FrameHeader(agent_id="victim", seq=seq, model_id=MODEL, split_id="add_2"),
        tile=region_msg(Region.of(0, 14, 0, 28)), region=region_msg(Region.of(0, 2, 0, 28)), halo_token=token),
        timeout=60)


def test_a_kept_tile_is_not_found_with_another_token(worker, loaded):
    _, port = worker
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = tiles_pb2_grpc.TilesStub(ch)
        res = stub.InferTile(_keep_request(loaded, 41, MINE), timeout=60)
        assert not res.tile.buffer  # kept, not answered
        with pytest.raises(grpc.RpcError) as wrong:
            _fetch(stub, 41, OTHER)
        with pytest.raises(grpc.RpcError) as absent:
            _fetch(stub, 42, OTHER)  # never kept
        assert wrong.value.code() == absent.value.code() == grpc.StatusCode.NOT_FOUND
        assert wrong.value.details().replace("seq 41", "seq 42") == absent.value.details()
        part = decode_tensor(_fetch(stub, 41, MINE).part)  # the tile was kept all along: its first 2 rows
        req = _keep_request(loaded, 41, MINE)
        seg = TiledSegment(loaded.sliced, "maxpool", "add_2")
        with torch.inference_mode():
            want = seg.run_tile(decode_tensor(req.crop), seg.regions((56, 56), [Region.of(0, 14, 0, 28)])[0])
        assert list(part.shape) == [1, want.shape[1], 2, 28] and torch.allclose(part, want[..., :2, :], atol=1e-5)


@pytest.mark.parametrize("change", ["keep_no_token", "keep_short_token", "parts_no_token", "fetch_short_token"])
def test_a_missing_or_short_token_is_invalid_argument(worker, loaded, change):
    _, port = worker
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, pytest.raises(grpc.RpcError) as e:
        stub = tiles_pb2_grpc.TilesStub(ch)
        if change == "fetch_short_token":
            _fetch(stub, 43, MINE[:8])
        req = _keep_request(loaded, 43, b"" if change != "keep_short_token" else MINE[:15])
        if change == "parts_no_token":  # the crop assembled from kept tiles instead of sent
            req.keep_output = False
            req.ClearField("crop")
            req.parts.add(tile=req.input, region=req.input)
        stub.InferTile(req, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "halo_token is" in e.value.details() and "16-byte token" in e.value.details()
