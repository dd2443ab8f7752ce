"""The ``jpeg`` wire codec: the model's input image as a JPEG, at split point 0 (``input``) only.

Round trip on the bundled photos (bound: mean absolute error <= 1 pixel unit per photo at quality
90; measured 0.007-0.49), the name scheme, refusal at any other split (agent side and worker side),
malformed / oversized / mismatched JPEGs refused with INVALID_ARGUMENT by a real worker, and the
profiler's input-cut transfer with its measured fidelity.
"""

from __future__ import annotations

import asyncio
import io

import grpc
import pytest
import torch
from PIL import Image
from worker_calls import infer_each, infer_request

from runtime.agent.config import InitialPlan
from runtime.agent.sources import open_source
from runtime.contracts.errors import InvalidInput, PreconditionFailed
from runtime.models.loader import load_model
from runtime.proto.edgesplit.v1 import tensor_pb2
from runtime.wire.codec import codec_at, decode_tensor, get_codec, validate_tensor
from runtime.wire.jpeg import jpeg_quality

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

MODEL = "efficientnet_lite0"  # real ImageNet weights: top-1 on the photos means something


@pytest.fixture(scope="module")
def loaded(one_torch_thread):
    return load_model(MODEL)


@pytest.fixture(scope="module")
def photos(loaded):
    return [f.tensor for f in open_source(loaded.spec, "samples", 4)]


def _pixels(loaded, x):
    std = torch.tensor(loaded.spec.std).view(1, 3, 1, 1)
    mean = torch.tensor(loaded.spec.mean).view(1, 3, 1, 1)
    return x * std + mean


def test_round_trip_error_bound_and_size(loaded, photos):
    codec = get_codec("jpeg", spec=loaded.spec)
    int8 = get_codec("int8+lz4")
    for x in photos:
        msg = codec.encode(x)
        assert msg.codec == tensor_pb2.CODEC_JPEG and list(msg.shape) == [1, 3, 224, 224]
        y = decode_tensor(msg, spec=loaded.spec)
        assert y.shape == x.shape and y.dtype == torch.float32
        err = (_pixels(loaded, y) - _pixels(loaded, x).round().clamp(0, 255)).abs()
        assert float(err.mean()) <= 1.0, float(err.mean())  # pixel units (0..255)
        assert msg.ByteSize() * 3 < int8.encode(x).ByteSize()  # 8-17 KB against 43-150 KB


def test_names_and_quality(loaded, photos):
    assert jpeg_quality("jpeg") == 90 and jpeg_quality("jpeg75") == 75 and jpeg_quality("raw") is None
    assert get_codec("jpeg", spec=loaded.spec).name == "jpeg"
    q75 = get_codec("jpeg75", spec=loaded.spec)
    assert q75.name == "jpeg75" and len(q75.encode(photos[1]).buffer) < len(get_codec("jpeg", spec=loaded.spec)
                                                                                .encode(photos[1]).buffer)
    for bad in ("jpeg0", "jpeg101"):
        with pytest.raises(InvalidInput, match=r"quality must be 1\.\.100"):
            get_codec(bad, spec=loaded.spec)
    with pytest.raises(PreconditionFailed, match="mean/std"):
        get_codec("jpeg")  # no model: it cannot de-normalise


def test_refused_at_any_split_but_input(loaded, photos):
    sp = loaded.split(5)
    with pytest.raises(InvalidInput, match="only at split 0"):
        codec_at("jpeg", sp.index, sp.name, spec=loaded.spec)
    with pytest.raises(InvalidInput, match="only at split 0"):
        InitialPlan(sp, get_codec("jpeg", spec=loaded.spec))
    assert codec_at("jpeg", 0, "input", spec=loaded.spec).name == "jpeg"
    with torch.inference_mode():
        feat = loaded.head(sp.name)(photos[0])
    with pytest.raises(InvalidInput, match="input image"):
        get_codec("jpeg", spec=loaded.spec).encode(feat)
    with pytest.raises(PreconditionFailed, match="CODEC_JPEG"):
        decode_tensor(get_codec("jpeg", spec=loaded.spec).encode(photos[0]))  # a decoder without the model


