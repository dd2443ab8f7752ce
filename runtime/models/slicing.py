"""Find valid split points of any traceable model and cut it into a head and a tail.

A split point is a position in the topologically ordered ``torch.fx`` graph at which exactly
one tensor crosses the cut (Scission's rule: no parallel branch is open there). Residual and
dense connections are handled by the same rule: inside a residual block the skip tensor is
live too, so no point inside the block qualifies. Nothing is listed per model.

Each layer's geometry (kind, kernel, stride, padding, dilation, output shape) is kept in
:attr:`SlicedModel.layers` for receptive-field segmentation.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from runtime.contracts.errors import InvalidInput, NotFound

logger = logging.getLogger(__name__)

INPUT = "input"
OUTPUT = "output"


@dataclass(frozen=True)
class LayerInfo:
    """One node of the traced graph with its geometry."""

    name: str  # fx node name (unique), e.g. "layer1_0_conv1"
    target: str  # module path ("layer1.0.conv1") or function name ("add")
    kind: str  # module class ("Conv2d") or function name ("cat")
    out_shape: tuple[int, ...] | None  # for the example input; None if not a tensor
    kernel: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None
    padding: tuple[int, ...] | None = None
    dilation: tuple[int, ...] | None = None
    groups: int | None = None


@dataclass(frozen=True)
class SplitPoint:
    """A valid cut. ``index`` counts from 0 ("input": everything on the edge) upwards."""

    index: int
    name: str  # the split id on the wire: node name, or "input" / "output"
    layer: str  # human-readable layer (module path or function)
    out_shape: tuple[int, ...]  # shape of the tensor that crosses, for the example input
    dtype: torch.dtype
    position: int  # position of the crossing node in the graph

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.out_shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()

    @property
    def fp32_bytes(self) -> int:
        n = 1
        for d in self.out_shape:
            n *= d
        return 4 * n


def _tuple(v: Any) -> tuple[int, ...] | None:
    if v is None:
        return None
    if isinstance(v, (tuple, list)):
        return tuple(int(x) if isinstance(x, int) else x for x in v)
    if isinstance(v, int):
        return (v, v)
    return (v,)


def _layer_info(gm: fx.GraphModule, node: fx.Node) -> LayerInfo:
    meta = node.meta.get("tensor_meta")
    shape = tuple(meta.shape) if isinstance(meta, TensorMetadata) else None
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return LayerInfo(
            name=node.name,
            target=str(node.target),
            kind=type(mod).__name__,
            out_shape=shape,
            kernel=_tuple(getattr(mod, "kernel_size", None)),
            stride=_tuple(getattr(mod, "stride", None)),
            padding=_tuple(getattr(mod, "padding", None)) if not isinstance(getattr(mod, "padding", None), str) else None,
            dilation=_tuple(getattr(mod, "dilation", None)),
            groups=getattr(mod, "groups", None),
        )
    if node.op == "call_function":
        fn = getattr(node.target, "__name__", str(node.target))
        return LayerInfo(name=node.name, target=fn, kind=fn, out_shape=shape)
    return LayerInfo(name=node.name, target=str(node.target), kind=node.op, out_shape=shape)


def _result_node(output: fx.Node) -> fx.Node | None:
    """The single tensor an output node returns; torch.export graphs wrap it in a 1-tuple."""
    arg = output.args[0]
    if isinstance(arg, (tuple, list)) and len(arg) == 1:
        arg = arg[0]
    return arg if isinstance(arg, fx.Node) else None


def _returned(output: fx.Node, model: str) -> fx.Node:
    """:func:`_result_node` of a model whose split points were found (so it returns a single tensor)."""
    result = _result_node(output)
    if result is None:
        raise InvalidInput(f"model {model!r} must return a single tensor")
    return result


def _after_cut(g: fx.Graph, env: dict[fx.Node, fx.Node], cut: str) -> Callable[[fx.Node], fx.Node]:
    """How the nodes after the cut ``cut`` find their inputs in ``g``: their copies in ``env`` (the crossing tensor's
    placeholder and the nodes copied so far). A parameter read (get_attr) from before the cut is copied on first
    use; any other node from before it crosses the cut, which a valid split point rules out (InvalidInput)."""

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op != "get_attr":  # cannot happen for a valid split point
                raise InvalidInput(f"split {cut!r} is not a valid cut: {n.name} crosses it")
            env[n] = g.node_copy(n)
        return env[n]

    return lookup


def eval_mode(module: torch.nn.Module) -> None:
    """eval() where allowed: a torch.export program's module refuses it (its mode was fixed when it
    was exported: export from a model in eval mode)."""
    with contextlib.suppress(NotImplementedError):
        module.eval()


class SlicedModel:
    """A traced model with its valid split points; builds head and tail modules on demand."""

    def __init__(self, model: torch.nn.Module, example_input: torch.Tensor, name: str = "model"):
        self.name = name
        try:
            gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
        except Exception as e:  # fx raises many kinds of errors on untraceable code
            raise InvalidInput(
                f"model {name!r} cannot be traced by torch.fx ({type(e).__name__}: {e}); "
                "remove Python control flow that depends on tensor values"
            ) from e
        eval_mode(gm)
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
        self.graph_module = gm
        self.nodes: list[fx.Node] = list(gm.graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise InvalidInput(f"model {name!r} must take exactly one input tensor, it takes {len(placeholders)}")
        self._input = placeholders[0]
        self.layers: list[LayerInfo] = [
            _layer_info(gm, n) for n in self.nodes if n.op in ("call_module", "call_function", "call_method")
        ]
        self.split_points: list[SplitPoint] = self._find_split_points(example_input)
        self._by_name = {sp.name: sp for sp in self.split_points}

    # -- split point discovery -------------------------------------------------------------

    def _find_split_points(self, example_input: torch.Tensor) -> list[SplitPoint]:
        pos = {n: i for i, n in enumerate(self.nodes)}
        # Constants (get_attr) are available on both sides and never "cross" the cut.
        last_use: dict[fx.Node, int] = {}
        for n in self.nodes:
            if n.op in ("get_attr", "output") or not n.users:
                continue
            last_use[n] = max(pos[u] for u in n.users)
        expiring: dict[int, list[fx.Node]] = {}
        for n, p in last_use.items():
            expiring.setdefault(p, []).append(n)

        points = [
            SplitPoint(0, INPUT, INPUT, tuple(example_input.shape), example_input.dtype, pos[self._input])
        ]
        live: set[fx.Node] = set()
        for i, n in enumerate(self.nodes):
            if n.op == "output":
                break
            for gone in expiring.get(i, ()):
                live.discard(gone)
            if n in last_use:
                live.add(n)
            if n.op in ("placeholder", "get_attr") or len(live) != 1:
                continue
            (crossing,) = live
            if crossing is not n:
                continue  # the cut after n equals the earlier cut after `crossing`
            meta = n.meta.get("tensor_meta")
            if not isinstance(meta, TensorMetadata):
                continue
            layer = str(n.target) if n.op == "call_module" else n.name
            points.append(SplitPoint(len(points), n.name, layer, tuple(meta.shape), meta.dtype, i))
        out = next(n for n in self.nodes if n.op == "output")
        result = _result_node(out)
        out_meta = result.meta.get("tensor_meta") if result is not None else None
        if result is None or not isinstance(out_meta, TensorMetadata):
            raise InvalidInput(f"model {self.name!r} must return a single tensor")
        # "output": everything runs on the device; what crosses is the model output.
        last = SplitPoint(len(points), OUTPUT, OUTPUT, tuple(out_meta.shape), out_meta.dtype, pos[out])
        if points[-1].position == pos[result]:
            points[-1] = SplitPoint(points[-1].index, OUTPUT, OUTPUT, last.out_shape, last.dtype, last.position)
        else:
            points.append(last)
        return points

    # -- lookup ----------------------------------------------------------------------------

    def split(self, key: str | int) -> SplitPoint:
        """A split point by index (int or digit string) or by name."""
        if isinstance(key, int) or (isinstance(key, str) and key.lstrip("-").isdigit()):
            i = int(key)
            if 0 <= i < len(self.split_points):
                return self.split_points[i]
        elif key in self._by_name:
            return self._by_name[key]
        raise NotFound(
            f"model {self.name!r} has no split point {key!r}; valid are 0..{len(self.split_points) - 1} "
            f"(run 'edgesplit models {self.name}' for the list)"
        )

    # -- cutting ---------------------------------------------------------------------------

    def _crossing_node(self, sp: SplitPoint) -> fx.Node:
        if sp.name == INPUT:
            return self._input
        node = self.nodes[sp.position]
        return _returned(node, self.name) if node.op == "output" else node

    def head(self, key: str | int) -> fx.GraphModule:
        """Module from the model input to the tensor at the split point."""
        sp = self.split(key)
        crossing = self._crossing_node(sp)
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        stop = self.nodes.index(crossing)
        for n in self.nodes[: stop + 1]:
            env[n] = g.node_copy(n, lambda a: env[a])
        g.output(env[crossing])
        return self._module(g)

    def tail(self, key: str | int) -> fx.GraphModule:
        """Module from the tensor at the split point to the model output."""
        sp = self.split(key)
        crossing = self._crossing_node(sp)
        start = self.nodes.index(crossing) + 1
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {crossing: g.placeholder("x")}
        lookup = _after_cut(g, env, sp.name)
        for n in self.nodes[start:]:
            if n.op == "output":
                g.output(lookup(_returned(n, self.name)))
                break
            env[n] = g.node_copy(n, lookup)
        return self._module(g)

    def span(self, a: str | int, b: str | int) -> tuple[int, int]:
        """Graph positions (in :attr:`nodes`) of the first node after the cut at ``a`` and of the
        node whose tensor crosses at ``b``: the nodes :meth:`segment` may run lie between them."""
        sa, sb = self.split(a), self.split(b)
        if sa.index >= sb.index:
            raise InvalidInput(f"a segment runs from an earlier split point to a later one; got "
                               f"{sa.index} ({sa.name}) -> {sb.index} ({sb.name})")
        return self.nodes.index(self._crossing_node(sa)) + 1, self.nodes.index(self._crossing_node(sb))

    def segment(self, a: str | int, b: str | int) -> fx.GraphModule:
        """Module from the tensor at split point ``a`` to the tensor at split point ``b`` (``a < b``).

        ``segment(0, k)`` computes what ``head(k)`` does and ``segment(k, last)`` what ``tail(k)``
        does; chaining segments over increasing split points gives the full model.
        """
        start, stop = self.span(a, b)
        crossing = self.nodes[start - 1]
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {crossing: g.placeholder("x")}
        lookup = _after_cut(g, env, self.split(a).name)
        for n in self.nodes[start: stop + 1]:
            env[n] = g.node_copy(n, lookup)
        g.output(env[self.nodes[stop]])
        return self._module(g)

    def _module(self, graph: fx.Graph) -> fx.GraphModule:
        gm = fx.GraphModule(self.graph_module, graph)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        eval_mode(gm)
        return gm

    def table(self) -> list[dict[str, Any]]:
        """Split points as rows for display (index, name, layer, shape, fp32 bytes)."""
        return [
            {
                "index": sp.index,
                "name": sp.name,
                "layer": sp.layer,
                "out_shape": list(sp.out_shape),
                "fp32_bytes": sp.fp32_bytes,
            }
            for sp in self.split_points
        ]


def slice_model(model: torch.nn.Module, input_shape: Sequence[int], name: str = "model") -> SlicedModel:
    """Trace ``model`` on a zero input of ``input_shape`` (with batch dim) and find its split points."""
    return SlicedModel(model, torch.zeros(tuple(input_shape)), name=name)
