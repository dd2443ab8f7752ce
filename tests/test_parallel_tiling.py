"""Receptive-field segmentation and fused-block tiled execution (runtime.parallel, issue 13).

* The halo arithmetic against brute force: for random layer chains (and residual graphs), the input
  pixels that influence each output tile, found by pushing every one-hot input image through a
  positive linear stand-in of the chain, have exactly the bounding box ``back_propagate`` computes.
* Exactness: tiles run on their crops (halo included, padded only at the true border) and stitched
  equal the unsplit computation, for random chains with real max/avg pools and for segments of the
  bundled VGG-16, ResNet-18/50 (ResNet-50's layer1, and layer2's strided bottleneck), MobileNetV2 and
  DenseNet-169, with 2, 3, 4 row tiles and 2x2 grids on odd input sizes. Tolerance: max abs diff
  <= TOL x max |reference| (the conv kernels may accumulate in another order on a smaller input;
  measured <= 1e-6 for VGG-16, ResNet-18, ResNet-50 layer2 and DenseNet-169, 0 for ResNet-50 layer1
  and MobileNetV2; run with -s to see the figures).
"""

from __future__ import annotations

import functools
import random

import pytest
import torch
from torch import nn

from runtime.contracts.errors import InvalidInput
from runtime.models.registry import build_model, get_spec
from runtime.models.slicing import SlicedModel
from runtime.parallel import receptive as rf
from runtime.parallel.receptive import Graph, Layer, Region, Span
from runtime.parallel.tiled import TiledSegment, segment_geometry, stitch

torch.set_num_threads(1)
TOL = 1e-5  # relative to the output's scale


# -- random geometry ------------------------------------------------------------------------------

