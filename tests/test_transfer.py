"""Transfer Layers: shapes at every split, training, determinism, artifacts, worker/agent, CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math

import pytest
import torch

from runtime.contracts.errors import InvalidInput, PreconditionFailed
from runtime.models.loader import LoadedModel, load_model
from runtime.models.registry import build_model, get_spec, list_models, state_dict_digest
from runtime.models.slicing import SlicedModel
from runtime.tools.tl.train import train_tl
from runtime.transfer.artifact import load_tl, save_tl
from runtime.transfer.layers import RATIOS, TransferLayer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def small_model(name: str, hw: tuple[int, int]) -> LoadedModel:
    """A bundled model traced at a small input (same weights and digest as the full-size one)."""
    spec = dataclasses.replace(get_spec(name), input_size=hw)
    model = build_model(spec)
    sliced = SlicedModel(model, torch.zeros(1, 3, *hw), name=spec.name)
    return LoadedModel(spec=spec, sliced=sliced, digest=state_dict_digest(model)[:16])



@pytest.fixture(scope="module")
def r18() -> LoadedModel:
    return small_model("resnet18", (64, 64))


# -- shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_exact_shape_restoration_at_every_split(name):
    hw = (64, 64) if name in ("vgg16", "densenet169") else (65, 67)
    loaded = small_model(name, hw)
    checked = 0
    for sp in loaded.sliced.split_points:
        if len(sp.out_shape) != 4:
            with pytest.raises(InvalidInput, match=r"rank-4|N, C, H, W"):
                TransferLayer("reference", sp.out_shape)
            continue
        for kind, ratio in (("reference", None), ("bottleneck", 4), ("bottleneck", 16), ("transform", None)):
            tl = TransferLayer(kind, sp.out_shape, ratio).eval()
            h = torch.randn(2, *sp.out_shape[1:])
            if kind == "transform":
                tl.fit_transform(h, 0.5)
            with torch.no_grad():
                z = tl.encoder(h)
                assert tuple(z.shape[1:]) == tl.encoded_shape, (name, sp.name, kind)
                assert tl.decoder(z).shape == h.shape, (name, sp.name, kind)
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("hw", [(7, 7), (7, 8), (8, 7), (8, 8), (1, 1), (2, 3)])
@pytest.mark.parametrize("ratio", RATIOS)
def test_bottleneck_odd_and_even_sizes(hw, ratio):
    tl = TransferLayer("bottleneck", (1, 24, *hw), ratio)
    h = torch.randn(3, 24, *hw)
    assert tl(h).shape == h.shape
    spatial = 4 if ratio >= 8 else 1
    assert tl.encoded_shape[0] == math.ceil(24 / (ratio // spatial))


def test_reference_is_maxpool_then_nearest():
    tl = TransferLayer("reference", (1, 2, 5, 3))
    h = torch.arange(30, dtype=torch.float32).reshape(1, 2, 5, 3)
    z = tl.encoder(h)
    assert z.shape == (1, 2, 3, 2)
    assert z[0, 0].tolist() == [[4, 5], [10, 11], [13, 14]]
    r = tl.decoder(z)
    assert r.shape == h.shape and r[0, 0, 4, 2] == 14 and r[0, 0, 0, 0] == 4
    assert tl.values_ratio() == pytest.approx(12 / 30)
    with pytest.raises(InvalidInput, match="fixed ratio"):
        TransferLayer("reference", (1, 2, 5, 3), 16)


def test_bad_rank_and_kind_refused():
    tl = TransferLayer("bottleneck", (1, 8, 4, 4), 8)
    with pytest.raises(InvalidInput, match="rank-2"):
        tl.encoder(torch.randn(1, 8))
    with pytest.raises(InvalidInput, match=r"rank-4|N, C, H, W"):
        TransferLayer("bottleneck", (1, 1000), 8)
    with pytest.raises(InvalidInput, match="unknown Transfer Layer kind"):
        TransferLayer("magic", (1, 8, 4, 4))
    with pytest.raises(InvalidInput, match="ratio must be one of"):
        TransferLayer("bottleneck", (1, 8, 4, 4), 3)


# -- training ----------------------------------------------------------------------------------


def test_training_reduces_loss(r18):
    _tl, report = train_tl(r18, "add_3", "bottleneck", 8, steps=20, batch_size=8, lr=3e-3, seed=0,
                          progress=False, pool_size=64, holdout_images=4)
    losses = report["losses"]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert set(report["fidelity"]) >= {"feature_rel_mse", "top1_agreement", "kl_divergence"}
    assert "rocket.jpg" in report["training"]["data"]


def test_training_is_deterministic(r18):
    kw = dict(steps=4, batch_size=4, seed=3, progress=False, pool_size=8, holdout_images=2)
    a, ra = train_tl(r18, "add_5", "bottleneck", 16, **kw)
    b, rb = train_tl(r18, "add_5", "bottleneck", 16, **kw)
    c, _ = train_tl(r18, "add_5", "bottleneck", 16, **{**kw, "seed": 4})
    assert ra["losses"] == rb["losses"]
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.state_dict()["encoder.proj.weight"], c.state_dict()["encoder.proj.weight"])


def _low_rank(n, c, k, hw, seed=0):
    """(n, c, *hw) features whose per-pixel channel vectors lie in a k-dim affine subspace."""
    g = torch.Generator().manual_seed(seed)
    basis, mean = torch.randn(c, k, generator=g), torch.randn(c, generator=g)
    z = torch.randn(n, *hw, k, generator=g)
    return (z @ basis.T + mean).permute(0, 3, 1, 2).contiguous()


def test_pca_init_reconstructs_a_low_rank_tensor_exactly():
    h = _low_rank(6, 24, 6, (5, 7))
    tl = TransferLayer("bottleneck", (1, 24, 5, 7), 4)  # channel-only: 24 -> 6 channels
    info = tl.init_pca(h)
    assert info["components"] == 6 and info["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        assert torch.allclose(tl(h), h, atol=1e-4), float((tl(h) - h).abs().max())
        z = tl.encoder(h)  # centred PCA coefficients, ordered by decreasing variance
        assert z.mean((0, 2, 3)).abs().max() < 1e-4
        var = z.var((0, 2, 3))
        assert torch.all(var[:-1] >= var[1:] - 1e-5)
    # with 2x2 pooling (ratio >= 8) it is exact on features constant over 2x2 blocks
    hp = torch.nn.functional.interpolate(_low_rank(4, 24, 6, (3, 4), seed=1), scale_factor=2, mode="nearest")
    tlp = TransferLayer("bottleneck", (1, 24, 6, 8), 8)  # 24 / 2 = 12 channels >= rank 6
    tlp.init_pca(hp)
    with torch.no_grad():
        assert torch.allclose(tlp(hp), hp, atol=1e-4)
    # fewer components than the rank: the best rank-3 code, strictly worse but far better than nothing
    tl3 = TransferLayer("bottleneck", (1, 24, 5, 7), 32)  # 24 / (32 / 4) = 3 channels at half size
    assert tl3.init_pca(h)["explained_variance"] < 1.0
    with pytest.raises(InvalidInput, match="bottleneck"):
        TransferLayer("reference", (1, 24, 5, 7)).init_pca(h)
    with pytest.raises(InvalidInput, match="shape"):
        tl.init_pca(h[:, :, :4])


def test_train_with_pca_init(r18):
    _pure, rp = train_tl(r18, "add_3", "bottleneck", 4, steps=0, batch_size=4, progress=False, pool_size=8,
                        holdout_images=2, init="pca")
    _rand, rr = train_tl(r18, "add_3", "bottleneck", 4, steps=0, batch_size=4, progress=False, pool_size=8,
                        holdout_images=2)
    t = rp["training"]
    assert t["init"] == "pca" and t["pool_size"] == 8 and t["steps"] == 0 and rp["losses"] == []
    assert t["pca"]["components"] == 32 and 0 < t["pca"]["explained_variance"] <= 1
    assert rp["fidelity"]["feature_rel_mse"] < rr["fidelity"]["feature_rel_mse"]
    _tuned, rt = train_tl(r18, "add_3", "bottleneck", 4, steps=3, batch_size=4, progress=False, pool_size=8,
                         holdout_images=2, init="pca")
    assert len(rt["losses"]) == 3 and rt["training"]["init"] == "pca"
    with pytest.raises(InvalidInput, match="init"):
        train_tl(r18, "add_3", "bottleneck", 4, steps=0, progress=False, init="svd")
    with pytest.raises(InvalidInput, match="bottleneck"):
        train_tl(r18, "add_3", "reference", steps=0, progress=False, init="pca")


def test_reference_trains_nothing_but_evaluates(r18):
    _tl, report = train_tl(r18, "add_1", "reference", steps=50, progress=False, holdout_images=2)
    assert report["losses"] == [] and report["training"]["steps"] == 0
    assert 0 <= report["fidelity"]["feature_rel_mse"] < 1


# -- artifacts ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(r18, tmp_path_factory):
    tl, report = train_tl(r18, "add_3", "bottleneck", 16, steps=2, batch_size=2, progress=False, pool_size=4,
                          holdout_images=2)
    out = tmp_path_factory.mktemp("tl")
    tl_id, path = save_tl(tl, r18, r18.split("add_3"), out, fidelity=report["fidelity"], training=report["training"])
    return tl, tl_id, path


def test_save_then_load_gives_identical_outputs(r18, saved):
    tl, tl_id, path = saved
    assert tl_id.startswith("tl-") and len(tl_id) == 15 and path.name == f"{tl_id}.json"
    manifest = json.loads(path.read_text())
    assert manifest["model_digest"] == r18.digest and manifest["split"] == "add_3"
    assert manifest["input_shape"] == [1, 128, 8, 8] and manifest["encoded_shape"] == [1, 32, 4, 4]
    art = load_tl(path, loaded=r18)
    assert load_tl(tl_id, path.parent, loaded=r18).tl_id == tl_id
    h = torch.randn(2, 128, 8, 8)
    with torch.no_grad():
        assert torch.equal(art.tl(h), tl(h))


def test_finetuned_tail_is_stored(r18, tmp_path):
    tl, _ = train_tl(r18, "add_5", "bottleneck", 8, steps=2, batch_size=2, progress=False, pool_size=4,
                     holdout_images=2, finetune_tail=True)
    _tl_id, path = save_tl(tl, r18, r18.split("add_5"), tmp_path)
    manifest = json.loads(path.read_text())
    assert manifest["finetune_tail"] and any(k.startswith("tail.") for k in manifest["tensors"])
    art = load_tl(path, loaded=r18)
    h = torch.randn(1, 256, 4, 4)
    with torch.no_grad():
        assert torch.equal(art.tail(art.tl(h)), tl.tail(tl(h)))
    assert art.tail is not r18.tail("add_5")


def _copy(saved, tmp_path):
    _, tl_id, path = saved
    for suffix in (".json", ".safetensors"):
        (tmp_path / f"{tl_id}{suffix}").write_bytes(path.with_suffix(suffix).read_bytes())
    return tmp_path / f"{tl_id}.json"


def _edit(path, **changes):
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


def test_bad_artifacts_refused(r18, saved, tmp_path):
    from safetensors.torch import load_file, save_file

    p = _copy(saved, tmp_path)
    p.write_text("{not json")
    with pytest.raises(InvalidInput, match="not valid JSON"):
        load_tl(p, loaded=r18)
    p = _copy(saved, tmp_path)
    _edit(p, format_version=99)
    with pytest.raises(InvalidInput, match="format_version 99"):
        load_tl(p, loaded=r18)
    p = _copy(saved, tmp_path)
    _edit(p, kind="magic")
    with pytest.raises(InvalidInput, match="unknown kind"):
        load_tl(p, loaded=r18)
    p = _copy(saved, tmp_path)
    _edit(p, model_digest="0123456789abcdef")
    with pytest.raises(PreconditionFailed, match="re-train"):
        load_tl(p, loaded=r18)
    p = _copy(saved, tmp_path)
    _edit(p, ratio=2)  # the weights are those of x16: shapes differ from what x2 builds
    with pytest.raises(InvalidInput, match="do not match"):
        load_tl(p, loaded=r18)
    p = _copy(saved, tmp_path)
    tensors = load_file(str(p.with_suffix(".safetensors")))
    tensors["encoder.proj.weight"] = tensors["encoder.proj.weight"][:1]
    save_file(tensors, str(p.with_suffix(".safetensors")))
    with pytest.raises(InvalidInput, match="do not match"):
        load_tl(p, loaded=r18)
    p = _copy(saved, tmp_path)
    tensors = load_file(str(p.with_suffix(".safetensors")))
    tensors["encoder.proj.bias"] = tensors["encoder.proj.bias"] + 1
    save_file(tensors, str(p.with_suffix(".safetensors")))
    with pytest.raises(InvalidInput, match="content hash"):
        load_tl(p, loaded=r18)
    p = _copy(saved, tmp_path)
    p.with_suffix(".safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(InvalidInput, match="corrupted"):
        load_tl(p, loaded=r18)
    with pytest.raises(InvalidInput, match="not found"):
        load_tl(tmp_path / "tl-000000000000.json", loaded=r18)


# -- worker + agent on loopback, CLI -------------------------------------------------------------


@pytest.fixture(scope="module")
def full_r18():
    return load_model("resnet18")


@pytest.fixture(scope="module")
def artifact_224(full_r18, tmp_path_factory):
    """A trained TL for resnet18 at its real input size, late split (quick tail)."""
    split = full_r18.split("add_6")
    tl, report = train_tl(full_r18, split, "bottleneck", 16, steps=3, batch_size=2, progress=False, pool_size=4,
                          holdout_images=2)
    out = tmp_path_factory.mktemp("tl224")
    return save_tl(tl, full_r18, split, out, fidelity=report["fidelity"])


async def _serve_and_run(loaded, tls, tl_art, xs):
    from runtime.agent.client import Agent
    from runtime.agent.config import AgentOptions, InitialPlan
    from runtime.wire.codec import get_codec
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, tls=tuple(tls)))
    agent = Agent(loaded, InitialPlan(tl_art.split, get_codec("int8+lz4"), worker=f"127.0.0.1:{ws.port}", tl=tl_art),
                  AgentOptions(deadline_seconds=30.0))
    try:
        await agent.start()
        return [await agent.infer(x) for x in xs]
    finally:
        await agent.close()
        await ws.drain_and_stop(1.0)


def test_agent_and_worker_serve_frames_through_tl(full_r18, artifact_224):
    _tl_id, path = artifact_224
    art = load_tl(path, loaded=full_r18)
    xs = [torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    results = asyncio.run(_serve_and_run(full_r18, [str(path)], art, xs))
    head, tail = full_r18.head("add_6"), full_r18.tail("add_6")
    for x, r in zip(xs, results, strict=False):
        assert r.where == "edge", r.fallback_reason
        assert "tl_encode" in r.times
        assert r.wire_bytes < 4 * 128 * 4 * 4  # int8 of the encoded (1, 128, 4, 4), not the split's 512x7x7
        with torch.no_grad():
            expect = tail(art.tl(head(x))).reshape(-1)
        # the int8 wire codec adds error on top of the TL: same prediction, close scores
        assert torch.allclose(r.output.reshape(-1), expect, atol=0.05 * float(expect.abs().max()) + 1e-4)


def test_worker_without_tl_refuses_and_agent_falls_back_exactly(full_r18, artifact_224):
    _, path = artifact_224
    art = load_tl(path, loaded=full_r18)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    (r,) = asyncio.run(_serve_and_run(full_r18, [], art, [x]))
    assert r.where == "local"
    assert "FAILED_PRECONDITION" in r.fallback_reason and art.tl_id in r.fallback_reason
    with torch.no_grad():
        assert torch.equal(r.output, full_r18.full(x))  # raw head output, not the TL's reconstruction


def test_cli_tl_eval_and_list(artifact_224, capsys):
    from runtime.cli.main import main

    tl_id, path = artifact_224
    assert main(["tl", "eval", "--tl", str(path), "--images", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tl_id"] == tl_id and report["fidelity"]["images"] == 2
    b = report["bytes_per_frame"]
    assert b["raw_fp32_at_split"] == 4 * 512 * 7 * 7 and b["tl_raw_fp32"] == 4 * 128 * 4 * 4
    assert b["encode_ms"] > 0 and b["decode_ms"] > 0
    assert main(["tl", "eval", "--tl", str(path), "--images", "2"]) == 0
    assert "top-1 agreement" in capsys.readouterr().out
    assert main(["tl", "list", str(path.parent)]) == 0
    assert tl_id in capsys.readouterr().out
    assert main(["tl", "eval", "--tl", str(path.parent / "tl-000000000000.json")]) == 2
    assert "not found" in capsys.readouterr().err


def test_worker_refuses_tl_for_another_model_or_split(full_r18, artifact_224):
    import grpc

    from runtime.contracts.errors import EdgesplitError
    from runtime.proto.edgesplit.v1 import inference_pb2 as pb
    from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    tl_id, path = artifact_224

    async def run():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, tls=(str(path),)))
        try:
            tail = await ws.service.resolve(pb.FrameHeader(model_id="resnet18", split_id="17", tl_id=tl_id,
                                                           model_digest=full_r18.digest))
            assert tail.input_shape == (1, 128, 4, 4) and tail.decoder is not None
            for model, split, digest in (("resnet18", "add_5", ""), ("resnet50", "add_6", ""),
                                         ("resnet18", "add_6", "0" * 16)):
                with pytest.raises(PreconditionFailed):
                    await ws.service.resolve(pb.FrameHeader(model_id=model, split_id=split, tl_id=tl_id,
                                                            model_digest=digest))
            with pytest.raises(PreconditionFailed, match="does not hold"):
                await ws.service.resolve(pb.FrameHeader(model_id="resnet18", split_id="add_6", tl_id="tl-000000000000"))
            # Prepare says which TL's decoder will run and the shape it takes off the wire
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}") as channel:
                res = await pb_grpc.InferenceStub(channel).Prepare(pb.PrepareRequest(header=pb.FrameHeader(
                    model_id="resnet18", split_id="add_6", tl_id=tl_id, model_digest=full_r18.digest)), timeout=30)
            assert res.tl_id == tl_id and tuple(res.input_shape) == (1, 128, 4, 4)
        finally:
            await ws.drain_and_stop(1.0)
        # a TL the worker cannot load stops it at start, rather than being skipped
        with pytest.raises(EdgesplitError, match="tl-000000000000"):
            await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, tls=(str(path.parent / "tl-000000000000.json"),)))

    asyncio.run(run())


def test_bench_with_a_tl_reports_its_stage_and_bytes(artifact_224, tmp_path, capsys):
    from runtime.cli.main import main

    tl_id, path = artifact_224
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "resnet18", "--tl", str(path), "--codec", "int8+lz4", "--frames", "2",
                 "--warmup", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["tl"] == tl_id and row["split"] == "add_6" and row["p50_ms"]["tl_encode"] > 0
    assert row["bytes_per_frame"] < 4 * 128 * 4 * 4 < row["raw_fp32_bytes"]  # int8 of the TL's (1, 128, 4, 4)
    assert f"{tl_id}+int8+lz4" in capsys.readouterr().out
    assert main(["bench", "--model", "resnet18", "--tl", str(path), "--split", "add_5", "--frames", "1"]) == 2
