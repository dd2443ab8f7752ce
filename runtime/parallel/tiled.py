"""Fused-block tiled execution: run a model segment tile by tile and stitch the output.

Approach: layer by layer, with per-layer crops. For each tile, :func:`receptive.back_propagate`
gives every layer the region of its output the tile needs and the window of its input it reads.
Each layer then runs on exactly that window: its input tensor (which covers at least the window,
because a producer computes the union of what its consumers read) is cropped to the window, padded
explicitly by the window's pads (zeros for convolutions and average pools, ``-inf`` for max pools,
as torch pads them), and the op runs with ``padding=0``.

Why not pad the block input once and run the block's layers unchanged on the crop? Because a fused
block's inner layers pad *their own* inputs with zeros at the true border: a tile at the border,
run on a crop padded only at the block input, would compute inner feature-map pixels outside the
real map (bias, batch norm and activations make them non-zero) where the full computation sees
zero padding. With per-layer crops every computed pixel sees exactly the inputs (real values or
true padding) it sees in the full computation, so the tiled result is exact up to the order of
floating-point accumulation inside the convolution kernels (which may differ with the input size:
a stated tolerance, see the tests, rather than bit-identity).

The geometry comes from :attr:`SlicedModel.layers` (kind, kernel, stride, padding, dilation) and the
edges from the traced graph; a segment that cannot be tiled (a global pool, flatten, linear layer,
or anything else whose output pixel does not depend on a bounded input window) is refused with
:class:`InvalidInput`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from runtime.contracts.errors import EdgesplitError, InvalidInput
from runtime.models.slicing import LayerInfo, SlicedModel
from runtime.parallel import receptive as rf
from runtime.parallel.receptive import Graph, Layer, Region, TileRegions

# Module classes / function names that keep the geometry, pixel by pixel (in eval mode).
POINTWISE_MODULES = frozenset({
    "BatchNorm2d", "ReLU", "ReLU6", "Identity", "Dropout", "Dropout2d", "SiLU", "Hardswish", "Hardsigmoid",
    "Sigmoid", "Tanh", "GELU", "LeakyReLU", "ELU", "Mish",
})
POINTWISE_FUNCTIONS = frozenset({"relu", "relu6", "silu", "sigmoid", "tanh", "hardswish", "gelu", "dropout"})
ADD_FUNCTIONS = frozenset({"add", "iadd"})
WINDOW_MODULES = {"Conv2d": rf.CONV, "MaxPool2d": rf.MAXPOOL, "AvgPool2d": rf.AVGPOOL}
NO_TILING_HINT = ("a tiled segment may hold only conv, max/avg pool, batch norm, activations and residual add or "
                  "channel concat; end the segment before global pooling, flatten and linear layers")


def _refuse(node: fx.Node, kind: str, why: str = "") -> InvalidInput:
    return InvalidInput(f"layer {node.name} ({kind}) cannot be tiled spatially{': ' + why if why else ''}; "
                        + NO_TILING_HINT)


def _check_window_module(node: fx.Node, mod: nn.Module, info: LayerInfo) -> None:
    if getattr(mod, "ceil_mode", False):
        raise _refuse(node, info.kind, "ceil_mode pools are not supported")
    if isinstance(mod, nn.Conv2d) and (mod.padding_mode != "zeros" or isinstance(mod.padding, str)):
        raise _refuse(node, info.kind, "only explicit zero padding is supported")
    if isinstance(mod, nn.AvgPool2d) and not mod.count_include_pad and info.padding not in (None, (0, 0)):
        raise _refuse(node, info.kind, "count_include_pad=False with padding is not supported")


def _channels(shape: tuple[int, ...] | None) -> int:
    return int(shape[1]) if shape and len(shape) == 4 else 1


def _layer(sliced: SlicedModel, node: fx.Node, info: LayerInfo, shapes: dict[str, tuple[int, ...] | None]) -> Layer:
    """The receptive geometry of one traced node, or InvalidInput if it is not tileable."""
    inputs = tuple(a.name for a in node.all_input_nodes if a.op != "get_attr")
    if info.out_shape is None or len(info.out_shape) != 4:
        raise _refuse(node, info.kind, f"its output {info.out_shape} is not an N x C x H x W feature map")
    out_c = _channels(info.out_shape)
    if node.op == "call_module" and info.kind in WINDOW_MODULES:
        mod = sliced.graph_module.get_submodule(str(node.target))
        _check_window_module(node, mod, info)
        k = rf.pair(info.kernel or 1, f"{node.name} kernel")
        s, p, d = (rf.pair(v, f"{node.name} geometry") for v in (info.stride or k, info.padding or 0, info.dilation or 1))
        in_c = _channels(shapes.get(inputs[0])) if inputs else 1
        cost = k[0] * k[1] * (in_c // (info.groups or 1)) * out_c if info.kind == "Conv2d" else k[0] * k[1] * out_c
        return Layer(node.name, WINDOW_MODULES[info.kind], inputs, k, s, p, d, float(cost))
    if (node.op == "call_module" and info.kind in POINTWISE_MODULES) or (
            node.op == "call_function" and info.kind in POINTWISE_FUNCTIONS):
        return Layer(node.name, rf.POINTWISE, inputs, cost=float(out_c))
    if node.op == "call_function" and info.kind in ADD_FUNCTIONS:
        return Layer(node.name, rf.ADD, inputs, cost=float(out_c))
    if node.op == "call_function" and info.kind == "cat":
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if dim not in (1, -3):
            raise _refuse(node, info.kind, f"only a concat along channels (dim 1) keeps the geometry, not dim {dim}")
        return Layer(node.name, rf.CONCAT, inputs, cost=float(out_c))
    raise _refuse(node, info.kind)


def tileable_end(sliced: SlicedModel, first: int, last: int | None = None) -> int:
    """The last split index ``e >= first + 1`` (at most ``last``) such that every block first..e can be
    tiled; InvalidInput when block ``first`` cannot (global pool, flatten or linear layer)."""
    end = first
    stop = len(sliced.split_points) - 1 if last is None else last
    while end < stop:
        try:
            segment_geometry(sliced, end, end + 1)
        except EdgesplitError:
            break
        end += 1
    if end == first:
        raise InvalidInput(f"block {first} of {sliced.name} cannot be tiled (global pool, flatten or linear layer)")
    return end


def segment_geometry(sliced: SlicedModel, a: str | int, b: str | int) -> Graph:
    """The receptive geometry of the segment between split points ``a`` and ``b`` of ``sliced``.

    Geometry from :attr:`SlicedModel.layers`, edges from the traced graph. The block input is
    named after the node whose tensor crosses at ``a``. Raises InvalidInput for a segment that
    cannot be tiled (global pool, flatten, linear ...)."""
    start, stop = sliced.span(a, b)
    infos = {info.name: info for info in sliced.layers}
    crossing = sliced.nodes[start - 1]
    meta = crossing.meta.get("tensor_meta")
    shapes: dict[str, tuple[int, ...] | None] = {crossing.name: tuple(meta.shape) if meta is not None else None}
    if shapes[crossing.name] is None or len(shapes[crossing.name] or ()) != 4:
        raise InvalidInput(f"segment input {crossing.name} is not an N x C x H x W feature map; {NO_TILING_HINT}")
    layers = []
    for node in sliced.nodes[start: stop + 1]:
        if node.op == "get_attr":
            continue
        info = infos[node.name]
        layers.append(_layer(sliced, node, info, shapes))
        shapes[node.name] = info.out_shape
    return Graph(tuple(layers), input=crossing.name)


@dataclass(frozen=True)
class _Step:
    layer: Layer
    node: fx.Node
    run: Callable[..., torch.Tensor]  # window ops: (padded crop) -> out; others: node semantics
    pad_value: float = 0.0


def _window_op(mod: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """The op with its padding removed (the caller pads), and the value torch pads it with."""
    if isinstance(mod, nn.Conv2d):
        return (lambda x: F.conv2d(x, mod.weight, mod.bias, mod.stride, 0, mod.dilation, mod.groups)), 0.0
    if isinstance(mod, nn.MaxPool2d):
        return (lambda x: F.max_pool2d(x, mod.kernel_size, mod.stride, 0, mod.dilation)), -math.inf
    if isinstance(mod, nn.AvgPool2d):
        return (lambda x: F.avg_pool2d(x, mod.kernel_size, mod.stride, 0, False, True, mod.divisor_override)), 0.0
    raise InvalidInput(f"{type(mod).__name__} is not a window op")  # unreachable after segment_geometry


def _crop(t: torch.Tensor, have: Region, want: Region) -> torch.Tensor:
    if not have.contains(want):  # cannot happen: a producer computes the union its consumers read
        raise RuntimeError(f"tile bookkeeping: region {want} is not inside the computed {have}")
    r0, c0 = want.rows.start - have.rows.start, want.cols.start - have.cols.start
    return t[..., r0: r0 + want.rows.size, c0: c0 + want.cols.size]


class TiledSegment:
    """A segment of a traced model (conv/pool/BN/activation/residual add) run tile by tile.

    ``run_tile`` is what one worker does with its crop; ``run`` crops, runs every tile and stitches
    (the single-process reference of the distributed execution)."""

    def __init__(self, sliced: SlicedModel, a: str | int, b: str | int):
        self.geometry = segment_geometry(sliced, a, b)
        start, stop = sliced.span(a, b)
        gm = sliced.graph_module
        steps = []
        for node, layer in zip((n for n in sliced.nodes[start: stop + 1] if n.op != "get_attr"), self.geometry, strict=True):
            if layer.kind in rf.WINDOW_KINDS:
                op, value = _window_op(gm.get_submodule(str(node.target)))
                steps.append(_Step(layer, node, op, value))
            elif node.op == "call_module":
                steps.append(_Step(layer, node, gm.get_submodule(str(node.target))))
            else:
                # call_function (segment_geometry admits no call_method): fx's Target is the function
                steps.append(_Step(layer, node, cast(Callable[..., torch.Tensor], node.target)))
        self._steps = tuple(steps)
        self._gm = gm

    @classmethod
    def from_module(cls, module: nn.Module, input_shape: Sequence[int]) -> TiledSegment:
        """A whole module (e.g. an ``nn.Sequential`` of conv layers) as one segment."""
        sliced = SlicedModel(module, torch.zeros(tuple(input_shape)), name=type(module).__name__)
        return cls(sliced, 0, len(sliced.split_points) - 1)

    def regions(self, in_hw: tuple[int, int], tiles: Sequence[Region]) -> tuple[TileRegions, ...]:
        """Per tile: the input crop it reads and what each layer computes (see ``receptive``)."""
        try:
            return rf.tile_regions(self.geometry, in_hw, tiles)
        except ValueError as e:  # an input too small for the segment, a tile off the map ...
            raise InvalidInput(f"cannot tile this segment for input {in_hw}: {e}") from None

    def out_size(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        return self.geometry.out_size(in_hw)

    def _fetch(self, env: dict[str, tuple[torch.Tensor, Region]], want: Region, clone: bool) -> Callable[[Any], Any]:
        def fetch(arg: Any) -> Any:
            if not isinstance(arg, fx.Node):
                return arg
            if arg.op == "get_attr":
                return operator.attrgetter(str(arg.target))(self._gm)
            t = _crop(*env[arg.name], want)
            return t.clone() if clone else t
        return fetch

    @torch.no_grad()
    def run_tile(self, x_crop: torch.Tensor, regions: TileRegions) -> torch.Tensor:
        """One tile's output from the crop of the block input at ``regions.input`` (halo included)."""
        if tuple(x_crop.shape[-2:]) != regions.input.shape:
            raise InvalidInput(f"tile input is {tuple(x_crop.shape[-2:])}, the tile reads {regions.input.shape}")
        env: dict[str, tuple[torch.Tensor, Region]] = {self.geometry.input: (x_crop, regions.input)}
        for step in self._steps:
            name = step.layer.name
            if name not in regions.needs:
                continue
            win = regions.windows[name]
            if step.layer.kind in rf.WINDOW_KINDS:
                x = _crop(*env[step.layer.inputs[0]], win.region)
                if win.pads.any:
                    x = F.pad(x, win.pads.as_pad(), value=step.pad_value)
                y = step.run(x)
            else:
                mod = self._gm.get_submodule(str(step.node.target)) if step.node.op == "call_module" else None
                inplace = bool(getattr(mod, "inplace", False) or step.node.kwargs.get("inplace", False)
                               or step.layer.name.startswith("iadd"))
                fetch = self._fetch(env, win.region, inplace)
                y = step.run(*fx.node.map_aggregate(step.node.args, fetch),
                             **fx.node.map_aggregate(dict(step.node.kwargs), fetch))
            if tuple(y.shape[-2:]) != regions.needs[name].shape:
                raise RuntimeError(f"layer {name}: computed {tuple(y.shape[-2:])}, expected {regions.needs[name].shape}")
            env[name] = (y, regions.needs[name])
        return env[self.geometry.output][0]

    def run(self, x: torch.Tensor, tiles: Sequence[Region]) -> torch.Tensor:
        """Crop the input for each tile, run the tiles, stitch the outputs into the full map."""
        in_hw = (int(x.shape[-2]), int(x.shape[-1]))
        parts = []
        for reg in self.regions(in_hw, tiles):
            crop = x[..., reg.input.rows.start: reg.input.rows.stop, reg.input.cols.start: reg.input.cols.stop]
            parts.append((reg.output, self.run_tile(crop, reg)))
        return stitch(parts, self.out_size(in_hw))


def stitch(parts: Sequence[tuple[Region, torch.Tensor]], out_hw: tuple[int, int]) -> torch.Tensor:
    """Place output tiles into the full map; the tiles must cover it exactly once."""
    if not parts:
        raise InvalidInput("nothing to stitch")
    first = parts[0][1]
    out = first.new_empty((*first.shape[:-2], *out_hw))
    covered = torch.zeros(out_hw, dtype=torch.bool)
    for region, t in parts:
        if tuple(t.shape[-2:]) != region.shape or not Region.full(*out_hw).contains(region):
            raise InvalidInput(f"tile {tuple(t.shape[-2:])} does not fit region {region} of {out_hw}")
        where = (slice(region.rows.start, region.rows.stop), slice(region.cols.start, region.cols.stop))
        if covered[where].any():
            raise InvalidInput(f"tile {region} overlaps another tile")
        covered[where] = True
        out[(..., *where)] = t
    if not covered.all():
        raise InvalidInput(f"the tiles leave {int((~covered).sum())} of {out_hw[0] * out_hw[1]} output pixels empty")
    return out