def _rand_axis(rng: random.Random, kind: str) -> tuple[int, int, int, int]:
    """(k, s, p, d) for one axis, valid for torch; a conv window always touches the real input."""
    k = rng.choice([1, 2, 3, 5]) if kind == rf.CONV else rng.choice([2, 3])
    d = rng.choice([1, 1, 2]) if kind != rf.AVGPOOL else 1
    s = rng.choice([1, 1, 2, 3])
    p = rng.randint(0, k // 2 if kind != rf.CONV else d * (k - 1))  # torch: pool padding <= k // 2
    return k, s, p, d


def _rand_window(rng: random.Random, name: str, inp: str) -> Layer:
    kind = rng.choice([rf.CONV, rf.CONV, rf.MAXPOOL, rf.AVGPOOL])
    rows, cols = _rand_axis(rng, kind), _rand_axis(rng, kind)
    if kind == rf.AVGPOOL:  # torch's avg pool has no dilation
        rows, cols = (*rows[:3], 1), (*cols[:3], 1)
    return Layer(name, kind, (inp,), (rows[0], cols[0]), (rows[1], cols[1]), (rows[2], cols[2]), (rows[3], cols[3]))


def random_graph(rng: random.Random, in_hw: tuple[int, int], depth: int) -> Graph:
    """A random chain of conv/pool/ReLU layers with residual blocks (a 'same' conv branch added back)."""
    layers: list[Layer] = []
    prev = rf.INPUT
    for i in range(depth):
        roll = rng.random()
        if roll < 0.25:  # residual block: branch of one or two 'same' convs, added to the trunk
            branch = prev
            for j in range(rng.randint(1, 2)):
                k, d = rng.choice([(3, 1), (3, 2), (5, 1), (1, 1)])
                layers.append(Layer(f"b{i}_{j}", rf.CONV, (branch,), k, 1, d * (k - 1) // 2, d))
                branch = layers[-1].name
            layers.append(Layer(f"add{i}", rf.ADD, (prev, branch)))
        elif roll < 0.35:
            layers.append(Layer(f"relu{i}", rf.POINTWISE, (prev,)))
        else:
            candidate = _rand_window(rng, f"w{i}", prev)
            try:
                Graph((*layers, candidate)).sizes(in_hw)
            except ValueError:  # the map got too small for this window
                continue
            if min(Graph((*layers, candidate)).out_size(in_hw)) < 3:
                continue
            layers.append(candidate)
        prev = layers[-1].name
    if not layers:
        layers.append(Layer("relu", rf.POINTWISE, (rf.INPUT,)))
    return Graph(tuple(layers))


class GraphNet(nn.Module):
    """A torch module computing a receptive Graph; ``linear`` swaps every window op for a positive
    depthwise conv of the same geometry (the brute-force stand-in: no cancellation, no max)."""

    def __init__(self, graph: Graph, channels: int = 2, linear: bool = False):
        super().__init__()
        self.graph = graph
        self.ops = nn.ModuleDict()
        for layer in graph:
            if layer.kind == rf.CONV or (linear and layer.kind in rf.WINDOW_KINDS):
                conv = nn.Conv2d(channels, channels, layer.kernel, layer.stride, layer.padding, layer.dilation,
                                 groups=channels if linear else 1, bias=not linear)
                if linear:
                    with torch.no_grad():
                        conv.weight.uniform_(0.5, 1.0)
                self.ops[layer.name] = conv
            elif layer.kind == rf.MAXPOOL:
                self.ops[layer.name] = nn.MaxPool2d(layer.kernel, layer.stride, layer.padding, layer.dilation)
            elif layer.kind == rf.AVGPOOL:
                self.ops[layer.name] = nn.AvgPool2d(layer.kernel, layer.stride, layer.padding)
            elif layer.kind == rf.POINTWISE:
                self.ops[layer.name] = nn.Identity() if linear else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.graph.input: x}
        for layer in self.graph:
            if layer.kind == rf.ADD:
                env[layer.name] = env[layer.inputs[0]] + env[layer.inputs[1]]
            else:
                env[layer.name] = self.ops[layer.name](env[layer.inputs[0]])
        return env[self.graph.output]


def influence(graph: Graph, in_hw: tuple[int, int]) -> torch.Tensor:
    """``[input pixel, out row, out col]``: True where the input pixel influences the output pixel."""
    net = GraphNet(graph, linear=True).double().eval()
    h, w = in_hw
    basis = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w).expand(h * w, 2, h, w)
    with torch.no_grad():
        return (net(basis.contiguous()) > 0).any(dim=1)


def bounding_box(mask: torch.Tensor) -> Region:
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    return Region.of(int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)


# -- halo arithmetic ------------------------------------------------------------------------------

def test_layer_window_formula_and_border_pads():
    conv = Layer("c", rf.CONV, ("input",), kernel=3, stride=2, padding=1, dilation=1)
    win = conv.window(Region.of(0, 3, 4, 6), (11, 11))
    # rows [0*2-1, 2*2-1+2+1) = [-1, 6) -> [0, 6); cols [4*2-1, 5*2-1+3) = [7, 12) -> [7, 11)
    assert win.region == Region.of(0, 6, 7, 11)
    assert (win.pads.top, win.pads.bottom, win.pads.left, win.pads.right) == (1, 0, 0, 1)
    last = conv.window(Region.of(5, 6, 5, 6), (11, 11))  # (5*2-1, 5*2+2) = [9, 12): one pad row below
    assert last.region == Region.of(9, 11, 9, 11) and last.pads.bottom == 1 and last.pads.right == 1
    dil = Layer("d", rf.CONV, ("input",), kernel=3, stride=1, padding=2, dilation=2)
    assert rf.input_span(Span(4, 6), 3, 1, 2, 2) == Span(2, 8)
    assert dil.out_size((9, 9)) == (9, 9)


def test_split_lengths_are_proportional_integers():
    assert rf.split_lengths(10, [1, 1]) == (5, 5)
    assert rf.split_lengths(7, [2, 1]) == (5, 2)
    assert sum(rf.split_lengths(13, [3, 1, 1, 0.5])) == 13
    assert rf.split_lengths(3, [100, 1, 1]) == (1, 1, 1)  # every worker keeps at least one row
    with pytest.raises(ValueError):
        rf.split_lengths(2, [1, 1, 1])


@pytest.mark.parametrize("seed", range(24))
def test_back_propagated_region_is_the_bounding_box_of_the_true_influence(seed):
    rng = random.Random(seed)
    in_hw = (rng.randint(15, 27), rng.randint(13, 23))
    graph = random_graph(rng, in_hw, depth=rng.randint(1, 6))
    infl = influence(graph, in_hw)  # [h*w, out_h, out_w]
    out_hw = graph.out_size(in_hw)
    assert tuple(infl.shape[1:]) == out_hw
    rows = min(out_hw[0], rng.randint(1, 4))
    cols = min(out_hw[1], rng.randint(1, 3))
    for tile in rf.grid(out_hw, rows, cols):
        regions = rf.back_propagate(graph, in_hw, tile)
        t = tile
        touched = infl[:, t.rows.start: t.rows.stop, t.cols.start: t.cols.stop].any(dim=(1, 2)).reshape(in_hw)
        box = bounding_box(touched)
        assert regions.input == box, (seed, tile, graph)  # contains every influencing pixel, and is tight
        outside = touched.clone()
        outside[box.rows.start: box.rows.stop, box.cols.start: box.cols.stop] = False
        assert not outside.any()


@pytest.mark.parametrize("seed", range(16))
def test_random_graphs_with_real_pools_tile_exactly(seed):
    rng = random.Random(100 + seed)
    in_hw = (rng.randint(31, 67), rng.randint(29, 53))
    graph = random_graph(rng, in_hw, depth=rng.randint(2, 7))
    torch.manual_seed(seed)
    net = GraphNet(graph, channels=3).eval()
    seg = TiledSegment.from_module(net, (1, 3, *in_hw))
    assert seg.out_size(in_hw) == graph.out_size(in_hw)
    x = torch.randn(1, 3, *in_hw)
    with torch.no_grad():
        ref = net(x)
    out_hw = graph.out_size(in_hw)
    for rows, cols in ((2, 1), (3, 1), (min(4, out_hw[0]), 1), (2, 2)):
        y = seg.run(x, rf.grid(out_hw, rows, cols))
        assert y.shape == ref.shape
        assert (y - ref).abs().max() <= TOL * ref.abs().max(), (seed, rows, cols)


# -- bundled models -------------------------------------------------------------------------------

@functools.cache
def sliced(name: str, h: int, w: int) -> SlicedModel:
    return SlicedModel(build_model(get_spec(name)), torch.zeros(1, 3, h, w), name)


def max_rel_diff(name: str, hw: tuple[int, int], a: str, b: str, tilings) -> float:
    s = sliced(name, *hw)
    seg = TiledSegment(s, a, b)
    torch.manual_seed(1)
    x = torch.randn(1, *s.split(a).out_shape[1:])
    with torch.no_grad():
        ref = s.segment(a, b)(x)
    in_hw = tuple(x.shape[-2:])
    out_hw = seg.out_size(in_hw)
    assert out_hw == tuple(ref.shape[-2:])
    worst = 0.0
    for rows, cols in tilings:
        tiles = rf.grid(out_hw, rows, cols)
        assert len(tiles) == rows * cols
        y = seg.run(x, tiles)
        worst = max(worst, float((y - ref).abs().max() / ref.abs().max()))
    return worst


TILINGS = ((2, 1), (3, 1), (4, 1), (2, 2))
CASES = [
    ("vgg16", (67, 53), "input", "features_16"),  # conv stages 1-3 (7 convs, 3 pools), from the raw input
    ("vgg16", (67, 53), "features_16", "features_23"),  # stage 4, starting mid-network
    ("resnet18", (131, 101), "input", "layer2_1_relu_1"),  # stem + layer1 + layer2 (downsampling residual)
    ("resnet18", (131, 101), "layer2_1_relu_1", "layer4_1_relu_1"),  # layer3 + layer4
    ("resnet50", (67, 53), "maxpool", "layer1_2_relu_2"),  # layer1: three bottlenecks
    ("resnet50", (67, 53), "layer1_2_relu_2", "layer2_1_relu_2"),  # layer2's strided bottleneck (1x1 downsample)
    ("mobilenet_v2", (131, 101), "input", "features_18_2"),  # all 17 inverted residuals (depthwise convs)
    ("densenet169", (67, 53), "features_pool0", "features_transition1_pool"),  # dense block: concat, avg pool
]


@pytest.mark.parametrize(("name", "hw", "a", "b"), CASES, ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in CASES])
def test_bundled_model_segments_tile_exactly(name, hw, a, b):
    worst = max_rel_diff(name, hw, a, b, TILINGS)
    print(f"{name} {a}->{b} at {hw}: max |tiled - full| / max |full| = {worst:.2e}")
    assert worst <= TOL


