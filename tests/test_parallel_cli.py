"""``edgesplit plan --parallel`` proposes a DPFP stage; ``edgesplit agent --parallel-plan`` runs it.

Profiles are written here for ResNet-18 with chosen block times (two equal workers and one twice as
slow) so the plan is known to be worth parallelising; the runtime then runs the proposed stage on
real worker processes and must classify every frame as the unsplit model does.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli

from runtime.contracts.profile import Block, Profile
from runtime.models.loader import load_model
from runtime.parallel.plan import ParallelStage

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(240)]

MODEL = "resnet18"


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def profile_files(loaded, tmp_path_factory):
    d = tmp_path_factory.mktemp("profiles")
    sl = loaded.sliced
    n = len(sl.split_points) - 1
    paths = []
    for machine, factor in (("w0", 1.0), ("w1", 1.0), ("w2", 2.0)):
        blocks = tuple(Block(index=i, name=sl.split(i + 1).name, seconds=0.004 * factor * (1 + i % 3),
                             output_bytes=sl.split(i + 1).fp32_bytes) for i in range(n))
        p = d / f"{machine}.json"
        p.write_text(Profile(machine=machine, role="edge", model=MODEL, blocks=blocks,
                             input_bytes=sl.split(0).fp32_bytes).to_json())
        paths.append(p)
    return paths


def _plan(reaper, profile_files, tmp_path, *extra):
    out = tmp_path / "plan.json"
    args = ["plan", "--parallel", "--parallel-link", "1,1000", "--parallel-out", str(out), *extra]
    for p in profile_files:
        args += ["--profile", str(p)]
    proc = reaper.spawn(cli(*args), stdout=-1, stderr=-1)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout.decode(), stderr.decode(), out


def test_plan_parallel_prints_dpfp_against_baselines(reaper, profile_files, tmp_path):
    code, out, err, path = _plan(reaper, profile_files, tmp_path)
    assert code == 0, err
    rows = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()[2:]}
    assert set(rows) == {"dpfp", "layer_by_layer", "fused_all", "single_worker"}
    assert all(rows["dpfp"] <= v for v in rows.values())
    stage = ParallelStage.load(path)
    assert stage.model == MODEL and stage.workers == ("w0", "w1", "w2") and stage.strategy == "dpfp"
    assert abs(stage.predicted_seconds - rows["dpfp"]) < 1e-3
    assert stage.blocks[0].start == "input" and all(a.end == b.start for a, b in zip(stage.blocks, stage.blocks[1:], strict=False))


def test_plan_parallel_json_and_a_baseline_stage(reaper, profile_files, tmp_path):
    code, out, err, path = _plan(reaper, profile_files, tmp_path, "--json", "--parallel-strategy", "fused_all")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) == {"dpfp", "layer_by_layer", "fused_all", "single_worker"}
    assert len(doc["layer_by_layer"]["blocks"]) == len(doc["layer_by_layer"]["shares"]) > 1
    stage = ParallelStage.load(path)  # the FTP-like stage: one block over the whole range, on every worker
    assert stage.strategy == "fused_all" and len(stage.blocks) == 1 and all(s > 0 for s in stage.blocks[0].shares)
    assert abs(stage.predicted_seconds - doc["fused_all"]["seconds"]) < 1e-9


def test_plan_parallel_needs_a_link(reaper, profile_files, tmp_path):
    proc = reaper.spawn(cli("plan", "--parallel", "--profile", str(profile_files[0])), stdout=-1, stderr=-1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and b"--parallel-link" in err


def test_agent_runs_the_proposed_stage(reaper, start_worker, run_agent, profile_files, tmp_path, loaded):
    code, _, err, path = _plan(reaper, profile_files, tmp_path)
    assert code == 0, err
    ports = [start_worker("--torch-threads", "1")[1] for _ in range(3)]
    res = run_agent("--model", MODEL, "--source", "synthetic", "--frames", "2", "--worker", "",
                    "--parallel-plan", str(path), "--parallel-workers", ",".join(f"127.0.0.1:{p}" for p in ports))
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    from runtime.agent.sources import open_source

    frames = list(open_source(loaded.spec, "synthetic", 2))
    with torch.inference_mode():
        want = [int(loaded.full(f.tensor).argmax()) for f in frames]
    assert [x["class_index"] for x in lines] == want
    assert all(x["where"] == "parallel" for x in lines)
    ran_on = {t["ran_on"] for x in lines for t in x["tiles"]}
    assert ran_on <= {f"127.0.0.1:{p}" for p in ports} and len(ran_on) >= 2
    assert "edgesplit parallel summary" in res.stderr and f"127.0.0.1:{ports[0]}" in res.stderr


def test_plan_document_is_validated_before_use(tmp_path):
    from runtime.contracts.errors import InvalidInput, TooLarge
    from runtime.parallel.plan import MAX_FILE_BYTES, TiledBlock
    from runtime.proto.edgesplit.v1 import planner_pb2

    stage = ParallelStage(("a", "b"), (TiledBlock("input", "maxpool", (1.0, 2.0), 0.01),
                                       TiledBlock("maxpool", "add_2", (3.0, 3.0), 0.02, grid_cols=2)),
                          "fp16", MODEL, 0.01, "dpfp")
    assert ParallelStage.from_json(json.loads(json.dumps(stage.to_json()))) == stage
    plan = planner_pb2.Plan()
    stage.to_proto(plan.parallel)
    back = ParallelStage.from_proto(planner_pb2.Plan.FromString(plan.SerializeToString()).parallel, MODEL)
    assert (back.workers, back.blocks, back.codec, back.model) == (stage.workers, stage.blocks, stage.codec, MODEL)
    assert stage.with_workers(("h:1", "h:2")).workers == ("h:1", "h:2")
    bad = [
        ({**stage.to_json(), "format": "other"}, "not a parallel plan"),
        ({**stage.to_json(), "blocks": [{"start": "input", "end": "maxpool", "shares": [1]}]}, "one finite weight"),
        ({**stage.to_json(), "blocks": [{"start": "input", "end": "maxpool", "shares": [0, 0]}]}, "at least one > 0"),
        ({**stage.to_json(), "blocks": [{"start": "input", "end": "maxpool", "shares": ["nan", 1]}]}, "finite"),
        ({**stage.to_json(), "blocks": [{"start": "input"}]}, "malformed"),
        ({**stage.to_json(), "blocks": [{"start": "input", "end": "maxpool", "shares": [1, 1], "grid_cols": 3}]},
         "divide the 2 workers"),
        ({**stage.to_json(), "blocks": [{"start": "input", "end": "maxpool", "shares": [1, 1], "grid_cols": 1.5}]},
         "malformed"),
        ({**stage.to_json(), "workers": [f"w{i}" for i in range(100)]}, "workers"),
        ({**stage.to_json(), "blocks": []}, "blocks"),
    ]
    for doc, phrase in bad:
        with pytest.raises(InvalidInput, match=phrase):
            ParallelStage.from_json(doc)
    with pytest.raises(InvalidInput, match="2 workers"):
        stage.with_workers(("h:1",))
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_FILE_BYTES + 1))
    with pytest.raises(TooLarge):
        ParallelStage.load(big)
