"""Planner constraints over real gRPC: every Scission constraint shapes QueryPlan and
registration plans as computed by hand, survives a restart, and bad values are INVALID_ARGUMENT
(the profiles and the planner fixture are those of test_planner_service.py)."""

from __future__ import annotations

import json
import sys

import grpc
import pytest
from conftest import terminate, wait_for, wait_serving
from planner_helpers import (
    DEVICE_PROFILE,
    DEVICE_S,
    EDGE_S,
    FAST,
    INPUT,
    MODEL,
    NAMES,
    OUT,
    PARAMS,
    RPC,
    SLOW,
    Planner,
    check_status,
    expected_seconds,
    profile,
    rpc_error,
)

from runtime.proto.edgesplit.v1 import planner_pb2 as pb

pytestmark = pytest.mark.timeout(60)


def test_constraints_shape_the_plan(aio, planner):
    async def scenario():
        # the device may run at most 50 ms: local (90 ms) and a cut after 3 or 4 blocks are out
        plan = await planner.register(constraints=pb.Constraints(max_device_seconds=0.045, objective="latency"))
        assert plan.split_index == 2
        q = await planner.stub.QueryPlan(pb.PlanQuery(agent_id="a1", bandwidth_bytes_per_second=SLOW), timeout=RPC)
        assert {c.split_index for c in q.candidates} <= {0, 1, 2}
        # excluding the only worker leaves the device: with the 45 ms cap nothing is feasible
        none = await planner.register(constraints=pb.Constraints(max_device_seconds=0.045, exclude_workers=["w1"]))
        assert none.version == 0 and "no configuration satisfies" in none.reason

    aio.run(scenario())


def test_throughput_objective_gets_its_own_plan(aio, tmp_path):
    # at 1 MB/s (OUT[2] = 50 kB: 50 ms on the link) the latency is best local: 90 ms, against 60 + 5 + 50 + 3 + 4 =
    # 122 ms for a cut after conv3. Pipelined, that cut's slowest stage is the device's 60 ms (link 50 ms, edge
    # 3 ms): 16.7 fps against 11.1 local, and the next best, after conv4, is the device's 80 ms.
    assert min(range(6), key=lambda a: expected_seconds(a, SLOW)) == 5
    stages = {a: max(sum(DEVICE_S[:a]), ((INPUT, *OUT))[a] / SLOW if a < 5 else 0, sum(EDGE_S[a:]) if a < 5 else 0)
              for a in range(6)}
    assert min(stages, key=stages.get) == 3 and stages[3] == pytest.approx(0.060)

    async def scenario():
        p = await Planner.start(tmp_path / "planner.sqlite", default_bandwidth_bytes_per_second=SLOW)
        try:
            fast = await p.register("a1", constraints=pb.Constraints(objective="latency"))
            pipelined = await p.register("a2", constraints=pb.Constraints(objective="throughput"))
            # the other objective for one query each: the registered one holds otherwise
            q_fast = await p.stub.QueryPlan(pb.PlanQuery(agent_id="a2", top_n=3, constraints=pb.Constraints(
                objective="latency")), timeout=RPC)
            q_pipe = await p.stub.QueryPlan(pb.PlanQuery(agent_id="a1", top_n=3, constraints=pb.Constraints(
                objective="throughput")), timeout=RPC)
            q_own = await p.stub.QueryPlan(pb.PlanQuery(agent_id="a2", top_n=3), timeout=RPC)
        finally:
            await p.stop()
        return fast, pipelined, q_fast, q_pipe, q_own

    fast, pipelined, q_fast, q_pipe, q_own = aio.run(scenario())
    assert (fast.worker_id, fast.split_index) == ("", 5)
    assert fast.predicted_seconds == pytest.approx(0.090) and fast.predicted_fps == pytest.approx(1 / 0.090)
    assert (pipelined.worker_id, pipelined.split_index, pipelined.split_id) == ("w1", 3, "conv3")
    assert pipelined.predicted_fps == pytest.approx(1 / 0.060)
    assert pipelined.predicted_seconds == pytest.approx(expected_seconds(3, SLOW))
    assert expected_seconds(3, SLOW) == pytest.approx(0.122)
    assert [(c.worker_id, c.split_index) for c in q_fast.candidates][:2] == [("", 5), ("w1", 4)]
    for q in (q_pipe, q_own):
        assert [(c.worker_id, c.split_index) for c in q.candidates] == [("w1", 3), ("w1", 4), ("", 5)]
        assert [c.predicted_fps for c in q.candidates] == pytest.approx([1 / 0.060, 1 / 0.080, 1 / 0.090])


