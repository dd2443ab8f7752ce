"""The recorded adaptivity run's analysis (runtime.tools.adapt_run.analyse) on a hand-made run."""

from __future__ import annotations

import pytest

from runtime.tools.adapt_run import _targets, analyse

pytestmark = pytest.mark.timeout(30)


def _frame(seq: int, t: float, split: str, where: str = "edge", total: float = 100.0, predicted: float = 100.0):
    return {"seq": seq, "t": t, "split": split, "where": where, "times_ms": {"total": total}, "predicted_ms": predicted}


def test_steps_switches_errors_and_lost_frames_are_found():
    frames = [_frame(i, 0.5 * i, "input") for i in range(40)]  # 0-20 s: fast, offloading
    frames += [_frame(40 + i, 20.0 + 0.5 * i, "input" if i < 3 else "output", "local", 300.0, 200.0)
               for i in range(40)]  # 20-40 s: the link dropped; the board after 1.5 s
    frames += [_frame(80 + i, 40.0 + 0.5 * i, "output" if i < 8 else "input", total=110.0) for i in range(40)]
    run = {"frames": frames, "steps": [(0.0, 50.0), (20.0, 1.0), (40.0, 50.0)]}
    a = analyse(run)
    assert (a["lost"], a["duplicated"], a["frames"]) == (0, 0, 120)
    fast, slow, back = a["phases"]
    assert (slow["step"], slow["plan"], slow["first_frame_under_new_plan_s"]) == ("down", "output", 1.5)
    assert slow["fallback_frames"] == 3 and slow["median_rel_error"] == pytest.approx(1 / 3, abs=0.01)
    assert (back["step"], back["plan"], back["first_frame_under_new_plan_s"]) == ("up", "input", 4.0)
    assert fast["switches_per_40s_steady"] == 0 and back["switches_per_40s_steady"] == 0
    assert back["median_rel_error"] == pytest.approx(10 / 110, abs=0.01)
    lines = "\n".join(_targets(a))
    assert ("down to 1 Mbit/s: the first frame under the new plan started 1.5 s after the step, its result 1.5 s "
            "(target <= 2 s): met by its start, met by its result") in lines
    assert "up to 50 Mbit/s: the first frame under the new plan started 4.0 s" in lines


def test_a_lost_frame_and_a_plan_that_never_changed_are_reported():
    frames = [_frame(i, 0.5 * i, "input") for i in range(30) if i != 7]
    frames.append(_frame(3, 1.6, "input"))  # a duplicate result
    a = analyse({"frames": frames, "steps": [(0.0, 50.0), (7.5, 1.0)]})
    assert a["lost"] == 1 and a["duplicated"] == 1
    assert a["phases"][1]["first_frame_under_new_plan_s"] is None  # the plan never followed the link
    assert "NOT met" in "\n".join(_targets(a))


def test_frame_stamps_and_the_prediction_by_stage():
    """Frames are placed by their arrival (started_unix), the switch reported by start and by result, and
    the prediction compared stage by stage with the plan's breakdown read back from the planner."""
    from runtime.tools import adapt_stages

    def frame(seq, start, split, times, version=2, predicted=60.0):
        return {"seq": seq, "t": start + 3.0, "t_start": start, "t_end": start + times["total"] / 1e3, "split": split,
                "where": "edge" if split == "input" else "local", "times_ms": times, "predicted_ms": predicted,
                "plan_version": version}

    edge = {"head": 0.0, "encode": 2.0, "transfer_edge": 90.0, "edge_queue": 5.0, "edge_decode": 3.0,
            "edge_tail": 60.0, "edge_held": 70.0, "board_queue": 1.0, "total": 95.0}
    local = {"head": 180.0, "total": 185.0}
    frames = [frame(i, 0.25 * i, "input", edge) for i in range(80)]
    frames += [frame(80 + i, 20.0 + 0.25 * i, "input" if i < 2 else "output", edge if i < 2 else local, predicted=170.0)
               for i in range(80)]
    parts = adapt_stages.predicted_parts({"compute:device": 0.0, "encode:device->edge": 0.002, "rtt:device->edge": 0.01,
                                          "transfer:device->edge": 0.005, "decode:device->edge": 0.003,
                                          "compute:edge": 0.04})
    run = {"frames": frames, "steps": [(0.0, 50.0), (20.0, 1.0)],
           "breakdowns": [[2, "input", parts], [2, "output", adapt_stages.predicted_parts({"compute:device": 0.17})]]}
    fast, slow = analyse(run)["phases"]
    assert slow["first_frame_started_under_new_plan_s"] == 0.5  # its line came 3 s later: the stamps count
    assert slow["first_frame_under_new_plan_s"] == pytest.approx(0.5 + 0.185, abs=0.01)
    st = fast["stages"]
    assert st["edge"] == {"predicted_ms": 40.0, "measured_ms": 60.0}  # the largest error: the worker's tail
    assert st["network"] == {"predicted_ms": 15.0, "measured_ms": 20.0}  # transfer_edge - edge_held
    assert st["queue"]["measured_ms"] == pytest.approx(5.0 + 2.0 + 1.0)  # worker queue + its other hold + board
    assert slow["stages"]["device"] == {"predicted_ms": 170.0, "measured_ms": 180.0}
    assert "| edge | 40 / 60 | 0 / 0 |" in "\n".join(adapt_stages.table([fast, slow]))


