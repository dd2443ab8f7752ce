"""The ``pixels`` / ``pixels+lz4`` wire codecs: the model's input image as lossless 8-bit pixels, split 0 only.

Round trips are bit-exact on the bundled photos, synthetic images and edge cases (all 0, all 255, rows that
wrap modulo 256), for a model whose mean/std are not integers too; refusal at any other split (agent and
worker side); malformed headers and payloads refused with INVALID_ARGUMENT by a real worker before decoding;
the profiler offers it at the input cut only; the planner picks it when it wins within the fidelity floor.
"""

from __future__ import annotations

import asyncio

import grpc
import lz4.block
import pytest
import torch
from PIL import Image
from worker_calls import infer_each, infer_request

from runtime.agent.config import InitialPlan
from runtime.agent.sources import open_source
from runtime.contracts.errors import InvalidInput, PreconditionFailed
from runtime.models.loader import load_model
from runtime.models.spec import preprocess
from runtime.proto.edgesplit.v1 import tensor_pb2
from runtime.wire.codec import codec_at, decode_tensor, get_codec, validate_tensor, wire_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

MODEL = "efficientnet_lite0"
NAMES = ("pixels", "pixels+lz4")


@pytest.fixture(scope="module")
def loaded(one_torch_thread):
    return load_model(MODEL)


@pytest.fixture(scope="module")
def photos(loaded):
    return [f.tensor for f in open_source(loaded.spec, "samples", 4)]


def _image(spec, fill) -> torch.Tensor:
    h, w = spec.input_size
    return preprocess(spec, Image.fromarray(fill(h, w)))