# -- the full constraint set -----------------------------------------------------------------------

TIER_OF = {"w1": "edge", "w2": "edge", "w3": "cloud", "": "device"}


def placement(plan: pb.Plan) -> list[str]:
    """The tier that runs each block under ``plan``."""
    return ["device" if b < plan.split_index else TIER_OF[plan.worker_id] for b in range(len(NAMES))]


def tier_seconds(plan: pb.Plan, tier: str) -> float:
    """A tier's time per frame: compute plus the encode it sends and the decode it receives."""
    return sum(v for k, v in plan.breakdown_seconds.items() if k == f"compute:{tier}"
               or (k.startswith("encode:") and k[7:].split("->")[0] == tier)
               or (k.startswith("decode:") and k[7:].split("->")[1] == tier))


def tier_bytes(plan: pb.Plan, tier: str) -> int:
    return PARAMS * placement(plan).count(tier)


BT = pb.BlockTier
CONSTRAINT_CASES = [  # (constraints, what every candidate must satisfy, the best (worker, split) with only w1 on the edge)
    (dict(pin_blocks=[BT(index=2, tier="device")]), lambda p: placement(p)[2] == "device", ("w1", 3)),
    (dict(pin_blocks=[BT(name="conv3", tier="device")]), lambda p: placement(p)[2] == "device", ("w1", 3)),
    (dict(pin_blocks=[BT(layer=25, tier="device")]), lambda p: placement(p)[2] == "device", ("w1", 3)),
    (dict(pin_blocks=[BT(index=0, tier="edge")]), lambda p: placement(p)[0] == "edge", ("w1", 0)),
    (dict(forbid_blocks=[BT(name="conv2", tier="device")]), lambda p: placement(p)[1] != "device", ("w1", 0)),
    (dict(forbid_blocks=[BT(index=4, tier="edge")]), lambda p: placement(p)[4] != "edge", ("", 5)),
    (dict(max_tier_seconds={"edge": 0.004}), lambda p: tier_seconds(p, "edge") <= 0.004, ("w1", 3)),
    (dict(max_tier_seconds={"device": 0.03}), lambda p: tier_seconds(p, "device") <= 0.03, ("w1", 0)),
    (dict(max_tier_seconds={"device": 0.03}, max_device_seconds=0.045),  # the smaller of the two caps holds
     lambda p: tier_seconds(p, "device") <= 0.03, ("w1", 0)),
    (dict(max_tier_share={"device": 0.5}), lambda p: tier_seconds(p, "device") <= 0.5 * p.predicted_seconds, ("w1", 0)),
    (dict(max_tier_share={"edge": 0.05}), lambda p: tier_seconds(p, "edge") <= 0.05 * p.predicted_seconds, ("w1", 3)),
    (dict(max_link_upload_bytes={"device": 100_000}), lambda p: p.predicted_bytes <= 100_000, ("w1", 3)),
    (dict(max_link_upload_bytes={"device": 100_000}, max_upload_bytes=300_000),
     lambda p: p.predicted_bytes <= 100_000, ("w1", 3)),
    (dict(max_memory_bytes={"device": 1_500_000}), lambda p: tier_bytes(p, "device") <= 1_500_000, ("w1", 0)),
    (dict(device_memory_bytes=1_500_000), lambda p: tier_bytes(p, "device") <= 1_500_000, ("w1", 0)),
    (dict(max_memory_bytes={"edge": 2_500_000}), lambda p: tier_bytes(p, "edge") <= 2_500_000, ("w1", 3)),
    (dict(max_tier_seconds={"cloud": 0.001}), lambda p: True, ("w1", 2)),  # no cloud worker: nothing to cap
]


