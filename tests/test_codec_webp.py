"""The ``webp`` wire codec: the model's input image as a lossless WebP, split 0 only.

Round trips are bit-exact on the bundled photos and edge cases, and smaller than ``pixels+lz4`` on the photos;
refusal at any other split; a lossy, extended, truncated, mis-sized or foreign payload refused with InvalidInput
before its pixels are decoded, INVALID_ARGUMENT from a real worker; the profiler offers it at the input cut only.
"""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from worker_calls import infer_each, infer_request

from runtime.agent.config import InitialPlan
from runtime.agent.sources import open_source
from runtime.contracts.errors import InvalidInput, PreconditionFailed
from runtime.models.loader import load_model
from runtime.proto.edgesplit.v1 import tensor_pb2
from runtime.wire.codec import codec_at, decode_tensor, get_codec, validate_tensor, wire_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

MODEL = "efficientnet_lite0"


@pytest.fixture(scope="module")
def loaded(one_torch_thread):
    return load_model(MODEL)


@pytest.fixture(scope="module")
def photos(loaded):
    return [f.tensor for f in open_source(loaded.spec, "samples", 4)]


def _file(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="WEBP", **kw)
    return buf.getvalue()


def _msg(buffer: bytes, shape=(1, 3, 224, 224), **kw) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(shape=list(shape), dtype="float32", codec=tensor_pb2.CODEC_WEBP, buffer=buffer,
                             encoded_size=kw.pop("encoded_size", len(buffer)), chunks=1, payload_size=len(buffer), **kw)


def test_round_trip_is_exact_and_smaller_than_pixels(loaded, photos):
    codec = get_codec("webp", spec=loaded.spec)
    rng = np.random.default_rng(14)
    edge = [np.zeros((224, 224, 3), np.uint8), np.full((224, 224, 3), 255, np.uint8),
            rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)]
    from runtime.models.spec import preprocess

    for x in [*photos, *(preprocess(loaded.spec, Image.fromarray(a)) for a in edge)]:
        msg = codec.encode(x)
        assert msg.codec == tensor_pb2.CODEC_WEBP and list(msg.shape) == [1, 3, 224, 224] and msg.dtype == "float32"
        assert torch.equal(decode_tensor(msg, spec=loaded.spec), x)  # bit for bit
    pixels = get_codec("pixels+lz4", spec=loaded.spec)
    for x in photos:
        assert wire_bytes(codec.encode(x)) < 0.8 * wire_bytes(pixels.encode(x))


def test_refused_at_any_split_but_input(loaded, photos):
    sp = loaded.split(5)
    with pytest.raises(InvalidInput, match="only at split 0"):
        codec_at("webp", sp.index, sp.name, spec=loaded.spec)
    with pytest.raises(InvalidInput, match="only at split 0"):
        InitialPlan(sp, get_codec("webp", spec=loaded.spec))
    with pytest.raises(PreconditionFailed, match="mean/std"):
        get_codec("webp")
    with pytest.raises(PreconditionFailed, match="CODEC_WEBP"):
        decode_tensor(get_codec("webp", spec=loaded.spec).encode(photos[0]))  # a decoder without the model


def test_bad_payloads_refused_before_decoding(loaded, photos):
    img = np.zeros((224, 224, 3), np.uint8)
    good = _file(img, lossless=True)
    cases = {
        "lossy": (_msg(_file(img, quality=90)), "lossless WebP"),
        "alpha": (_msg(_file(np.zeros((224, 224, 4), np.uint8), lossless=True)), "RGBA"),
        "jpeg": (_msg(get_codec("jpeg", spec=loaded.spec).encode(photos[0]).buffer), "lossless WebP"),
        "wrong_size": (_msg(_file(np.zeros((100, 224, 3), np.uint8), lossless=True)), "100"),
        "truncated": (_msg(good[:-8]), "WebP"),
        "shape_not_model": (_msg(good, shape=(1, 3, 200, 200)), "input image"),
    }
    from runtime.models.spec import preprocess

    assert torch.equal(decode_tensor(_msg(good), spec=loaded.spec), preprocess(loaded.spec, Image.fromarray(img)))
    for name, (msg, phrase) in cases.items():
        with pytest.raises(InvalidInput, match=phrase):
            decode_tensor(msg, spec=loaded.spec)
            pytest.fail(name)
    for msg, phrase in ((_msg(good, compression=tensor_pb2.COMPRESSION_LZ4), "already compressed"),
                        (_msg(good, shape=(1, 1, 224, 224)), r"\[1, 3, H, W\]"),
                        (_msg(good, encoded_size=4 * 3 * 224 * 224 + 1), "encoded_size")):
        with pytest.raises(InvalidInput, match=phrase):
            validate_tensor(msg)


def test_worker_computes_the_unsplit_result_and_refuses_a_lossy_webp(loaded, photos):
    lossy = _msg(_file(np.zeros((224, 224, 3), np.uint8), quality=90))
    good, bad = asyncio.run(infer_each([infer_request(loaded, get_codec("webp", spec=loaded.spec).encode(photos[2])),
                                        infer_request(loaded, lossy, seq=1)]))
    with torch.inference_mode():
        assert torch.equal(decode_tensor(good.output), loaded.full(photos[2]))
    assert isinstance(bad, grpc.aio.AioRpcError) and bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lossless WebP" in (bad.details() or "")


def test_profiler_offers_webp_at_input_only():
    from runtime.measure.profiler import profile_model

    prof = profile_model("digits_cnn", "device", runs=2, warmup=0, codecs=("raw", "webp"), progress=False, inputs=2)
    assert [t.name for t in prof.input_transfers] == ["raw", "webp"]
    assert prof.input_transfers[1].bytes < prof.input_transfers[0].bytes
    assert all(t.codec != "webp" for b in prof.blocks for t in b.transfers)