def _edge_cases(spec) -> list[torch.Tensor]:
    import numpy as np

    rng = np.random.default_rng(14)
    return [_image(spec, lambda h, w: np.zeros((h, w, 3), np.uint8)),
            _image(spec, lambda h, w: np.full((h, w, 3), 255, np.uint8)),
            _image(spec, lambda h, w: np.tile(np.array([[0], [255]], np.uint8), (h // 2, w))[..., None].repeat(3, 2)),
            _image(spec, lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8))]


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_exact(loaded, photos, name):
    codec = get_codec(name, spec=loaded.spec)
    fp16 = get_codec("fp16+lz4" if name.endswith("+lz4") else "fp16")  # the same compression, for the bytes
    for x in [*photos, *_edge_cases(loaded.spec)]:
        msg = codec.encode(x)
        assert msg.codec == tensor_pb2.CODEC_PIXELS and list(msg.shape) == [1, 3, 224, 224]
        assert msg.encoded_size == 3 * 224 * 224 and msg.dtype == "float32"
        y = decode_tensor(msg, spec=loaded.spec)
        assert torch.equal(y, x)  # bit for bit: the split computes what the unsplit model does
    for x in photos:
        assert wire_bytes(codec.encode(x)) < wire_bytes(fp16.encode(x))
    with torch.inference_mode():
        for x in photos:
            assert torch.equal(loaded.full(decode_tensor(codec.encode(x), spec=loaded.spec)), loaded.full(x))


def test_exact_for_a_model_with_non_integer_mean_and_std():
    digits = load_model("digits_cnn")  # mean 33.3285, std 78.5655
    codec = get_codec("pixels+lz4", spec=digits.spec)
    for f in open_source(digits.spec, "synthetic", 3):
        assert torch.equal(decode_tensor(codec.encode(f.tensor), spec=digits.spec), f.tensor)


def test_values_between_pixel_levels_round_to_the_nearest(loaded, photos):
    codec = get_codec("pixels+lz4", spec=loaded.spec)
    x = photos[0] + 0.3 / 128  # a third of a pixel level off (std 128)
    y = decode_tensor(codec.encode(x), spec=loaded.spec)
    assert torch.equal(y, photos[0])


def test_refused_at_any_split_but_input(loaded, photos):
    sp = loaded.split(5)
    for name in NAMES:
        with pytest.raises(InvalidInput, match="only at split 0"):
            codec_at(name, sp.index, sp.name, spec=loaded.spec)
        with pytest.raises(InvalidInput, match="only at split 0"):
            InitialPlan(sp, get_codec(name, spec=loaded.spec))
        assert codec_at(name, 0, "input", spec=loaded.spec).name == name
    with torch.inference_mode():
        feat = loaded.head(sp.name)(photos[0])
    with pytest.raises(InvalidInput, match="input image"):
        get_codec("pixels", spec=loaded.spec).encode(feat)
    with pytest.raises(PreconditionFailed, match="mean/std"):
        get_codec("pixels")
    with pytest.raises(PreconditionFailed, match="CODEC_PIXELS"):
        decode_tensor(get_codec("pixels", spec=loaded.spec).encode(photos[0]))  # a decoder without the model


def _msg(buffer: bytes, shape=(1, 3, 224, 224), lz4=False, encoded_size=None, **kw) -> tensor_pb2.Tensor:
    n = 1
    for d in shape:
        n *= d
    return tensor_pb2.Tensor(shape=list(shape), dtype=kw.pop("dtype", "float32"), codec=tensor_pb2.CODEC_PIXELS,
                             compression=tensor_pb2.COMPRESSION_LZ4 if lz4 else tensor_pb2.COMPRESSION_NONE,
                             buffer=buffer, encoded_size=n if encoded_size is None else encoded_size, chunks=1,
                             payload_size=len(buffer), **kw)


def test_header_checks_before_decoding():
    n = 3 * 8 * 8
    validate_tensor(_msg(b"\x00" * n, shape=(1, 3, 8, 8)))
    for msg, phrase in ((_msg(b"\x00" * n, shape=(1, 1, 8, 24)), r"\[1, 3, H, W\]"),
                        (_msg(b"\x00" * (2 * n), shape=(2, 3, 8, 8)), r"\[1, 3, H, W\]"),
                        (_msg(b"\x00" * n, shape=(3, 8, 8)), r"\[1, 3, H, W\]"),
                        (_msg(b"\x00" * n, shape=(1, 3, 8, 8), encoded_size=4 * n), "encoded_size"),
                        (_msg(b"\x00" * (n - 1), shape=(1, 3, 8, 8)), "len\\(buffer\\)"),
                        (_msg(b"\x00" * (n + 100), shape=(1, 3, 8, 8), lz4=True), "lz4 bound"),
                        (_msg(b"\x00" * n, shape=(1, 3, 8, 8), dtype="uint8"), "float32"),
                        (_msg(b"\x00" * n, shape=(1, 3, 8, 8), scale=[1.0]), "only CODEC_INT8")):
        with pytest.raises(InvalidInput, match=phrase):
            validate_tensor(msg)


# -- a real worker ---------------------------------------------------------------------------------


def test_worker_decodes_exactly_and_refuses_bad_input(loaded, photos):
    good = get_codec("pixels+lz4", spec=loaded.spec).encode(photos[1])
    n = 3 * 224 * 224
    cases = {
        "corrupt_lz4": (_msg(b"\xff" * 1000, lz4=True), "not a valid lz4 block"),
        "lz4_short": (_msg(lz4.block.compress(b"\x00" * (n // 2), store_size=False), lz4=True), "decompressed to"),
        "huge_claim": (_msg(b"\x00" * 10, shape=(1, 3, 60_000, 60_000), lz4=True), "does not fit split"),
        "size_mismatch": (_msg(b"\x00" * n, encoded_size=n + 3), "encoded_size"),
        "shape_not_model": (_msg(b"\x00" * (3 * 200 * 200), shape=(1, 3, 200, 200)), "does not fit split"),
    }
    reqs = [infer_request(loaded, good)] + [infer_request(loaded, m, seq=i + 1) for i, (m, _) in enumerate(cases.values())]
    with torch.inference_mode():
        feat = loaded.head(5)(photos[1])
    bad_split = _msg(bytes(feat.numel()), shape=tuple(feat.shape))  # pixels claiming to be split 5's tensor
    reqs.append(infer_request(loaded, bad_split, split=loaded.split(5).name, seq=99))
    res = asyncio.run(infer_each(reqs))
    with torch.inference_mode():
        assert torch.equal(decode_tensor(res[0].output), loaded.full(photos[1]))
    for r, (name, (_, phrase)) in zip(res[1:-1], cases.items(), strict=True):
        assert isinstance(r, grpc.aio.AioRpcError), name
        assert r.code() == grpc.StatusCode.INVALID_ARGUMENT and phrase in (r.details() or ""), (name, r.details())
    assert isinstance(res[-1], grpc.aio.AioRpcError) and res[-1].code() in (
        grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), res[-1]


# -- the profiler and the planner ----------------------------------------------------------------


def test_profiler_offers_pixels_at_input_only():
    from runtime.measure.profiler import profile_model

    prof = profile_model("digits_cnn", "device", runs=2, warmup=0, codecs=("raw", "pixels+lz4"), progress=False,
                         inputs=2)
    names = [t.name for t in prof.input_transfers]
    assert names == ["raw", "pixels+lz4"], names
    px = prof.input_transfers[1]
    assert px.bytes < prof.input_transfers[0].bytes / 4 and px.encode_seconds > 0 and px.decode_seconds > 0
    assert all(t.codec != "pixels+lz4" for b in prof.blocks for t in b.transfers)


def test_planner_picks_pixels_when_it_wins_within_the_floor():
    """JPEG below the floor, pixels+lz4 (lossless) at half of int8+lz4's bytes after block 0: the planner sends
    the pixels; with JPEG within the floor it sends the JPEG (fewer bytes still)."""
    from planner.search import search
    from runtime.contracts.costmodel import Constraints, Link, Network, Tier
    from runtime.contracts.profile import Block, Profile, Transfer

    def prof(machine, role, seconds, jpeg_fidelity):
        inputs = (Transfer("raw", 600_000, codec="raw"), Transfer("fp16+lz4", 200_000, 0.001, 0.001, codec="fp16+lz4"),
                  Transfer("pixels+lz4", 60_000, 0.001, 0.001, codec="pixels+lz4"),
                  Transfer("jpeg", 10_000, 0.002, 0.002, codec="jpeg", fidelity=jpeg_fidelity))
        blocks = (Block(0, "b0", seconds, 400_000, transfers=(Transfer("int8+lz4", 120_000, codec="int8+lz4"),)),
                  Block(1, "output", seconds, 4000))
        return Profile(machine, role, "m", blocks, 600_000, input_transfers=inputs)

    net = Network({("device", "edge"): Link(0.01, 2_500_000.0)})  # 20 Mbit/s

    def best(fid):
        tiers = [Tier("device", (prof("pi", "device", 0.3, fid),)), Tier("edge", (prof("srv", "edge", 0.01, fid),))]
        return search(tiers, net, Constraints(min_fidelity=0.99), include_return=False)[0]

    got = best(0.8)
    assert got.hops[0].split == "input" and got.hops[0].transfer.codec == "pixels+lz4", got
    assert best(1.0).hops[0].transfer.codec == "jpeg"


def test_input_codecs_benchmark_measures_every_codec(loaded, photos):
    """The benchmark behind overhead.md's input-codec table (its timings are printed, not asserted)."""
    from runtime.measure.scenarios.input_codecs import encoders, measure

    res = measure(encoders(loaded.spec, photos[:2]), photos[:2], repeats=1)
    tensor = " (from the tensor)"
    assert list(res) == ["pixels", f"pixels{tensor}", "pixels+lz4", f"pixels+lz4{tensor}", "webp", f"webp{tensor}",
                         "jpeg", f"jpeg{tensor}", "fp16+lz4", "png (level 1)", "png (level 6)"]
    assert all(res[f"{c}{tensor}"]["bytes"] == res[c]["bytes"] for c in ("pixels", "pixels+lz4", "webp", "jpeg"))
    assert res["pixels"]["bytes"] > res["pixels+lz4"]["bytes"] > res["png (level 1)"]["bytes"] > res["jpeg"]["bytes"]
    assert res["webp"]["bytes"] < res["png (level 1)"]["bytes"]  # lossless, and smaller than PNG on photos
    assert all(r["encode_ms"] > 0 for r in res.values())
