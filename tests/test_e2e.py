"""End to end: real worker and agent processes on loopback.

Every frame must get exactly one result, edge or local, and that result must be the full model's
answer on the same input (the synthetic source is deterministic, so the test recomputes it).
"""

from __future__ import annotations

import io
import json
import re
import signal
import threading
import time

import numpy as np
import pytest
import torch
from conftest import TINY_NET, free_port, health_status, log_text, terminate, wait_for, wait_serving

MODEL = "resnet18"
SPLIT = "add_6"  # late split: small tail, quick on 2 cores
COMMON = ("--model", MODEL, "--split", SPLIT, "--source", "synthetic", "--torch-threads", "1", "--no-summary")


# -- reference: the full model in this process ------------------------------------------------


class Reference:
    """The full model's outputs for the agent's deterministic synthetic frames."""

    def __init__(self, model: str):
        from runtime.models.loader import load_model

        torch.set_num_threads(1)
        self.loaded = load_model(model)
        self._outputs: list[torch.Tensor] = []

    def outputs(self, n: int) -> list[torch.Tensor]:
        from runtime.agent.sources import open_source

        if len(self._outputs) < n:
            frames = list(open_source(self.loaded.spec, "synthetic", n))
            with torch.inference_mode():
                for f in frames[len(self._outputs):]:
                    self._outputs.append(self.loaded.full(f.tensor).reshape(-1).float())
        return self._outputs[:n]

    def top1(self, n: int) -> list[tuple[int, float]]:
        out = []
        for y in self.outputs(n):
            score, idx = torch.softmax(y, dim=0).max(dim=0)
            out.append((int(idx), float(score)))
        return out


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference(MODEL)


