"""Codec ``ans`` and the transform Transfer Layer: exact round trips, bytes near the entropy,
refusal of malformed payloads, fitting, artifacts, and frames through a worker on loopback."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

from runtime.contracts.errors import InvalidInput, PreconditionFailed, TooLarge
from runtime.models.loader import load_model
from runtime.proto.edgesplit.v1 import tensor_pb2
from runtime.tools.tl.train import train_tl
from runtime.transfer.artifact import load_tl, save_tl
from runtime.transfer.layers import TransferLayer
from runtime.wire.codec import decode_tensor, get_codec
from runtime.wire.entropy import EntropyModel, band_map, fit_tables
from runtime.wire.validation import validate_tensor

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def _laplace_ints(shape, scale, seed=0, r=40):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g) - 0.5
    x = -scale * torch.sign(u) * torch.log1p(-2 * u.abs())
    return torch.clamp(torch.round(x), -r, r)


def _model(q: torch.Tensor, r: int = 40, clusters: int = 8) -> EntropyModel:
    tables, table_of = fit_tables(q, band_map(*q.shape[2:]), r, clusters=clusters)
    return EntropyModel(tables, table_of, tuple(q.shape[1:]))


@pytest.mark.parametrize("shape", [(1, 6, 7, 9), (3, 6, 7, 9), (2, 4, 1, 1), (1, 5, 14, 14)])
def test_ans_round_trip_is_exact(shape):
    scales = torch.linspace(0.3, 6, shape[1])[None, :, None, None]
    q = _laplace_ints(shape, scales)
    model = _model(_laplace_ints((64, *shape[1:]), scales, seed=1))
    codec = get_codec("ans", model=model)
    msg = codec.encode(q)
    assert msg.codec == tensor_pb2.CODEC_ANS and msg.encoded_size == len(msg.buffer) and len(msg.buffer) % 4 == 0
    out = decode_tensor(msg, model=model)
    assert out.dtype == torch.float32 and torch.equal(out, q)
    # values off the integer grid or outside the model's range are rounded and clipped, never refused
    wild = q + 0.3
    wild.view(-1)[0] = 1e6
    back = decode_tensor(codec.encode(wild), model=model)
    assert back.view(-1)[0] == 40 and torch.equal(back.view(-1)[1:], torch.round(wild).view(-1)[1:])


def test_ans_all_zero_and_bytes_near_the_entropy():
    shape = (1, 8, 14, 14)
    scales = torch.tensor([0.05, 0.2, 0.5, 1, 2, 4, 8, 16])[None, :, None, None]
    train = _laplace_ints((256, *shape[1:]), scales, seed=2)
    model = _model(train, clusters=16)
    codec = get_codec("ans", model=model)
    zero = torch.zeros(shape)
    assert torch.equal(decode_tensor(codec.encode(zero), model=model), zero)
    assert len(codec.encode(zero).buffer) < zero.numel() / 2  # zeros are likely symbols: well below a byte each
    # on data from the training distribution the coded size is close to the empirical entropy
    test = _laplace_ints((16, *shape[1:]), scales, seed=3)
    bits = 0.0
    for c in range(shape[1]):
        _, counts = np.unique(train[:, c].numpy(), return_counts=True)
        p = counts / counts.sum()
        bits += -(p * np.log2(p)).sum() * test[:, c].numel()
    coded = 8 * len(codec.encode(test).buffer)
    assert coded < 1.06 * bits + 64, (coded, bits)


def test_ans_payload_checks():
    q = _laplace_ints((1, 4, 5, 5), 2.0)
    model = _model(_laplace_ints((32, 4, 5, 5), 2.0, seed=4))
    msg = get_codec("ans", model=model).encode(q)

    def with_buffer(buf):
        m = tensor_pb2.Tensor()
        m.CopyFrom(msg)
        m.buffer, m.encoded_size, m.payload_size = buf, len(buf), len(buf)
        return m

    with pytest.raises(InvalidInput, match=r"ans payload|left"):
        decode_tensor(with_buffer(msg.buffer + b"\x01\x02\x03\x04"), model=model)
    with pytest.raises(InvalidInput, match=r"multiple of 4|invalid"):
        decode_tensor(with_buffer(msg.buffer[:-1]), model=model)
    with pytest.raises(InvalidInput):
        decode_tensor(with_buffer(b""), model=model)
    with pytest.raises(PreconditionFailed, match="tl_id"):
        decode_tensor(msg)  # no model: the caller must name the TL
    huge = tensor_pb2.Tensor()
    huge.CopyFrom(msg)
    huge.encoded_size = 3 * q.numel() + 12  # beyond any ANS stream of this many symbols
    with pytest.raises(InvalidInput, match="<="):
        validate_tensor(huge)
    lz = tensor_pb2.Tensor()
    lz.CopyFrom(msg)
    lz.compression = tensor_pb2.COMPRESSION_LZ4
    with pytest.raises(InvalidInput, match="COMPRESSION_NONE"):
        validate_tensor(lz)
    big = tensor_pb2.Tensor()
    big.CopyFrom(msg)
    big.shape[:] = [2**20, 4, 64, 64]
    with pytest.raises(TooLarge):
        validate_tensor(big)
    other = tensor_pb2.Tensor()
    other.CopyFrom(msg)
    other.shape[:] = [1, 4, 6, 5]
    with pytest.raises(InvalidInput, match="does not match"):
        get_codec("ans", model=model).decode(other)
    with pytest.raises(InvalidInput, match="transform"):
        get_codec("ans")
    with pytest.raises(InvalidInput, match="> 0"):
        EntropyModel(torch.zeros(2, 9), torch.zeros(4, 6, dtype=torch.long), (4, 5, 5))


def test_transform_tl_fit_bounds_the_error_and_is_exact_through_every_codec():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(12, 12, generator=g)
    feats = torch.einsum("dc,nchw->ndhw", mix, torch.randn(48, 12, 7, 9, generator=g)) + 3.0
    tl = TransferLayer("transform", (1, 12, 7, 9))
    info = tl.fit_transform(feats, 0.5)
    step = info["step_abs"]
    assert info["clipped"] == 0 and step == pytest.approx(0.5 * info["channel_std"], rel=1e-5)
    test = feats[:5]
    with torch.no_grad():
        z = tl.encoder(test)
        assert torch.equal(z, torch.round(z)) and tuple(z.shape) == (5, 12, 7, 9)
        rec = tl.decoder(z)
        # orthonormal transforms: the mean squared error is that of the rounding, <= step^2 / 4
        assert float(((rec - test) ** 2).mean()) <= step**2 / 4 + 1e-6
        for name in ("ans", "int8+lz4", "int8", "fp16", "raw"):  # the decoder snaps to the grid
            codec = get_codec(name, model=tl.entropy_model)
            out = tl.decoder(decode_tensor(codec.encode(z), model=tl.entropy_model))
            assert torch.allclose(out, rec, atol=1e-5), name
    smaller = TransferLayer("transform", (1, 12, 7, 9))
    smaller.fit_transform(feats, 2.0)
    ans = get_codec("ans", model=tl.entropy_model)
    ans_coarse = get_codec("ans", model=smaller.entropy_model)
    with torch.no_grad():
        assert len(ans_coarse.encode(smaller.encoder(test)).buffer) < len(ans.encode(z).buffer)
    with pytest.raises(InvalidInput, match="step"):
        tl.fit_transform(feats, 0.0)
    with pytest.raises(InvalidInput, match="ratio 1"):
        TransferLayer("transform", (1, 12, 7, 9), 16)
    with pytest.raises(InvalidInput, match="transform"):
        TransferLayer("bottleneck", (1, 12, 7, 9), 4).fit_transform(feats)


@pytest.fixture(scope="module")
def r18():
    return load_model("resnet18")


@pytest.fixture(scope="module")
def transform_art(r18, tmp_path_factory):
    split = r18.split("add_6")
    tl, report = train_tl(r18, split, "transform", steps=0, batch_size=2, progress=False, pool_size=6,
                          holdout_images=2, step=1.0)
    assert report["training"]["transform"]["features"] == 6 and report["training"]["steps"] == 0
    out = tmp_path_factory.mktemp("tlq")
    tl_id, path = save_tl(tl, r18, split, out, fidelity=report["fidelity"], training=report["training"])
    return tl, tl_id, path


def test_transform_artifact_round_trip_codes_the_same_bytes(r18, transform_art):
    tl, tl_id, path = transform_art
    art = load_tl(path, loaded=r18)
    assert art.tl.kind == "transform" and art.tl_id == tl_id
    h = torch.relu(torch.randn(2, 512, 7, 7, generator=torch.Generator().manual_seed(5)))
    with torch.no_grad():
        assert torch.equal(art.tl(h), tl(h))
        z = tl.encoder(h)
    a = get_codec("ans", model=tl.entropy_model).encode(z)
    b = get_codec("ans", model=art.tl.entropy_model).encode(z)
    assert a.buffer == b.buffer  # both ends build the same model from the artifact
    assert torch.equal(decode_tensor(a, model=art.tl.entropy_model), z)


def _through_worker(r18, art, tls, xs, **agent_kw):
    """Frames ``xs`` from an Agent with codec ans and TL ``art`` through a worker holding ``tls``, on
    loopback; returns (results, the agent's refined-frames count)."""
    from runtime.agent.client import Agent
    from runtime.agent.config import AgentOptions, InitialPlan
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    async def scenario():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, tls=tuple(tls)))
        agent = Agent(r18, InitialPlan(art.split, get_codec("ans", model=art.tl.entropy_model),
                                       worker=f"127.0.0.1:{ws.port}", tl=art), AgentOptions(deadline_seconds=30.0, **agent_kw))
        try:
            await agent.start()
            return [await agent.infer(x) for x in xs], agent.metrics.refined._value.get()
        finally:
            await agent.close()
            await ws.drain_and_stop(1.0)

    return asyncio.run(scenario())


