"""A parallel plan stage (RFS/DPFP) over real worker processes on loopback.

The coordinator (runtime.agent.parallel) spreads ResNet-18's conv stages (residual blocks inside
each fused block) over two workers by row bands with halos; the frame's output must equal the
unsplit model's within TOL (the tiled convolutions accumulate in another order: not bit-identical),
also when a worker is killed mid-frame, and the worker refuses malformed tile requests with the
right status before allocating anything.
"""

from __future__ import annotations

import asyncio
import signal
import socket

import grpc
import pytest
import torch

from runtime.agent.parallel import LOCAL, CoordinatorOptions, ParallelCoordinator, region_msg
from runtime.models.loader import load_model
from runtime.parallel.plan import ParallelStage, TiledBlock
from runtime.parallel.receptive import Region
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import tiles_pb2, tiles_pb2_grpc
from runtime.wire.codec import get_codec

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(240)]

TOL = 1e-5  # max abs error relative to the output's scale (measured ~1e-7 on ResNet-18 logits)
MODEL = "resnet18"
# maxpool (56x56) .. add_2 (layer1 + the first block of layer2; a 1 x 2 grid) .. add_4 .. add_6 (14 -> 7 rows)
BLOCKS = (("maxpool", "add_2", (1, 1), 2), ("add_2", "add_4", (2, 1), 1), ("add_4", "add_6", (1, 1), 1))


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def image(loaded):
    return torch.randn(loaded.input_shape, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def reference(loaded, image):
    with torch.inference_mode():
        return loaded.full(image)


def _stage(addresses):
    n = len(addresses)
    return ParallelStage(tuple(addresses), tuple(TiledBlock(a, b, s[:n], grid_cols=min(c, n)) for a, b, s, c in BLOCKS))


def _run(coro, timeout=120.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _close(y, ref):
    return float((y - ref).abs().max() / ref.abs().max()) <= TOL


def test_parallel_stage_equals_unsplit_model(start_worker, loaded, image, reference):
    workers = [start_worker("--torch-threads", "1") for _ in range(2)]
    addresses = [f"127.0.0.1:{port}" for _, port in workers]

    async def go():
        coord = ParallelCoordinator(loaded, _stage(addresses), CoordinatorOptions(tile_deadline_seconds=30))
        try:
            assert await coord.prepare(timeout=60) == {}  # both load the model and accept its weights
            return await coord.run_frame(image), coord.metrics.registry
        finally:
            await coord.close()

    (y, reports), registry = _run(go())
    for address in addresses:  # per-worker tile times in the agent's metrics
        assert registry.get_sample_value("edgesplit_agent_tile_seconds_count", {"worker": address}) == 3
    assert _close(y, reference)
    assert y.argmax() == reference.argmax()
    # every tile ran where it was planned, none failed; shares 2:1 give the first worker 2/3 of the rows
    assert [r.ran_on for r in reports] == [r.planned for r in reports]
    assert not any(r.failures for r in reports)
    block1 = [r for r in reports if r.block == 1]
    assert [r.rows for r in block1] == [(0, 9), (9, 14)]  # add_4 has 14 rows
    block0 = [r for r in reports if r.block == 0]  # a 1 x 2 grid: all 28 rows, columns halved
    assert [(r.rows, r.cols) for r in block0] == [((0, 28), (0, 14)), ((0, 28), (14, 28))]
    assert all(r.compute_seconds > 0 and r.sent_bytes > 0 for r in reports)


def test_worker_killed_mid_frame_loses_nothing(start_worker, loaded, image, reference):
    (victim, vport), (_, sport) = (start_worker("--torch-threads", "1") for _ in range(2))
    victim_addr, survivor = f"127.0.0.1:{vport}", f"127.0.0.1:{sport}"

    def kill_after_first_block(i, reports):
        if i == 0:  # the victim answered block 0; it dies before block 1 is scattered
            assert {r.ran_on for r in reports} == {victim_addr, survivor}
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)

    async def go():
        coord = ParallelCoordinator(loaded, _stage([victim_addr, survivor]), CoordinatorOptions(tile_deadline_seconds=30))
        try:
            first = await coord.run_frame(image, on_block=kill_after_first_block)
            second = await coord.run_frame(image)  # the next frame tries the victim again, and recovers too
            return first, second
        finally:
            await coord.close()

    (y, reports), (y2, reports2) = _run(go())
    assert _close(y, reference) and _close(y2, reference)
    later = [r for r in reports if r.block > 0]
    moved = [r for r in later if r.planned == victim_addr]
    assert moved and all(r.ran_on in (survivor, LOCAL) for r in moved)
    assert moved[0].failures == [f"{victim_addr}: UNAVAILABLE"]  # later blocks skip the victim at once
    assert all(r.ran_on != victim_addr for r in later)
    assert all(r.ran_on != victim_addr for r in reports2)


def test_worker_killed_while_computing_its_tile_loses_nothing(start_worker, loaded, image, reference):
    """The kill lands while the victim's block-0 tile is in flight (the victim is stopped first, so it cannot have
    answered): the call fails at once (not at its 30 s deadline) and the tile is computed elsewhere."""
    (victim, vport), (_, sport) = (start_worker("--torch-threads", "1") for _ in range(2))
    victim_addr, survivor = f"127.0.0.1:{vport}", f"127.0.0.1:{sport}"

    async def go():
        coord = ParallelCoordinator(loaded, _stage([victim_addr, survivor]), CoordinatorOptions(tile_deadline_seconds=30))
        try:
            assert await coord.prepare(timeout=60) == {}  # both hold the model: the frame's first calls are tiles
            victim.send_signal(signal.SIGSTOP)
            frame = asyncio.create_task(coord.run_frame(image))
            await asyncio.sleep(1.0)  # the head (stem) ran and block 0's tiles were sent; the victim's hangs
            assert not frame.done()
            victim.send_signal(signal.SIGKILL)
            await asyncio.to_thread(victim.wait, 10)
            return await frame
        finally:
            await coord.close()

    y, reports = _run(go())
    assert _close(y, reference)
    first = next(r for r in reports if r.planned == victim_addr)
    assert first.block == 0 and first.ran_on in (survivor, LOCAL), first
    assert len(first.failures) == 1 and first.failures[0].startswith(f"{victim_addr}: ")
    assert "DEADLINE_EXCEEDED" not in first.failures[0]  # the broken call failed; it did not wait out its deadline
    print("victim's tile:", first.failures, "->", first.ran_on)
    assert all(r.ran_on != victim_addr for r in reports)


def test_worker_that_stops_answering_misses_its_deadline(start_worker, loaded, image, reference):
    (frozen, fport), (_, sport) = (start_worker("--torch-threads", "1") for _ in range(2))
    frozen_addr, survivor = f"127.0.0.1:{fport}", f"127.0.0.1:{sport}"
    frozen.send_signal(signal.SIGSTOP)  # alive but silent: its tiles time out
    try:
        async def go():
            coord = ParallelCoordinator(loaded, _stage([frozen_addr, survivor]), CoordinatorOptions(tile_deadline_seconds=2))
            try:
                return await coord.run_frame(image)
            finally:
                await coord.close()

        y, reports = _run(go())
    finally:
        frozen.send_signal(signal.SIGCONT)
    assert _close(y, reference)
    first = next(r for r in reports if r.planned == frozen_addr)
    assert first.failures == [f"{frozen_addr}: DEADLINE_EXCEEDED"] and first.ran_on in (survivor, LOCAL)
    assert all(r.ran_on != frozen_addr for r in reports)


def test_all_workers_gone_runs_locally(loaded, image, reference):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stage = _stage([f"127.0.0.1:{port}"])
    opts = CoordinatorOptions(tile_deadline_seconds=5)

    async def go():
        coord = ParallelCoordinator(loaded, stage, opts)
        try:
            return await coord.run_frame(image)
        finally:
            await coord.close()

    y, reports = _run(go())
    assert _close(y, reference)
    assert all(r.ran_on == LOCAL for r in reports)

    async def prepare():
        coord = ParallelCoordinator(loaded, stage, opts)
        try:
            return await coord.prepare(timeout=5)
        finally:
            await coord.close()

    assert _run(prepare()) == {stage.workers[0]: "UNAVAILABLE"}
    assert all(r.failures for r in reports if r.block == 0)  # later blocks skip the worker that failed


def _request(loaded, **over):
    """A valid tile request for block maxpool..add_2, top half, unless fields are overridden."""
    from runtime.parallel.tiled import TiledSegment

    seg = TiledSegment(loaded.sliced, "maxpool", "add_2")
    reg = seg.regions((56, 56), [Region.of(0, 14, 0, 28)])[0]
    crop = torch.zeros(1, 64, *reg.input.shape)
    msg = tiles_pb2.TileRequest(
        header=pb.FrameHeader(model_id=MODEL, split_id="maxpool", end_split="add_2", model_digest=loaded.digest),
        input_height=56, input_width=56, output=region_msg(reg.output), input=region_msg(reg.input),
        crop=get_codec("raw").encode(crop))
    for k, v in over.items():
        if k == "crop_shape":
            msg.crop.CopyFrom(get_codec("raw").encode(torch.zeros(v)))
        elif k == "header":
            msg.header.MergeFrom(v)
        elif k == "input":
            msg.input.CopyFrom(v)
        else:
            setattr(msg, k, v)
    return msg


@pytest.mark.parametrize("over, code, phrase", [
    ({}, grpc.StatusCode.OK, ""),
    ({"input": tiles_pb2.TileRegion(row_start=0, row_stop=5, col_start=0, col_stop=5)},
     grpc.StatusCode.INVALID_ARGUMENT, "reads"),
    ({"crop_shape": (1, 3, 17, 30)}, grpc.StatusCode.INVALID_ARGUMENT, "this tile needs"),
    ({"input_height": 100_000}, grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
    ({"header": pb.FrameHeader(end_split="output")}, grpc.StatusCode.INVALID_ARGUMENT, "cannot be tiled"),
    ({"header": pb.FrameHeader(end_split="avgpool")}, grpc.StatusCode.INVALID_ARGUMENT, "cannot be tiled"),
    ({"header": pb.FrameHeader(model_digest="other")}, grpc.StatusCode.FAILED_PRECONDITION, "weights differ"),
    ({"header": pb.FrameHeader(model_id="nope")}, grpc.StatusCode.NOT_FOUND, "not served"),
    ({"output_codec": "bogus"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown codec"),
])
def test_worker_refuses_bad_tiles(worker, loaded, over, code, phrase):
    _, port = worker
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = tiles_pb2_grpc.TilesStub(ch)
        try:
            res = stub.InferTile(_request(loaded, **over), timeout=60)
        except grpc.RpcError as e:
            assert e.code() == code, e.details()
            assert phrase in e.details()
            return
    assert code == grpc.StatusCode.OK
    assert list(res.tile.shape) == [1, 128, 14, 28]