def read_results(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def check_one_each(results: list[dict], n: int) -> None:
    seqs = [r["seq"] for r in results]
    assert sorted(seqs) == list(range(n)), f"expected seq 0..{n - 1} once each, got {seqs}"


def check_against_full(results: list[dict], ref: Reference, n: int, score_tol: float | None = None) -> None:
    expected = ref.top1(n)
    for r in results:
        idx, score = expected[r["seq"]]
        assert r["class_index"] == idx, r
        if score_tol is not None:
            assert abs(r["score"] - score) <= score_tol, (r, score)


# -- 1. the happy path -------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_edge_results_match_full_model(worker, run_agent, ref, tmp_path):
    _, port = worker
    out = tmp_path / "raw.jsonl"
    p = run_agent("--worker", f"127.0.0.1:{port}", *COMMON, "--frames", "10", "--codec", "raw", "--output", str(out))
    assert p.returncode == 0, p.stderr
    results = read_results(out.read_text())  # json.loads fails on any invalid line
    assert len(results) == 10
    check_one_each(results, 10)
    assert all(r["where"] == "edge" and r["fallback_reason"] is None for r in results), results
    assert all(r["codec"] == "raw" and r["split"] == SPLIT for r in results)
    # raw fp32 on the wire: the split pipeline is numerically the full model (score rounded to 1e-6)
    check_against_full(results, ref, 10, score_tol=1e-5)

    out8 = tmp_path / "int8.jsonl"
    p = run_agent("--worker", f"127.0.0.1:{port}", *COMMON, "--frames", "10", "--codec", "int8+lz4", "--output", str(out8))
    assert p.returncode == 0, p.stderr
    q = read_results(out8.read_text())
    check_one_each(q, 10)
    assert all(r["where"] == "edge" for r in q), q
    expected = ref.top1(10)
    agree = sum(r["class_index"] == expected[r["seq"]][0] for r in q)
    assert agree >= 8, f"int8+lz4 agreed with the full model on only {agree}/10 frames"
    raw_bytes = {r["wire_bytes"] for r in results}
    assert max(r["wire_bytes"] for r in q) < min(raw_bytes)


# -- 2. worker dies mid-stream -----------------------------------------------------------------


@pytest.mark.timeout(150)
def test_worker_killed_mid_stream_every_frame_once(start_worker, spawn_agent, ref, tmp_path):
    wproc, port = start_worker("--torch-threads", "1")
    out = tmp_path / "results.jsonl"
    n = 40
    agent = spawn_agent("--worker", f"127.0.0.1:{port}", *COMMON, "--frames", str(n), "--codec", "raw",
                        "--window", "2", "--deadline-seconds", "2", "--reconnect-seconds", "0.2",
                        "--connect-timeout-seconds", "0.5", "--output", str(out), log=tmp_path / "agent.log")

    def lines() -> int:
        return out.read_text().count("\n") if out.exists() else 0

    wait_for(lambda: lines() >= 3, 90, "the agent's first results", agent, interval=0.01)
    wproc.send_signal(signal.SIGKILL)
    wproc.wait(timeout=10)
    assert agent.wait(timeout=120) == 0, log_text(agent)

    results = read_results(out.read_text())
    assert len(results) == n
    check_one_each(results, n)
    edge = [r for r in results if r["where"] == "edge"]
    local = [r for r in results if r["where"] == "local"]
    assert len(edge) >= 3 and local, [(r["seq"], r["where"]) for r in results]
    assert len(edge) + len(local) == n
    assert all(r["fallback_reason"] for r in local), local
    assert all(r["fallback_reason"] is None for r in edge)
    # once local, always local: the worker never comes back
    first_local = min(r["seq"] for r in local)
    assert all(r["where"] == "local" for r in results if r["seq"] > first_local + 2)
    check_against_full(results, ref, n)
    # a local result computes head and tail in one process: exactly the full model
    expected = ref.top1(n)
    for r in local:
        assert abs(r["score"] - expected[r["seq"]][1]) <= 1e-5, r


# -- 3. no worker at all -------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_unreachable_worker_runs_everything_locally(run_agent, ref):
    port = free_port()
    p = run_agent("--worker", f"127.0.0.1:{port}", *COMMON, "--frames", "6", "--codec", "raw",
                  "--connect-timeout-seconds", "0.5", "--reconnect-seconds", "0.2", "--output", "-")
    assert p.returncode == 0, p.stderr
    results = read_results(p.stdout)
    assert len(results) == 6
    check_one_each(results, 6)
    assert all(r["where"] == "local" and "unavailable" in r["fallback_reason"] for r in results), results
    check_against_full(results, ref, 6, score_tol=1e-5)


# -- 4. a user model from a file ---------------------------------------------------------------


@pytest.mark.timeout(150)
def test_user_model_from_file(start_worker, worker, run_agent, capsys):
    from runtime.agent.sources import open_source
    from runtime.cli.main import main
    from runtime.models.loader import load_model

    assert main(["models", TINY_NET, "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["model"] == "tiny_net:build"
    names = [row["name"] for row in table["split_points"]]
    assert names[0] == "input" and names[-1] == "output" and "add" in names
    split_name = table["split_points"][2]["name"]

    loaded = load_model(TINY_NET)
    with torch.inference_mode():
        expected = [int(loaded.full(f.tensor).argmax()) for f in open_source(loaded.spec, "synthetic", 5)]
        outputs = [loaded.full(f.tensor).reshape(-1) for f in open_source(loaded.spec, "synthetic", 5)]
    labels = loaded.spec.labels

    _, uport = start_worker("--torch-threads", "1", "--model", TINY_NET)
    flags = ("--model", TINY_NET, "--split", "2", "--source", "synthetic", "--frames", "5", "--codec", "raw",
             "--no-summary", "--output", "-")
    p = run_agent("--worker", f"127.0.0.1:{uport}", *flags)
    assert p.returncode == 0, p.stderr
    results = read_results(p.stdout)
    check_one_each(results, 5)
    for r in results:
        assert r["where"] == "edge", r
        assert r["split"] == split_name
        assert r["class_index"] == expected[r["seq"]]
        assert r["label"] == labels[r["class_index"]]
        score = float(torch.softmax(outputs[r["seq"]], 0).max())
        assert abs(r["score"] - score) <= 1e-5

    # the shared worker was not started with --model: it refuses, and the agent falls back
    _, port = worker
    p = run_agent("--worker", f"127.0.0.1:{port}", *flags)
    assert p.returncode == 0, p.stderr
    results = read_results(p.stdout)
    check_one_each(results, 5)
    for r in results:
        assert r["where"] == "local", r
        assert "NOT_FOUND" in r["fallback_reason"] or "tiny_net" in r["fallback_reason"], r
        assert r["class_index"] == expected[r["seq"]]


# -- 5. the agent's local API -------------------------------------------------------------------


def _png(seed: int, size=(300, 260)) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.timeout(120)
def test_agent_local_api(worker, spawn_agent, ref, tmp_path):
    import grpc
    from PIL import Image

    from runtime.models import preprocess
    from runtime.proto.edgesplit.v1 import agent_pb2, agent_pb2_grpc
    from runtime.wire.codec import decode_tensor

    _, port = worker
    log = tmp_path / "agent.log"
    agent = spawn_agent("--worker", f"127.0.0.1:{port}", "--model", MODEL, "--split", SPLIT, "--codec", "raw",
                        "--torch-threads", "1", "--source", "", "--serve", "127.0.0.1:0", log=log)
    m = wait_for(lambda: re.search(r"edgesplit agent local API on (\S+:\d+)", log.read_text()), 90,
                 "the local API address", agent)
    address = m.group(1)
    assert not address.endswith(":0")
    wait_serving(address, agent)

    png = _png(7)
    x = preprocess(ref.loaded.spec, Image.open(io.BytesIO(png)))
    with torch.inference_mode():
        y = ref.loaded.full(x).reshape(-1)
    with grpc.insecure_channel(address) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        res = stub.Submit(agent_pb2.SubmitRequest(image=png), timeout=30)
        assert res.where == "edge", res.fallback_reason
        assert res.class_index == int(y.argmax())
        assert res.split_id == SPLIT
        assert res.wire_bytes > 0
        out = decode_tensor(res.output).reshape(-1)
        torch.testing.assert_close(out, y, rtol=1e-4, atol=1e-4)

        with pytest.raises(grpc.RpcError) as e:
            stub.Submit(agent_pb2.SubmitRequest(image=b"definitely not a PNG"), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            stub.Submit(agent_pb2.SubmitRequest(), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # still serving after bad requests
        res2 = stub.Submit(agent_pb2.SubmitRequest(image=png), timeout=30)
        assert res2.class_index == res.class_index and res2.seq != res.seq

    assert terminate(agent, timeout=30) == 0, log_text(agent)


# -- 6. worker drain on SIGTERM --------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_worker_sigterm_drains_and_exits_zero(start_worker):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    proc, port = start_worker("--torch-threads", "1", "--grace-seconds", "5")
    address = f"127.0.0.1:{port}"
    seen: list[str] = []
    first = threading.Event()

    def watch() -> None:
        with grpc.insecure_channel(address) as channel:
            try:
                for resp in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30):
                    seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
                    first.set()
            except grpc.RpcError:
                pass
        first.set()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    assert first.wait(15) and seen[:1] == ["SERVING"], seen
    t0 = time.monotonic()
    assert terminate(proc, timeout=15) == 0, log_text(proc)
    assert time.monotonic() - t0 < 5 + 3  # within the grace period (plus process exit)
    t.join(15)
    assert "NOT_SERVING" in seen, seen
    assert "draining" in log_text(proc)
    assert health_status(address) == "UNAVAILABLE"