def test_segment_geometry_follows_the_residual_edges():
    s = sliced("resnet18", 67, 53)
    g = segment_geometry(s, "maxpool", "layer1_0_relu_1")
    assert g.input == "maxpool"
    add = next(layer for layer in g if layer.kind == rf.ADD)
    assert set(add.inputs) == {"layer1_0_bn2", "maxpool"}  # the skip reads the block input
    assert g.out_size((17, 14)) == (17, 14)
    down = segment_geometry(s, "layer1_1_relu_1", "layer2_0_relu_1")
    ds = next(layer for layer in down if layer.name == "layer2_0_downsample_0")
    assert (ds.kind, ds.kernel, ds.stride, ds.padding) == (rf.CONV, (1, 1), (2, 2), (0, 0))
    assert down.out_size((17, 14)) == (9, 7)


@pytest.mark.parametrize(("name", "a", "b", "culprit"), [
    ("resnet18", "layer4_1_relu_1", "avgpool", "avgpool"),
    ("resnet18", "input", "output", "avgpool"),
    ("vgg16", "features_30", "flatten", "avgpool"),
    ("mobilenet_v2", "avgpool", "flatten", "flatten"),
])
def test_untileable_segments_are_refused(name, a, b, culprit):
    with pytest.raises(InvalidInput, match=culprit):
        segment_geometry(sliced(name, 67, 53), a, b)
    with pytest.raises(InvalidInput):
        TiledSegment(sliced(name, 67, 53), a, b)