def test_every_constraint_shapes_query_and_registration(aio, planner):
    assert min(range(6), key=lambda a: expected_seconds(a, FAST)) == 2  # unconstrained: w1 after conv2

    async def scenario():
        await planner.register()
        for kw, honours, best in CONSTRAINT_CASES:
            q = await planner.stub.QueryPlan(pb.PlanQuery(agent_id="a1", top_n=4, constraints=pb.Constraints(**kw)),
                                             timeout=RPC)
            assert q.candidates, kw
            assert (q.candidates[0].worker_id, q.candidates[0].split_index) == best, kw
            assert all(honours(c) for c in q.candidates), (kw, [(c.worker_id, c.split_index) for c in q.candidates])
        # the query's constraints were for it alone; registering with them makes them the agent's
        q = await planner.stub.QueryPlan(pb.PlanQuery(agent_id="a1"), timeout=RPC)
        assert (q.candidates[0].worker_id, q.candidates[0].split_index) == ("w1", 2)
        plan = await planner.register(constraints=pb.Constraints(pin_blocks=[BT(name="conv3", tier="device")],
                                                                 max_link_upload_bytes={"device": 20_000}))
        assert (plan.worker_id, plan.split_index) == ("w1", 4)  # conv3 stays and 50 kB is too much: after conv4

    aio.run(scenario())


def test_constraints_on_several_workers_and_tiers(aio, planner):
    slow = tuple(2 * s for s in EDGE_S)  # w2: an edge twice as slow as w1; w3: a cloud 1.5x as slow
    async def scenario():
        await planner.register()
        for wid, port, tier, seconds in (("w2", 50052, "edge", slow), ("w3", 50053, "cloud", tuple(1.5 * s for s in EDGE_S))):
            await planner.stub.RegisterWorker(pb.RegisterWorkerRequest(
                worker_id=wid, address=f"127.0.0.1:{port}", tier=tier, profiles_json=[profile(wid, tier, seconds)]),
                timeout=RPC)

        async def query(**kw):
            q = await planner.stub.QueryPlan(pb.PlanQuery(agent_id="a1", top_n=4, constraints=pb.Constraints(**kw)),
                                             timeout=RPC)
            return [(c.worker_id, c.split_index) for c in q.candidates], q.candidates

        assert (await query())[0][0] == ("w1", 2)
        got, _ = await query(include_workers=["w2"])
        assert got[0] == ("w2", 2) and {w for w, _ in got} <= {"w2", ""}
        got, _ = await query(pin_blocks=[BT(index=0, tier="cloud")])  # only the cloud worker, from the raw input
        assert got == [("w3", 0)]
        got, plans = await query(max_tier_seconds={"edge": 0.001, "cloud": 0.005})
        assert got[0] == ("w3", 3)  # w1 only after conv4 (87 ms), w3 after conv3 (75 ms)
        assert all(tier_seconds(p, TIER_OF[p.worker_id]) <= (0.001 if TIER_OF[p.worker_id] == "edge" else 0.005)
                   or not p.worker_id for p in plans)
        got, _ = await query(include_workers=["w3"], exclude_workers=["w2"], forbid_blocks=[BT(index=4, tier="cloud")])
        assert got == [("", 5)]  # w3 may not run fc and w1 is not included: local

    aio.run(scenario())