def _jpeg_bytes(size=(224, 224), mode="RGB", fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format=fmt)
    return buf.getvalue()


def _msg(buffer: bytes, shape=(1, 3, 224, 224), **kw) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(shape=list(shape), dtype="float32", codec=tensor_pb2.CODEC_JPEG, buffer=buffer,
                             encoded_size=len(buffer), chunks=1, payload_size=len(buffer), **kw)


def test_header_checks_before_decoding():
    ok = _jpeg_bytes()
    validate_tensor(_msg(ok))
    for msg, phrase in ((_msg(ok, compression=tensor_pb2.COMPRESSION_LZ4), "COMPRESSION_NONE"),
                        (_msg(ok, shape=(2, 3, 224, 224)), r"\[1, 3, H, W\]"),
                        (_msg(ok, shape=(1, 1, 224, 224)), r"\[1, 3, H, W\]"),
                        (_msg(b"\xff" * (4 * 3 * 8 * 8 + 1), shape=(1, 3, 8, 8)), "must be 1..768"),
                        (_msg(b""), "must be 1..")):
        with pytest.raises(InvalidInput, match=phrase):
            validate_tensor(msg)


# -- a real worker ---------------------------------------------------------------------------------


def test_worker_decodes_and_refuses(loaded, photos):
    good = get_codec("jpeg", spec=loaded.spec).encode(photos[1])
    truncated = _msg(good.buffer[: len(good.buffer) // 2])
    cases = {
        "garbage": (_msg(b"\x00not a jpeg" * 50), grpc.StatusCode.INVALID_ARGUMENT, "not a JPEG"),
        "png": (_msg(_jpeg_bytes(fmt="PNG")), grpc.StatusCode.INVALID_ARGUMENT, "not a JPEG"),
        "wrong_size": (_msg(_jpeg_bytes((200, 224))), grpc.StatusCode.INVALID_ARGUMENT, "200x224 RGB; the tensor"),
        "truncated": (truncated, grpc.StatusCode.INVALID_ARGUMENT, "could not be decoded"),
        "oversized": (_msg(b"\xff\xd8" + b"\x00" * (4 * 3 * 224 * 224)), grpc.StatusCode.INVALID_ARGUMENT,
                      "invalid for CODEC_JPEG"),
        "shape_not_model": (_msg(_jpeg_bytes((200, 200)), shape=(1, 3, 200, 200)), grpc.StatusCode.INVALID_ARGUMENT,
                            "does not fit split"),
    }
    reqs = [infer_request(loaded, good)] + [infer_request(loaded, m, seq=i + 1) for i, (m, _, _) in enumerate(cases.values())]
    with torch.inference_mode():
        feat = loaded.head(5)(photos[1])
    sp5 = loaded.split(5)
    bad_split = good.__deepcopy__()
    bad_split.shape[:] = list(feat.shape)  # a JPEG claiming to be the feature tensor at split 5
    reqs.append(infer_request(loaded, bad_split, split=sp5.name, seq=99))
    res = asyncio.run(infer_each(reqs))
    out = decode_tensor(res[0].output)
    with torch.inference_mode():
        assert int(out.argmax()) == int(loaded.full(decode_tensor(good, spec=loaded.spec)).argmax())
    for r, (name, (_, code, phrase)) in zip(res[1:-1], cases.items(), strict=True):
        assert isinstance(r, grpc.aio.AioRpcError), name
        assert r.code() == code and phrase in (r.details() or ""), (name, r.code(), r.details())
    assert res[-1].code() == grpc.StatusCode.FAILED_PRECONDITION, res[-1]
    assert "only split 0 ('input')" in res[-1].details(), res[-1].details()


# -- agent -> worker, end to end -----------------------------------------------------------------


@pytest.mark.timeout(180)
def test_agent_split_input_codec_jpeg_matches_local(worker, run_agent, loaded, photos, tmp_path):
    import json

    _, port = worker
    out = tmp_path / "jpeg.jsonl"
    p = run_agent("--worker", f"127.0.0.1:{port}", "--model", MODEL, "--split", "input", "--codec", "jpeg",
                  "--source", "samples", "--frames", "4", "--torch-threads", "1", "--no-summary", "--output", str(out))
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert len(rows) == 4 and all(r["where"] == "edge" and r["codec"] == "jpeg" for r in rows), rows
    with torch.inference_mode():
        local = [int(loaded.full(x).argmax()) for x in photos]
    assert [r["class_index"] for r in sorted(rows, key=lambda r: r["seq"])] == local
    assert max(r["wire_bytes"] for r in rows) < 20_000


# -- the profiler offers it at the input cut -----------------------------------------------------


def test_profiler_offers_jpeg_at_input_only():
    from runtime.measure.profiler import profile_model

    prof = profile_model("digits_cnn", "device", runs=2, warmup=0, codecs=("raw", "jpeg"), progress=False, inputs=2)
    names = [t.name for t in prof.input_transfers]
    assert names == ["raw", "jpeg"], names
    jp = prof.input_transfers[1]
    assert jp.codec == "jpeg" and jp.fidelity is not None and 0 <= jp.fidelity <= 1
    assert jp.bytes < prof.input_transfers[0].bytes and jp.encode_seconds > 0 and jp.decode_seconds > 0
    assert all(t.codec != "jpeg" for b in prof.blocks for t in b.transfers)


# -- the planner: jpeg at the input, under the fidelity floor ------------------------------------


def test_planner_picks_jpeg_at_input_within_the_fidelity_floor():
    from planner.search import search
    from runtime.contracts.costmodel import Constraints, Link, Network, Tier
    from runtime.contracts.profile import Block, Profile, Transfer

    def prof(machine, role, seconds, jpeg_fidelity):
        inputs = (Transfer("int8+lz4", 100_000, 0.001, 0.001, codec="int8+lz4"),
                  Transfer("jpeg", 10_000, 0.002, 0.002, codec="jpeg", fidelity=jpeg_fidelity))
        blocks = (Block(0, "b0", seconds, 50_000, transfers=(Transfer("int8+lz4", 50_000, codec="int8+lz4"),)),
                  Block(1, "output", seconds, 4000))
        return Profile(machine, role, "m", blocks, 600_000, input_transfers=inputs)

    net = Network({("device", "edge"): Link(0.0, 200_000.0)})  # 1.6 Mbit/s

    def best(fid, floor):
        tiers = [Tier("device", (prof("pi", "device", 1.0, fid),)),
                 Tier("edge", (prof("srv", "edge", 0.01, fid),))]
        return search(tiers, net, Constraints(min_fidelity=floor), include_return=False)[0]

    got = best(1.0, 0.97)
    assert got.hops[0].split == "input" and got.hops[0].transfer.codec == "jpeg"
    got = best(0.5, 0.97)  # measured below the floor: not offered
    assert got.hops[0].transfer.codec != "jpeg"
    assert best(0.5, 0.0).hops[0].transfer.codec == "jpeg"  # no floor


def test_bench_scenarios_board_jpeg_encode_is_the_measured_one():
    from runtime.contracts.profile import Block, Profile, Transfer
    from runtime.measure.scenarios import costs

    p = Profile("b", "device", "m", (Block(0, "output", 1.0, 4000),), 600_000,
                input_transfers=(Transfer("raw", 600_000, 0.001, codec="raw"), Transfer("jpeg", 13_000, 0.06, codec="jpeg")))
    got = costs.with_input_encode(costs.rescale(p, 3.0), 0.017)
    assert [t.encode_seconds for t in got.input_transfers] == [pytest.approx(0.003), 0.017]