def test_run_tile_is_what_a_worker_does_with_its_crop():
    s = sliced("resnet18", 67, 53)
    seg = TiledSegment(s, "input", "layer1_1_relu_1")
    x = torch.randn(1, 3, 67, 53)
    with torch.no_grad():
        ref = s.segment("input", "layer1_1_relu_1")(x)
    out_hw = seg.out_size((67, 53))
    parts = []
    for reg in seg.regions((67, 53), rf.grid(out_hw, [2, 1])):  # unequal shares
        assert reg.input.rows.size < 67  # a worker receives its band plus the halo, not the image
        crop = x[..., reg.input.rows.start: reg.input.rows.stop, :].clone()
        parts.append((reg.output, seg.run_tile(crop, reg)))
    assert parts[0][0].rows.size > parts[1][0].rows.size
    y = stitch(parts, out_hw)
    assert (y - ref).abs().max() <= TOL * ref.abs().max()
    with pytest.raises(InvalidInput):
        seg.run_tile(x, seg.regions((67, 53), rf.grid(out_hw, 2))[0])  # the whole image is not its crop
    with pytest.raises(InvalidInput, match="empty"):
        stitch(parts[:1], out_hw)  # part of the map is missing
    with pytest.raises(InvalidInput, match="overlaps"):
        stitch([*parts, parts[0]], out_hw)
    with pytest.raises(InvalidInput):
        seg.regions((67, 53), [Region.of(40, 50, 0, 5)])  # off the 17 x 14 output


@pytest.mark.parametrize("module", [
    nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2, ceil_mode=True)),
    nn.Sequential(nn.Conv2d(3, 4, 3, padding="same")),
    nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")),
    nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1)),
    nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 15 * 13, 2)),
], ids=["ceil-mode", "same-padding", "reflect-padding", "global-pool", "flatten-linear"])
def test_layers_that_cannot_be_tiled_exactly_are_refused(module):
    with pytest.raises(InvalidInput, match="cannot be tiled"):
        TiledSegment.from_module(module.eval(), (1, 3, 17, 15))
