"""A failed halo exchange resumes from what is still valid (runtime.agent.parallel_recover, issue 13),
the agent may refuse the halo exchange (--no-parallel-halo), halo tiles report the bytes moved worker
to worker, and a draining worker closes its channels to its neighbours. Real worker processes on
loopback (helpers and fixtures of tests/test_parallel_halo.py)."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest

from runtime.agent.parallel import CoordinatorOptions, ParallelCoordinator
from runtime.parallel.plan import ParallelStage, TiledBlock
from tests.test_parallel_halo import _close, _frames, _stage, image, loaded, reference  # noqa: F401 (fixtures)
from tests.test_security_endpoints import site  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(240)]

PEERS = ("--torch-threads", "1", "--halo-peer", "127.0.0.1")


def _three(addresses) -> ParallelStage:
    """Blocks 0 and 1 on the first two workers, kept on them; block 2 on all three, by halo exchange."""
    return ParallelStage(tuple(addresses), (TiledBlock("maxpool", "add_2", (1, 1, 0), grid_cols=2),
                                            TiledBlock("add_2", "add_4", (2, 1, 0), halo=True),
                                            TiledBlock("add_4", "add_6", (1, 1, 1), halo=True)))


def test_worker_killed_at_a_later_block_reruns_only_its_tiles(start_worker, loaded, image, reference):  # noqa: F811
    """The victim holds a tile of block 2 only and dies once block 1 is in: blocks 0 and 1 are neither run
    again nor lost (block 1's kept tiles are fetched back from the two survivors), and only the victim's
    tile of block 2 is computed again, on a survivor. Before, the whole stage ran again from block 0."""
    (_, pa), (_, pb), (victim, pv) = (start_worker(*PEERS) for _ in range(3))
    addresses = [f"127.0.0.1:{p}" for p in (pa, pb, pv)]

    def kill_after_block_1(i, reports):
        if i == 1:  # no wavefront: block 2's tiles are sent only after this
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)

    async def go():
        coord = ParallelCoordinator(loaded, _three(addresses), CoordinatorOptions(tile_deadline_seconds=30, wavefront=False))
        try:
            out = [await coord.run_frame(image, on_block=kill_after_block_1 if n == 0 else None) for n in range(2)]
            return out, coord.halo_fallbacks, coord.metrics.registry
        finally:
            await coord.close()

    frames, fallbacks, registry = asyncio.run(asyncio.wait_for(go(), 200))
    assert fallbacks == 2  # this frame and the next (the victim stays dead)
    assert registry.get_sample_value("edgesplit_agent_halo_recovered_tiles_total", {"how": "recomputed"}) == 2
    assert registry.get_sample_value("edgesplit_agent_halo_recovered_tiles_total", {"how": "fetched"}) == 4
    for y, reports in frames:
        assert _close(y, reference)
        assert len([r for r in reports if r.block == 0]) == 2 and len([r for r in reports if r.block == 1]) == 2
        last = [r for r in reports if r.block == 2]
        assert len(last) == 4  # three tiles, and the victim's once more
        again = [r for r in last if r.planned == addresses[2] and r.ran_on]
        assert len(again) == 1 and again[0].ran_on in addresses[:2]
        assert all(r.ran_on != addresses[2] for r in reports)


def test_the_agent_may_refuse_the_halo_exchange(start_worker, loaded, image, reference):  # noqa: F811
    """A stage with halo blocks run with CoordinatorOptions(halo=False) (edgesplit agent --no-parallel-halo):
    every block gathered and scattered by the agent, nothing kept on the workers, the same output."""
    workers = [start_worker(*PEERS) for _ in range(2)]
    addresses = [f"127.0.0.1:{port}" for _, port in workers]
    stage = _stage(addresses)
    assert any(b.halo for b in stage.blocks)

    async def go(halo: bool):
        coord = ParallelCoordinator(loaded, stage, CoordinatorOptions(tile_deadline_seconds=30, halo=halo))
        try:
            return await coord.run_frame(image), coord.halo_fallbacks
        finally:
            await coord.close()

    (y, reports), fallbacks = asyncio.run(asyncio.wait_for(go(False), 120))
    assert _close(y, reference) and fallbacks == 0
    assert all(r.received_bytes > 0 and r.peer_bytes == 0 and r.ran_on in addresses for r in reports)

    (y, reports), fallbacks = asyncio.run(asyncio.wait_for(go(True), 120))  # the same stage with it
    assert _close(y, reference) and fallbacks == 0
    assert all(r.peer_bytes == 0 for r in reports if r.block == 0)  # block 0 is sent its crops
    assert all(r.peer_bytes > 0 for r in reports if r.block == 1)  # each band reads its neighbour's half
    c_in = {1: int(loaded.split("add_2").out_shape[1]), 2: int(loaded.split("add_4").out_shape[1])}
    for r in reports:  # a part from a neighbour is at most the tile's whole crop (raw float32)
        assert r.block == 0 or r.peer_bytes <= c_in[r.block] * 4 * 56 * 56


def test_the_agent_flag_reaches_the_pushed_stage(loaded):  # noqa: F811
    from runtime.agent.client import Agent
    from runtime.agent.config import InitialPlan
    from runtime.cli.common import component_config
    from runtime.cli.main import build_parser
    from runtime.wire.codec import get_codec

    off = component_config(build_parser().parse_args(["agent", "--no-parallel-halo", "--no-parallel-halo-early"]), "agent")
    on = component_config(build_parser().parse_args(["agent"]), "agent")
    assert not off.parallel_halo and on.parallel_halo  # on by default: the plan decides
    assert not off.parallel_halo_early and on.parallel_halo_early

    async def go():
        agents = [Agent(loaded, InitialPlan(loaded.split("output"), get_codec("raw")), c.agent_options()) for c in (off, on)]
        try:
            return [(a.parallel.options.halo, a.parallel.options.halo_early) for a in agents]
        finally:
            for a in agents:
                await a.close()

    assert asyncio.run(go()) == [(False, False), (True, True)]


def test_a_draining_worker_closes_its_channels_to_its_neighbours(tmp_path):
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    async def go():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", metrics_port=-1, halo_peers=("127.0.0.1",)))
        peers = ws.tiles.peers
        peers.stub("127.0.0.1:1")
        peers.stub("127.0.0.1:2")
        channels = list(peers._channels.values())
        assert len(peers) == 2 and all(ch.get_state() != grpc.ChannelConnectivity.SHUTDOWN for ch in channels)
        await ws.drain_and_stop(1.0)
        assert len(peers) == 0 and peers.closed
        assert all(ch.get_state() == grpc.ChannelConnectivity.SHUTDOWN for ch in channels)
        with pytest.raises(Exception, match="draining"):
            peers.stub("127.0.0.1:1")  # none opened again

    asyncio.run(asyncio.wait_for(go(), 60))


def test_an_agent_reads_back_only_its_own_frames_kept_tiles(site, tmp_path):  # noqa: F811
    """FetchRegion's agent role (recovery after a failed exchange) on a worker under TLS + tokens: agent a1
    naming a2 is PERMISSION_DENIED (kept tiles are keyed by the agent id); naming itself it passes the role
    check and, with no such tile kept, is NOT_FOUND; a planner's token is refused by the role policy."""
    from runtime.proto.edgesplit.v1 import inference_pb2 as pb
    from runtime.proto.edgesplit.v1 import tiles_pb2, tiles_pb2_grpc
    from runtime.wire.transport import TransportOptions
    from tests.test_security_endpoints import client, server_settings, start

    d = site  # a CA, certificates and tokens (tests/test_security_endpoints.py's fixture)

    async def fetch(security, agent_id: str) -> grpc.StatusCode:
        req = tiles_pb2.FetchRegionRequest(header=pb.FrameHeader(agent_id=agent_id, seq=1, model_id="resnet18",
                                                                 split_id="add_2"),
                                           tile=tiles_pb2.TileRegion(row_stop=4, col_stop=4),
                                           region=tiles_pb2.TileRegion(row_stop=2, col_stop=2), halo_token=bytes(16))
        async with TransportOptions(security=security).aio_channel(f"127.0.0.1:{handle.port}") as ch:
            try:
                await tiles_pb2_grpc.TilesStub(ch).FetchRegion(req, timeout=5)
            except grpc.aio.AioRpcError as e:
                return e.code()
        return grpc.StatusCode.OK

    async def main():
        nonlocal handle
        handle = await start("worker", server_settings(d, "tls+tokens"), tmp_path)
        try:
            a1, planner = client(d, token="agent-a1"), client(d, token="planner-p1")
            assert await fetch(a1, "a2") == grpc.StatusCode.PERMISSION_DENIED
            assert await fetch(a1, "a1") == grpc.StatusCode.NOT_FOUND
            assert await fetch(planner, "a1") == grpc.StatusCode.PERMISSION_DENIED
        finally:
            await handle.drain_and_stop(0.5)

    handle = None
    asyncio.run(asyncio.wait_for(main(), 120))


@pytest.mark.parametrize("early", [False, True])
def test_every_worker_killed_mid_frame_the_agent_finishes_it(start_worker, loaded, image, reference, early):  # noqa: F811
    """Both workers die once block 0 is kept on them: nothing can be fetched back, no worker is left, and
    the coordinator computes the lost tiles and the later blocks itself; the frame is right and not lost.
    Block 1 is sent after block 0's answers with halo_early=False, the state this describes; with early dispatch
    a worker may already have computed a block-1 tile before the kill (it failed so in CI on 2026-12-04, with
    faster compute): then the frame is still right and not lost, but which later tiles ran where is a race."""
    workers = [start_worker(*PEERS) for _ in range(2)]
    addresses = [f"127.0.0.1:{port}" for _, port in workers]

    def kill_all(i, reports):
        if i == 0:
            for proc, _ in workers:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)

    frames, fallbacks, registry = asyncio.run(asyncio.wait_for(
        _frames(loaded, _stage(addresses), image, on_block=kill_all, early=early), 200))
    y, reports = frames[0]
    assert _close(y, reference) and fallbacks == 1
    assert registry.get_sample_value("edgesplit_agent_halo_recovered_tiles_total", {"how": "fetched"}) is None
    assert len([r for r in reports if r.block == 0 and r.ran_on == "local"]) == 2  # both lost tiles of block 0
    if not early:  # with early dispatch, later blocks' tiles may have run on a worker before the kill
        assert all(r.ran_on in ("", "local") for r in reports if r.block > 0)  # every later tile on the agent
