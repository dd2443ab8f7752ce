"""Head then tail equals the full model at every valid split point of every bundled model."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

from runtime.agent.sources import SAMPLES_DIR, load_image
from runtime.contracts.errors import InvalidInput, NotFound
from runtime.models import build_model, get_spec, list_models, preprocess
from runtime.models.slicing import INPUT, OUTPUT, SlicedModel
from runtime.wire.codec import decode_tensor, get_codec

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

# Small inputs keep the sweep fast; the graph (and so the split points) does not depend on size.
SIZE = 64

# Lossy codec error at the output, relative to max |logit|, over every 4th split point.
# Random-weight networks are not trained to be robust to noise, so int8 is looser there.
FP16_REL_TOL = 0.05
INT8_REL_TOL = {"efficientnet_lite0": 0.05, "vgg16": 0.05, "resnet18": 0.1}
INT8_REL_TOL_DEFAULT = 0.6



@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", list_models())
def test_every_split_point_is_exact(name):
    model = build_model(get_spec(name))
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    sm = SlicedModel(model, x, name)
    assert sm.split_points[0].name == INPUT and sm.split_points[-1].name == OUTPUT
    assert len(sm.split_points) >= 20, "a deep CNN has many single-tensor cuts"
    with torch.inference_mode():
        ref = model(x)
        assert torch.equal(sm.graph_module(x), ref)
        worst = {"fp16": 0.0, "int8": 0.0}
        for sp in sm.split_points:
            h = sm.head(sp.name)(x)
            assert tuple(h.shape) == sp.out_shape
            tail = sm.tail(sp.name)
            assert torch.equal(tail(h), ref), f"{name} split {sp.index} ({sp.name}) differs from the full model"
            if sp.index % 4 == 0:
                for codec in worst:
                    y = tail(decode_tensor(get_codec(codec + "+lz4").encode(h)))
                    worst[codec] = max(worst[codec], float((y - ref).abs().max() / ref.abs().max()))
    assert worst["fp16"] <= FP16_REL_TOL, worst
    assert worst["int8"] <= INT8_REL_TOL.get(name, INT8_REL_TOL_DEFAULT), worst


def test_int8_keeps_efficientnet_predictions_on_real_photos():
    spec = get_spec("efficientnet_lite0")
    model = build_model(spec)
    photos = sorted(SAMPLES_DIR.glob("*.jpg"))
    x = torch.cat([preprocess(spec, load_image(p)) for p in photos])
    sm = SlicedModel(model, x[:1], spec.name)
    with torch.inference_mode():
        ref = model(x).argmax(1)
        for sp in sm.split_points[1:-1:6]:
            h = sm.head(sp.name)(x)
            y = sm.tail(sp.name)(decode_tensor(get_codec("int8+lz4").encode(h)))
            assert torch.equal(y.argmax(1), ref), f"int8 changed a top-1 class at split {sp.name}"


class _Branchy(nn.Module):
    """stem -> (a, b in parallel) -> add -> flatten -> fc, with a functional constant."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1, dilation=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 5)
        self.register_buffer("bias", torch.ones(5))

    def forward(self, x):
        s = self.stem(x)
        y = self.a(s) + self.b(s)
        return self.fc(torch.flatten(self.pool(y), 1)) + self.bias


def test_split_points_follow_the_single_tensor_rule():
    torch.manual_seed(0)
    m = _Branchy().eval()
    x = torch.randn(1, 3, 16, 16)
    sm = SlicedModel(m, x, "branchy")
    names = [sp.name for sp in sm.split_points]
    # inside the parallel branch two tensors cross: a and b are not valid cuts
    assert names == ["input", "stem", "add", "pool", "flatten", "fc", "output"] or names == [
        "input", "stem", "add", "pool", "flatten", "output"], names
    assert "a" not in names and "b" not in names
    for sp in sm.split_points:
        assert torch.equal(sm.tail(sp.name)(sm.head(sp.name)(x)), m(x))
    # geometry is kept for receptive-field work
    stem = next(layer for layer in sm.layers if layer.name == "stem")
    assert (stem.kind, stem.kernel, stem.stride, stem.padding, stem.out_shape) == ("Conv2d", (3, 3), (2, 2), (1, 1), (1, 4, 8, 8))
    pool = next(layer for layer in sm.layers if layer.name == "pool")
    assert pool.kind == "MaxPool2d" and pool.kernel == (2, 2)


def test_split_lookup_by_index_and_name_and_clear_errors():
    sm = SlicedModel(_Branchy().eval(), torch.zeros(1, 3, 16, 16), "branchy")
    assert sm.split(1).name == "stem" and sm.split("1").name == "stem" and sm.split("stem").index == 1
    with pytest.raises(NotFound, match=re.escape("valid are 0..")) as e:
        sm.split("nope")
    assert "edgesplit models branchy" in str(e.value)
    with pytest.raises(NotFound):
        sm.split(99)


def test_untraceable_and_multi_output_models_are_refused():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    class TwoOutputs(nn.Module):
        def forward(self, x):
            return x + 1, x - 1

    with pytest.raises(InvalidInput, match="cannot be traced"):
        SlicedModel(DataDependent(), torch.zeros(1, 3, 4, 4), "dd")
    with pytest.raises(InvalidInput, match="single tensor"):
        SlicedModel(TwoOutputs(), torch.zeros(1, 3, 4, 4), "two")


def test_saved_torch_export_program_is_sliced_like_any_model(tmp_path):
    import importlib.util

    from runtime.models.loader import load_model

    spec = importlib.util.spec_from_file_location("tiny_net_for_export", "tests/data/tiny_net.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.build().eval()
    path = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 3, 64, 64),)), str(path))

    loaded = load_model(str(path))
    assert loaded.input_shape == (1, 3, 64, 64)  # taken from the exported program
    names = [sp.name for sp in loaded.sliced.split_points]
    assert names[0] == INPUT and names[-1] == OUTPUT and len(names) >= 6
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = model(x)
        assert torch.equal(loaded.full(x), ref)
        for sp in loaded.sliced.split_points:
            assert torch.equal(loaded.tail(sp.name)(loaded.head(sp.name)(x)), ref), sp.name