def test_plan_breakdowns_are_read_back_from_the_planners_store(tmp_path):
    from planner.store import Store
    from runtime.proto.edgesplit.v1 import planner_pb2 as pb
    from runtime.tools.adapt_stages import plan_breakdowns

    store = Store(tmp_path / "planner.sqlite")
    plan = pb.Plan(agent_id="board-1", model_id="m", split_id="input", worker_id="w",
                   breakdown_seconds={"compute:edge": 0.04, "transfer:device->edge": 0.01, "rtt:device->edge": 0.01})
    plan.fallbacks.append(pb.BandPlan(plan=pb.Plan(split_id="output", breakdown_seconds={"compute:device": 0.2})))
    version = store.issue_plan(plan).version
    store.close()
    got = plan_breakdowns(tmp_path / "planner.sqlite", "board-1")
    assert got[(version, "input")]["edge"] == 0.04 and got[(version, "input")]["network"] == pytest.approx(0.02)
    assert got[(version, "output")]["device"] == 0.2


def test_the_warm_up_waits_for_the_agent_to_settle():
    from runtime.tools.adapt_run import settled

    def f(t, split, v=1):
        return {"t": t, "split": split, "plan_version": v}

    local = [f(t / 4, "output") for t in range(40)]  # 10 s local under its first plan
    offload = [f(10 + t / 4, "input", 2) for t in range(8)]  # then offloading from 10 s
    assert settled(local, 10.0, 1e6)
    assert not settled(local, 10.0, None) and not settled(local, 10.0, 0.0)  # its link not measured yet
    assert not settled(local + offload, 12.0, 1e6)  # switched 2 s ago: not held for 5 s
    more = [f(12 + t / 4, "input", 2) for t in range(16)]
    assert settled(local + offload + more, 16.0, 1e6)
    assert not settled([f(t / 4, "output", 0) for t in range(40)], 10.0, 1e6)  # the agent's own plan, none of the planner's
    assert not settled(local[:20], 4.9, 1e6)  # younger than the quiet span


def test_frames_given_up_on_a_collapsed_link_are_counted():
    frames = [{"seq": i, "t": 0.5 + i * 0.25, "where": "edge", "split": "input", "plan_version": 1,
               "times_ms": {"total": 50}, "predicted_ms": 50} for i in range(40)]
    frames += [{"seq": 40 + i, "t": 10.5 + i * 0.25, "where": "local", "split": "output", "plan_version": 1,
                "times_ms": {"total": 200}, "predicted_ms": 200} for i in range(40)]
    # given up 0.6 s into its wait (runtime.agent.edge labels it with the deadline's reason), and one that waited 2 s
    frames[40].update(split="input", fallback_reason="deadline: no edge result within 2s",
                      times_ms={"head": 0.1, "encode": 3.0, "local_tail": 200.0, "total": 800.0})
    frames[41].update(split="input", fallback_reason="deadline: no edge result within 2s",
                      times_ms={"head": 0.1, "encode": 3.0, "local_tail": 200.0, "total": 2204.0})
    a = analyse({"frames": frames, "steps": [[0.0, 50.0], [10.0, 0.1]], "args": {"deadline": 2.0}})
    assert [(ph.get("fallback_frames"), ph.get("given_up_frames")) for ph in a["phases"]] == [(0, 0), (2, 1)]
    assert any("1 of them given up" in line for line in _targets(a))


def test_a_recorded_run_is_analysed_again(tmp_path):
    import json

    from runtime.tools.adapt_run import build_parser, main

    frames = [{"seq": i, "t": 0.5 + i * 0.25, "t_start": 0.5 + i * 0.25, "where": "edge", "split": "input",
               "plan_version": 1, "times_ms": {"total": 50}, "predicted_ms": 52} for i in range(60)]
    args = vars(build_parser().parse_args(["--out", "x", "--phases", "50:15"]))
    run = {"analysis": {"stale": True}, "frames": frames, "timeline": [{"t": 1.0, "set_bps": 6e6, "estimate_bps": 5e6}],
           "steps": [[0.0, 50.0]], "args": args, "load_average": [[0.5, 0.5, 0.5], [0.4, 0.4, 0.4]], "warmup_s": 15.0,
           "command": "python -m runtime.tools.adapt_run --out x --phases 50:15"}
    (tmp_path / "r.json").write_text(json.dumps(run))
    assert main(["--reanalyse", str(tmp_path / "r.json"), "--out", str(tmp_path / "again")]) == 0
    md = (tmp_path / "again.md").read_text()
    assert "`python -m runtime.tools.adapt_run --out x --phases 50:15` (analysed again with" in md
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["analysis"]["phases"][0]["median_rel_error"] == 0.04 and again["frames"] == frames


def test_a_step_that_keeps_the_plan_says_so_instead_of_missing_the_target():
    frames = [{"seq": i, "t": 0.5 + i * 0.25, "where": "edge", "split": "input", "plan_version": 1,
               "times_ms": {"total": 50}, "predicted_ms": 50} for i in range(80)]
    a = analyse({"frames": frames, "steps": [[0.0, 50.0], [10.0, 1.0]]})
    lines = _targets(a)
    assert any("step down to 1 Mbit/s: no new plan (input stays the best at this rate)" in x for x in lines), lines
    assert not any("NOT met by its start" in x for x in lines)