def test_constraints_survive_a_restart(aio, tmp_path):
    async def scenario():
        p = await Planner.start(tmp_path / "planner.sqlite")
        try:
            plan = await p.register(constraints=pb.Constraints(forbid_blocks=[BT(layer=15, tier="device")],
                                                               max_tier_share={"edge": 0.2}))
        finally:
            await p.stop()
        assert (plan.worker_id, plan.split_index) == ("w1", 0)  # conv2 stays off the device
        p = await Planner.start(tmp_path / "planner.sqlite")
        try:
            q = await p.stub.QueryPlan(pb.PlanQuery(agent_id="a1", top_n=3), timeout=RPC)
        finally:
            await p.stop()
        assert q.candidates and all(c.split_index <= 1 for c in q.candidates)

    aio.run(scenario())


BAD_CONSTRAINTS = [  # (constraints, what the answer must say)
    (dict(max_tier_seconds={"edge": -1.0}), r"max_tier_seconds\[edge\] must be a finite number of seconds > 0"),
    (dict(max_tier_seconds={"edge": float("nan")}), r"max_tier_seconds\[edge\] must be a finite"),
    (dict(max_tier_seconds={"fog": 1.0}), r"max_tier_seconds: key 'fog' is not a tier: use one of device, edge, cloud"),
    (dict(max_tier_share={"device": 0.0}), r"max_tier_share\[device\] is a share .* in \(0, 1\], not 0"),
    (dict(max_tier_share={"edge": 1.5}), r"max_tier_share\[edge\] is a share .* not 1.5"),
    (dict(max_link_upload_bytes={"device": 0}), r"max_link_upload_bytes\[device\] is 0: give a cap in bytes > 0"),
    (dict(max_memory_bytes={"gpu": 5}), r"max_memory_bytes: key 'gpu' is not a tier"),
    (dict(max_device_seconds=-0.5), r"max_device_seconds must be a finite number >= 0"),
    (dict(pin_blocks=[BT(index=9, tier="edge")]), r"pin_blocks\[0\]: block 9 is out of range: tinynet's profile has 5 blocks \(0-4\)"),
    (dict(pin_blocks=[BT(name="conv9", tier="edge")]), r"no block named 'conv9' \(its blocks: conv1, conv2"),
    (dict(forbid_blocks=[BT(layer=99, tier="edge")]), r"forbid_blocks\[0\]: no block .* holds layer 99"),
    (dict(pin_blocks=[BT(tier="edge")]), r"pin_blocks\[0\] names no block: set its index, name or layer"),
    (dict(pin_blocks=[BT(index=1, tier="fog")]), r"pin_blocks\[0\].tier 'fog' is not a tier"),
    (dict(pin_blocks=[BT(index=1, tier="edge")], forbid_blocks=[BT(name="conv2", tier="edge")]),
     r"block 1 \(conv2\) is pinned to edge and forbidden on edge: drop one"),
    (dict(pin_blocks=[BT(index=1, tier="edge"), BT(layer=12, tier="device")]), r"pinned to both edge and device"),
    (dict(pin_blocks=[BT(index=1, tier="edge"), BT(index=3, tier="device")]),
     r"block 3 \(conv4\) is pinned to device but the earlier block 1 \(conv2\) to edge"),
    (dict(pin_blocks=[BT(index=1, tier="edge"), BT(index=3, tier="cloud")]), r"pinned to both edge and cloud.*one worker"),
    (dict(forbid_blocks=[BT(index=2, tier=t) for t in ("device", "edge", "cloud")]), r"forbidden on every tier"),
    (dict(raw_input_stays=True, forbid_blocks=[BT(index=0, tier="device")]), r"raw_input_stays keeps block 0 \(conv1\)"),
    (dict(raw_input_stays=True, pin_blocks=[BT(index=0, tier="edge")]), r"raw_input_stays .* pinned to edge"),
    (dict(include_workers=["w1"], exclude_workers=["w1"]), r"include and exclude the same workers \['w1'\]"),
    (dict(include_workers=["bad id!"]), r"constraints.include_worker 'bad id!' is not a valid id"),
]