def test_agent_and_worker_serve_frames_with_codec_ans(r18, transform_art):
    _, tl_id, path = transform_art
    art = load_tl(path, loaded=r18)
    xs = [torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    results, _ = _through_worker(r18, art, [str(path)], xs)
    head, tail = r18.head("add_6"), r18.tail("add_6")
    for x, r in zip(xs, results, strict=True):
        assert r.where == "edge", r.fallback_reason
        assert r.codec == "ans" and 0 < r.wire_bytes < 512 * 7 * 7  # below what int8 alone would send
        with torch.no_grad():
            expect = tail(art.tl(head(x)))
        assert torch.allclose(r.output, expect, atol=1e-4, rtol=1e-4)  # ans is exact on the coefficients
    # a worker without the TL refuses (FAILED_PRECONDITION) and the frame runs on the board, exactly
    (r,) = _through_worker(r18, art, [], xs[:1])[0]
    assert r.where == "local" and "FAILED_PRECONDITION" in r.fallback_reason and tl_id in r.fallback_reason
    with torch.no_grad():
        assert torch.equal(r.output, r18.full(xs[0]))


def test_cli_trains_and_evaluates_a_transform_tl(tmp_path, capsys):
    from runtime.cli.main import main

    out = tmp_path / "tls"
    args = ["tl", "train", "--model", "resnet18", "--split", "add_6", "--kind", "transform", "--step", "1.5",
            "--pool-size", "4", "--holdout-images", "2", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "transform step 1.5" in text and "with ans" in text
    (path,) = out.glob("tl-*.json")
    manifest = json.loads(path.read_text())
    assert manifest["kind"] == "transform" and manifest["ratio"] == 1
    assert manifest["training"]["transform"]["step"] == 1.5 and manifest["bytes_per_frame"]["codec"] == "ans"
    assert main(["tl", "eval", "--tl", str(path), "--images", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    b = report["bytes_per_frame"]
    assert b["codec"] == "ans" and 0 < b["tl_ans"] < b["int8+lz4_at_split_without_tl"]
    assert report["fidelity"]["with_codec"]["codec"] == "ans"
    # ans is exact on the coefficients: the codec changes nothing
    assert report["fidelity"]["with_codec"]["kl_divergence"] == pytest.approx(report["fidelity"]["kl_divergence"],
                                                                              abs=1e-6)
    assert main([*args[:-2], "--ratio", "4", "--out", str(out)]) == 2
    assert "ratio 1" in capsys.readouterr().err


def test_bundled_transform_tl_loads_by_id_and_is_the_demo_default():
    import argparse

    from runtime.measure.demo import _choose_tl
    from runtime.transfer.artifact import bundled_tl, read_manifest

    path = bundled_tl("efficientnet_lite0")
    assert path is not None and bundled_tl("resnet18") is None
    manifest = read_manifest(path)
    assert manifest["kind"] == "transform" and manifest["split"] == "conv2d_17"
    art = load_tl(manifest["tl_id"], "/nonexistent-dir")  # an id alone finds the bundled artifact
    assert art.tl_id == manifest["tl_id"] and art.tl.entropy_model is not None
    demo = lambda **kw: _choose_tl(argparse.Namespace(**{"model": "efficientnet_lite0", "split": "",  # noqa: E731
                                                         "tl": "bundled", "codec": "auto", **kw}))
    assert demo() == (str(path), "ans")
    assert demo(tl="none") == ("", "int8+lz4")
    assert demo(codec="int8+lz4") == (str(path), "int8+lz4")
    assert demo(split="35") == ("", "int8+lz4")  # the bundled TL is for split 45 only
    assert demo(model="resnet18") == ("", "int8+lz4")


def test_ans_random_payloads_never_crash_or_overrun():
    model = _model(_laplace_ints((32, 4, 5, 5), 2.0, seed=6))
    codec = get_codec("ans", model=model)
    msg = codec.encode(_laplace_ints((1, 4, 5, 5), 2.0, seed=7))
    g = np.random.default_rng(0)
    outcomes = set()
    for _ in range(60):  # bounded: random words of plausible lengths
        n = 4 * int(g.integers(1, 40))
        bad = tensor_pb2.Tensor()
        bad.CopyFrom(msg)
        bad.buffer = g.integers(0, 256, n, dtype=np.uint8).tobytes()
        bad.encoded_size = bad.payload_size = n
        try:
            out = decode_tensor(bad, model=model)
        except InvalidInput:
            outcomes.add("refused")
            continue
        assert out.shape == (1, 4, 5, 5) and float(out.abs().max()) <= model.range  # garbage, but bounded
        outcomes.add("decoded")
    assert "refused" in outcomes


def test_refine_margin_reruns_ambiguous_edge_results_on_the_board(r18, transform_art):
    """Results too close to call are replaced by the board's exact tail: margin 1 refines every
    frame (outputs equal the unsplit model exactly), margin 0 none."""
    from runtime.agent.client import Agent
    from runtime.agent.config import AgentOptions, InitialPlan

    _, _, path = transform_art
    art = load_tl(path, loaded=r18)
    xs = [torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(20 + i)) for i in range(3)]

    always, n_always = _through_worker(r18, art, [str(path)], xs, refine_margin=1.0)
    never, n_never = _through_worker(r18, art, [str(path)], xs, refine_margin=0.0)
    with torch.no_grad():
        full = [r18.full(x) for x in xs]
    assert n_always == 3 and n_never == 0
    for r, rn, y in zip(always, never, full, strict=True):
        assert r.where == "edge" and r.refined and "refine" in r.times and r.to_json(None)["refined"] is True
        assert torch.equal(r.output, y)  # the board's exact tail on the raw head output
        assert not rn.refined and rn.wire_bytes == r.wire_bytes  # same bytes on the wire either way
    with pytest.raises(InvalidInput, match="refine_margin"):
        Agent(r18, InitialPlan(art.split, get_codec("raw")), AgentOptions(refine_margin=1.5))


def test_refine_figures():
    from runtime.tools.tl.evaluate import refine_figures

    y = torch.tensor([[5.0, 0.0], [0.0, 5.0], [1.0, 0.9]])
    yc = torch.tensor([[5.0, 0.0], [2.0, 0.0], [0.9, 1.0]])  # frame 1 flipped with a clear margin, frame 2 a near tie
    f = refine_figures(yc, y, 0.1)
    assert f["refined_share"] == pytest.approx(1 / 3) and f["top1_agreement"] == pytest.approx(2 / 3)
    assert refine_figures(yc, y, 1.0)["top1_agreement"] == 1.0
