"""A frame's source pixels travel with its tensor (runtime.models.spec.source_pixels), and the input codecs
(pixels, pixels+lz4, webp, jpeg) send them as they are: the same bytes as de-normalising the tensor back to pixels,
which they do only for a tensor holding no pixels (an operation's result, a copy, one changed in place)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.agent.sources import open_source
from runtime.contracts.errors import InvalidInput
from runtime.models.loader import load_model
from runtime.models.spec import image_pixels, normalise, preprocess, source_pixels
from runtime.wire.codec import get_codec
from runtime.wire.codec_base import InputImageCodec

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

MODEL = "mobilenet_v2"
INPUT_CODECS = ("pixels", "pixels+lz4", "webp", "jpeg", "jpeg40")


@pytest.fixture(scope="module")
def loaded(one_torch_thread):
    return load_model(MODEL)


@pytest.fixture(scope="module")
def frames(loaded):
    """The bundled photos, synthetic frames and flat / extreme images, each as its source makes it."""
    edge = [np.zeros((224, 224, 3), np.uint8), np.full((224, 224, 3), 255, np.uint8)]
    return ([f.tensor for f in open_source(loaded.spec, "samples", 4)]
            + [f.tensor for f in open_source(loaded.spec, "synthetic", 2)]
            + [preprocess(loaded.spec, Image.fromarray(a)) for a in edge])


def test_preprocess_keeps_its_pixels_read_only(loaded):
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 260, 3), dtype=np.uint8))
    x = preprocess(loaded.spec, img)
    pix = source_pixels(x)
    assert pix is not None and pix.shape == (224, 224, 3) and pix.dtype == np.uint8 and not pix.flags.writeable
    assert np.array_equal(pix, image_pixels(loaded.spec, img))
    mean = torch.tensor(loaded.spec.mean).view(3, 1, 1)
    std = torch.tensor(loaded.spec.std).view(3, 1, 1)
    assert torch.equal(x, ((torch.from_numpy(pix.copy()).permute(2, 0, 1).float() - mean) / std).unsqueeze(0))


def test_pixels_are_forgotten_by_copies_results_and_in_place_changes(loaded, frames):
    x = preprocess(loaded.spec, Image.new("RGB", (224, 224), (10, 20, 30)))
    assert source_pixels(x) is not None
    assert source_pixels(x.clone()) is None and source_pixels(x * 1) is None and source_pixels(x[:, :2]) is None
    x.add_(0.5)  # its version counter moves: the pixels no longer describe it
    assert source_pixels(x) is None
    with torch.inference_mode():
        assert source_pixels(normalise(loaded.spec, source_pixels(frames[0]))) is None  # no version counter to check
    assert source_pixels(frames[0]) is not None


def test_normalise_checks_its_pixels_and_copies_writable_ones(loaded):
    with pytest.raises(InvalidInput, match=r"uint8 pixels of shape \(224, 224, 3\)"):
        normalise(loaded.spec, np.zeros((224, 224, 4), np.uint8))
    with pytest.raises(InvalidInput, match="uint8"):
        normalise(loaded.spec, np.zeros((224, 224, 3), np.float32))
    mine = np.zeros((224, 224, 3), np.uint8)
    x = normalise(loaded.spec, mine)
    mine[0, 0] = 255  # the caller's array stays the caller's: the tensor holds a copy
    assert source_pixels(x)[0, 0, 0] == 0


def test_the_agents_input_head_hands_the_frame_on_with_its_pixels(loaded, frames):
    """Split 0's head returns its input itself: the codec after it still sees the source pixels (client._head_encode)."""
    with torch.inference_mode():
        h = loaded.head("input")(frames[0])
    assert source_pixels(h) is source_pixels(frames[0])


@pytest.mark.parametrize("name", INPUT_CODECS)
def test_codecs_send_the_same_bytes_from_the_pixels_as_from_the_tensor(loaded, frames, name, monkeypatch):
    codec = get_codec(name, spec=loaded.spec)
    from_tensor = [codec.encode(x.clone()).SerializeToString() for x in frames]  # a clone holds no pixels
    calls = []
    real = InputImageCodec._to_pixels
    monkeypatch.setattr(InputImageCodec, "_to_pixels", lambda self, x, msg: calls.append(1) or real(self, x, msg))
    from_pixels = [codec.encode(x).SerializeToString() for x in frames]
    assert calls == []  # the pixel path was taken for every frame
    assert from_pixels == from_tensor
    frame = codec.encode_frame(frames[0])  # the agent's call: the same header and payload
    assert bytes(frame.payload) == codec.encode(frames[0]).buffer
    codec.encode(frames[0].clone())
    assert calls == [1]


def test_a_frame_changed_in_place_is_sent_as_it_now_is(loaded, frames):
    codec = get_codec("pixels", spec=loaded.spec)
    x = frames[0].clone()
    y = preprocess(loaded.spec, Image.fromarray(source_pixels(frames[0])))
    y.mul_(0).add_(x.mul(0.5))  # the same object, no longer its source's pixels
    assert source_pixels(y) is None
    assert codec.encode(y).buffer == codec.encode(x.mul(0.5)).buffer != codec.encode(frames[0]).buffer


@pytest.mark.parametrize("name", ("webp", "pixels"))
def test_round_trip_from_pixels_is_exact(loaded, frames, name):
    codec = get_codec(name, spec=loaded.spec)
    for x in frames:
        assert torch.equal(codec.decode(codec.encode(x)), x)


def test_the_agent_sends_an_input_frame_from_its_pixels_without_calling_the_head(loaded, frames, monkeypatch):
    """client._head_encode at split 'input': the head (the empty graph) is not called, and the codec gets the frame
    itself, pixels and all: the bytes a frame travels in are the codec's from the pixels."""
    from types import SimpleNamespace

    from runtime.agent.client import Agent

    def no_head(x):
        raise AssertionError("the input split's head was called")

    codec = get_codec("webp", spec=loaded.spec)
    plan = SimpleNamespace(split=SimpleNamespace(name="input"), head=no_head, encoder=None, stream=object(), codec=codec)
    monkeypatch.setattr(InputImageCodec, "_to_pixels", lambda *a: pytest.fail("the frame was de-normalised"))
    h, msg, *_, tail, _ = Agent._head_encode(None, plan, frames[0])  # type: ignore[arg-type]
    assert h is frames[0] and tail is None
    assert bytes(msg.payload) == codec.encode(frames[0]).buffer


def test_pixels_are_held_beside_the_tensor_not_pickled_with_it(loaded):
    """torch.save / torch.load (weights_only) of a preprocessed tensor work as for any tensor; the entry goes with it."""
    import gc
    import io

    from runtime.models import spec as spec_module

    x = preprocess(loaded.spec, Image.new("RGB", (224, 224), (1, 2, 3)))
    buf = io.BytesIO()
    torch.save(x, buf)
    buf.seek(0)
    y = torch.load(buf)
    assert torch.equal(y, x) and source_pixels(y) is None
    key = id(x)
    assert key in spec_module._HELD
    del x
    gc.collect()
    assert key not in spec_module._HELD