def test_bad_constraints_are_invalid_argument(aio, planner):
    async def scenario():
        await planner.register()
        for kw, phrase in BAD_CONSTRAINTS:
            c = pb.Constraints(**kw)
            err = await rpc_error(planner.stub.QueryPlan(pb.PlanQuery(agent_id="a1", constraints=c), timeout=RPC))
            check_status(err, grpc.StatusCode.INVALID_ARGUMENT, phrase)
            err = await rpc_error(planner.stub.RegisterAgent(pb.RegisterAgentRequest(
                agent_id="a2", model_id=MODEL, profile_json=DEVICE_PROFILE, constraints=c), timeout=RPC))
            check_status(err, grpc.StatusCode.INVALID_ARGUMENT, phrase)
        assert set(await planner.agents()) == {"a1"}  # nothing was registered by a bad request

    aio.run(scenario())


def test_cli_query_takes_constraints(aio, planner, capsys):
    from runtime.cli.main import build_parser
    from runtime.contracts.errors import InvalidInput

    aio.run(planner.register())
    parser = build_parser()
    base = ["planner", "query", "--planner", planner.address, "--agent", "a1", "--json"]
    args = parser.parse_args([*base, "--pin-block", "conv3=device", "--max-upload", "device=20000", "--max-tier-share", "edge=0.5", "--max-memory", "device=4500000"])
    assert args.func(args) == 0
    got = [(c["worker_id"], c["split_index"]) for c in json.loads(capsys.readouterr().out)["candidates"]]
    assert got == [("w1", 4)]  # conv3 on the board, 50 kB too many, the board holds at most 4 blocks: no local
    args = parser.parse_args([*base, "--pin-layer", "5=edge", "--include", "w1", "--objective", "throughput"])
    assert args.func(args) == 0
    assert {c["split_index"] for c in json.loads(capsys.readouterr().out)["candidates"]} == {0}
    for bad, phrase in ((["--max-tier-share", "edge=2"], r"max_tier_share\[edge\] is a share"),
                        (["--pin-block", "conv3"], "--pin-block takes BLOCK=TIER"),
                        (["--max-tier-seconds", "fog=1"], "'fog' is not a tier")):
        with pytest.raises(InvalidInput, match=phrase):
            args = parser.parse_args(base + bad)
            args.func(args)


def test_planner_listen_is_planner_serve(capsys):
    from runtime.cli.main import build_parser, main

    parser = build_parser()
    flags = ["--listen", "127.0.0.1:0", "--db", "p.sqlite", "--grace-seconds", "1", "--no-include-return"]
    short, full = parser.parse_args(["planner", *flags]), parser.parse_args(["planner", "serve", *flags])
    assert vars(short) == vars(full) and short.listen == "127.0.0.1:0" and short.include_return is False
    with pytest.raises(SystemExit) as e:  # the flags are serve's: so is the help
        main(["planner", "--listen", "127.0.0.1:0", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "usage: edgesplit planner serve" in out and "--listen LISTEN" in out
    assert "(default: '127.0.0.1:50061')" in out
    with pytest.raises(SystemExit) as e:  # the group's own help still lists its subcommands
        main(["planner", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "{serve,print-config,query,agents}" in out and "is short for 'edgesplit planner serve" in out


def test_planner_listen_command_answers_health_and_drains_on_sigterm(reaper, tmp_path):
    # as test_planner_service.py's serve test, in the form the issue gives: edgesplit planner --listen HOST:PORT
    port_file = tmp_path / "port"
    proc = reaper.spawn([sys.executable, "-m", "runtime.cli.main", "planner", "--listen", "127.0.0.1:0",
                         "--port-file", str(port_file), "--db", str(tmp_path / "p.sqlite"), "--grace-seconds", "1"],
                        log=tmp_path / "log")
    port = wait_for(lambda: port_file.exists() and port_file.read_text().endswith("\n")
                    and port_file.read_text().strip(), 30, "the planner's port file", proc)
    wait_serving(f"127.0.0.1:{port}", proc, timeout=30)
    assert terminate(proc, timeout=15) == 0
    assert (tmp_path / "p.sqlite").exists()


# -- hysteresis (pure) -----------------------------------------------------------------------------
