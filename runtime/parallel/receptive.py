"""Receptive-field segmentation: which input region each output tile of a fused block needs.

For one layer with kernel ``k``, stride ``s``, padding ``p`` and dilation ``d`` (per axis), output
rows ``[a, b)`` read input rows::

    [a*s - p,  (b-1)*s - p + d*(k-1) + 1)

That window is clipped to the real input (and, for a dilated window hanging over the border, past
the real rows its taps skip: :func:`read_span`); what is cut away lies in the layer's own padding
(at the true image border only) or is never read, and is recorded as :class:`Pads`, so a tile
computed on the cropped input, padded explicitly by those amounts, reproduces the full computation.

A fused block is a :class:`Graph`: layers in topological order, each reading one or more earlier
layers (or the block input), the last one being the block output. Layers that keep the geometry
(batch norm, activations, the add of a residual block, a channel concat) are windows with
``k = s = 1, p = 0``. Walking the graph backwards, the region a layer must compute is the bounding
box of the union of what its consumers read (for a residual block: the union over its branches),
and the block input region is the union over the layers that read it.

Pure Python (no torch): the planner uses it to cost tiles with their halos.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

INPUT = "input"

CONV, MAXPOOL, AVGPOOL, POINTWISE, ADD, CONCAT = "conv", "maxpool", "avgpool", "pointwise", "add", "concat"
WINDOW_KINDS = (CONV, MAXPOOL, AVGPOOL)  # layers with a kernel; one input each
MERGE_KINDS = (ADD, CONCAT)  # several inputs of the same spatial size
KINDS = (*WINDOW_KINDS, POINTWISE, *MERGE_KINDS)


@dataclass(frozen=True)
class Span:
    """Half-open interval ``[start, stop)`` of rows or columns."""

    start: int
    stop: int

    def __post_init__(self) -> None:
        if self.stop < self.start:
            raise ValueError(f"span [{self.start}, {self.stop}) ends before it starts")

    @property
    def size(self) -> int:
        return self.stop - self.start

    def union(self, other: Span) -> Span:
        """The smallest span holding both."""
        return Span(min(self.start, other.start), max(self.stop, other.stop))

    def clip(self, n: int) -> Span:
        """The part inside ``[0, n)`` (empty spans collapse onto the nearer edge)."""
        start = min(max(self.start, 0), n)
        return Span(start, max(start, min(self.stop, n)))

    def contains(self, other: Span) -> bool:
        return self.start <= other.start and other.stop <= self.stop


@dataclass(frozen=True)
class Region:
    """A rectangle of a feature map: rows x columns."""

    rows: Span
    cols: Span

    @classmethod
    def full(cls, h: int, w: int) -> Region:
        return cls(Span(0, h), Span(0, w))

    @classmethod
    def of(cls, r0: int, r1: int, c0: int, c1: int) -> Region:
        return cls(Span(r0, r1), Span(c0, c1))

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.size, self.cols.size

    @property
    def area(self) -> int:
        return self.rows.size * self.cols.size

    def union(self, other: Region) -> Region:
        return Region(self.rows.union(other.rows), self.cols.union(other.cols))

    def clip(self, h: int, w: int) -> Region:
        return Region(self.rows.clip(h), self.cols.clip(w))

    def contains(self, other: Region) -> bool:
        return self.rows.contains(other.rows) and self.cols.contains(other.cols)


@dataclass(frozen=True)
class Pads:
    """Padding a cropped window needs on each side: the layer's own padding at the true image border
    (plus, with dilation, border rows no tap reads). Fill with the value the layer pads with."""

    top: int = 0
    bottom: int = 0
    left: int = 0
    right: int = 0

    def as_pad(self) -> tuple[int, int, int, int]:
        """In ``torch.nn.functional.pad`` order: (left, right, top, bottom)."""
        return self.left, self.right, self.top, self.bottom

    @property
    def any(self) -> bool:
        return bool(self.top or self.bottom or self.left or self.right)


@dataclass(frozen=True)
class Window:
    """What a layer reads for one output region: the region inside its real input, and the pads."""

    region: Region
    pads: Pads


def out_length(n: int, k: int, s: int, p: int, d: int) -> int:
    """Output length of a window op along one axis (floor mode, as torch's default)."""
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def input_span(out: Span, k: int, s: int, p: int, d: int) -> Span:
    """Input rows (unclipped, padding coordinates may be negative or past the end) that output
    rows ``out`` read: ``[a*s - p, (b-1)*s - p + d*(k-1) + 1)``."""
    if out.size == 0:
        raise ValueError("an empty output span reads nothing")
    return Span(out.start * s - p, (out.stop - 1) * s - p + d * (k - 1) + 1)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def read_span(out: Span, k: int, s: int, p: int, d: int, n: int) -> Span:
    """The real input rows (inside ``[0, n)``) that output rows ``out`` read: :func:`input_span`
    clipped, and tightened past dilation gaps at the border (a dilated window hanging over the
    edge may skip the first or last real rows; those are then never read and need not be sent).
    The rows between this span and :func:`input_span` are padding or unread, so filling them with
    the pad value reproduces the full computation."""
    full = input_span(out, k, s, p, d)
    lo, hi = full.start, full.stop - 1
    if lo < 0:
        lo = n
        for o in range(out.start, out.stop):  # windows starting in the padding, then the first inside
            t = o * s - p
            tap = t if t >= 0 else t + _ceil_div(-t, d) * d
            if tap <= t + d * (k - 1):
                lo = min(lo, tap)
            if t >= 0:
                break
    if hi > n - 1:
        hi = -1
        for o in range(out.stop - 1, out.start - 1, -1):  # windows ending past the input, then the last inside
            e = o * s - p + d * (k - 1)
            tap = e if e <= n - 1 else e - _ceil_div(e - n + 1, d) * d
            if tap >= o * s - p:
                hi = max(hi, tap)
            if e <= n - 1:
                break
    if lo > hi or lo >= n or hi < 0:
        raise ValueError(f"output rows [{out.start}, {out.stop}) read only padding (k={k}, s={s}, p={p}, d={d})")
    return Span(lo, hi + 1)


def pair(v: Sequence[int] | int, what: str) -> tuple[int, int]:
    t = (int(v), int(v)) if isinstance(v, int) else tuple(int(x) for x in v)
    if len(t) != 2:
        raise ValueError(f"{what} needs 2 values (rows, columns), got {v!r}")
    return t[0], t[1]


@dataclass(frozen=True)
class Layer:
    """One layer's spatial geometry. ``cost`` weighs its compute per output pixel (e.g. MACs)."""

    name: str
    kind: str
    inputs: tuple[str, ...] = ()
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    cost: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"layer {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        for what in ("kernel", "stride", "padding", "dilation"):
            object.__setattr__(self, what, pair(getattr(self, what), f"layer {self.name!r} {what}"))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        if min(*self.kernel, *self.stride, *self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f"layer {self.name!r}: kernel, stride, dilation must be >= 1 and padding >= 0")
        if self.kind not in WINDOW_KINDS and (self.kernel, self.stride, self.padding) != ((1, 1), (1, 1), (0, 0)):
            raise ValueError(f"layer {self.name!r}: a {self.kind} layer keeps the geometry (k=1, s=1, p=0)")
        if self.kind in WINDOW_KINDS and len(self.inputs) > 1:
            raise ValueError(f"layer {self.name!r}: a {self.kind} layer reads one input")

    def out_size(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        return (out_length(in_hw[0], self.kernel[0], self.stride[0], self.padding[0], self.dilation[0]),
                out_length(in_hw[1], self.kernel[1], self.stride[1], self.padding[1], self.dilation[1]))

    def window(self, out: Region, in_hw: tuple[int, int]) -> Window:
        """The input window output region ``out`` reads, clipped to ``in_hw``, with the pads."""
        rows = input_span(out.rows, self.kernel[0], self.stride[0], self.padding[0], self.dilation[0])
        cols = input_span(out.cols, self.kernel[1], self.stride[1], self.padding[1], self.dilation[1])
        region = Region(read_span(out.rows, self.kernel[0], self.stride[0], self.padding[0], self.dilation[0], in_hw[0]),
                        read_span(out.cols, self.kernel[1], self.stride[1], self.padding[1], self.dilation[1], in_hw[1]))
        pads = Pads(region.rows.start - rows.start, rows.stop - region.rows.stop,
                    region.cols.start - cols.start, cols.stop - region.cols.stop)
        return Window(region, pads)


@dataclass(frozen=True)
class Graph:
    """A fused block: layers in topological order; the last one is the block output."""

    layers: tuple[Layer, ...]
    input: str = INPUT

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ValueError("a block needs at least one layer")
        seen = {self.input}
        for layer in self.layers:
            if layer.name in seen:
                raise ValueError(f"layer name {layer.name!r} repeats (or is the block input)")
            missing = [i for i in layer.inputs if i not in seen]
            if missing or not layer.inputs:
                raise ValueError(f"layer {layer.name!r} reads {missing or 'nothing'}: inputs must be earlier layers "
                                 f"or the block input {self.input!r}")
            seen.add(layer.name)

    @classmethod
    def chain(cls, layers: Sequence[Layer], input: str = INPUT) -> Graph:
        """A plain chain: each layer without inputs reads the one before it."""
        out, prev = [], input
        for layer in layers:
            if not layer.inputs:
                layer = Layer(layer.name, layer.kind, (prev,), layer.kernel, layer.stride, layer.padding,
                              layer.dilation, layer.cost)
            out.append(layer)
            prev = layer.name
        return cls(tuple(out), input)

    @property
    def output(self) -> str:
        return self.layers[-1].name

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def sizes(self, in_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """Spatial size of every layer's output (and of the block input) for an input of ``in_hw``."""
        sizes = {self.input: (int(in_hw[0]), int(in_hw[1]))}
        for layer in self.layers:
            ins = {sizes[i] for i in layer.inputs}
            if len(ins) != 1:
                raise ValueError(f"layer {layer.name!r} merges inputs of different sizes {sorted(ins)}")
            hw = layer.out_size(next(iter(ins)))
            if min(hw) < 1:
                raise ValueError(f"layer {layer.name!r}: input {next(iter(ins))} is too small (output {hw})")
            sizes[layer.name] = hw
        return sizes

    def out_size(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        return self.sizes(in_hw)[self.output]


@dataclass(frozen=True)
class TileRegions:
    """Everything one tile of a block needs, in the coordinates of each layer's own feature map."""

    output: Region  # the tile, at the block output
    input: Region  # the block input region the tile reads (halo included, clipped to the input)
    needs: Mapping[str, Region]  # per layer: the region of its output the tile computes
    windows: Mapping[str, Window]  # per layer: what it reads from its input(s), with the border pads
    sizes: Mapping[str, tuple[int, int]]  # full spatial size of every feature map


def back_propagate(graph: Graph, in_hw: tuple[int, int], out: Region) -> TileRegions:
    """The regions output tile ``out`` needs through ``graph`` for a block input of ``in_hw``."""
    sizes = graph.sizes(in_hw)
    tile = out.clip(*sizes[graph.output])
    if tile.area == 0:
        raise ValueError(f"tile {out} lies outside the block output {sizes[graph.output]}")
    needs: dict[str, Region] = {graph.output: tile}
    windows: dict[str, Window] = {}
    for layer in reversed(graph.layers):
        if layer.name not in needs:
            continue  # not on a path to the block output
        win = layer.window(needs[layer.name], sizes[layer.inputs[0]])
        windows[layer.name] = win
        for src in layer.inputs:
            needs[src] = needs[src].union(win.region) if src in needs else win.region
    return TileRegions(output=tile, input=needs.pop(graph.input), needs=needs, windows=windows, sizes=sizes)


def split_lengths(total: int, weights: Sequence[float]) -> tuple[int, ...]:
    """Integer lengths summing to ``total``, proportional to ``weights`` (largest remainder), each >= 1."""
    n = len(weights)
    if n < 1 or total < n:
        raise ValueError(f"cannot split {total} rows into {n} non-empty parts")
    if min(weights) <= 0:
        raise ValueError(f"weights must be positive, got {list(weights)}")
    ideal = [total * w / sum(weights) for w in weights]
    lengths = [int(x) for x in ideal]
    by_remainder = sorted(range(n), key=lambda i: (-(ideal[i] - lengths[i]), i))
    for i in by_remainder[: total - sum(lengths)]:
        lengths[i] += 1
    for i in range(n):  # a part rounded down to nothing takes a row from the largest
        if lengths[i] == 0:
            lengths[max(range(n), key=lambda j: (lengths[j], -j))] -= 1
            lengths[i] = 1
    return tuple(lengths)


def split_spans(total: int, weights: Sequence[float] | int) -> tuple[Span, ...]:
    """Consecutive spans covering ``[0, total)``: ``weights`` equal parts, or parts by weight."""
    ws = [1.0] * weights if isinstance(weights, int) else list(weights)
    spans, at = [], 0
    for n in split_lengths(total, ws):
        spans.append(Span(at, at + n))
        at += n
    return tuple(spans)


def grid(out_hw: tuple[int, int], rows: Sequence[float] | int, cols: Sequence[float] | int = 1) -> tuple[Region, ...]:
    """Tiles of an ``out_hw`` map: row bands (``cols=1``) or a rows x cols grid, row-major."""
    return tuple(Region(r, c) for r in split_spans(out_hw[0], rows) for c in split_spans(out_hw[1], cols))


def partition(out_hw: tuple[int, int], weights: Sequence[float], cols: int = 1) -> tuple[Region, ...]:
    """One tile per weight, in order: full-width row bands by weight (``cols <= 1``), or a 2-D grid of
    ``cols`` tiles per row, the weights taken ``cols`` at a time: each row's height by the sum of its
    weights, each tile's width by its own weight (a guillotine cut, so unequal workers stay balanced).
    With tile areas as weights the same tiles come back. ValueError if the weights do not fill whole
    rows of ``cols`` or the map is too small."""
    ws = list(weights)
    if cols <= 1:
        return tuple(Region(r, Span(0, out_hw[1])) for r in split_spans(out_hw[0], ws))
    if len(ws) % cols:
        raise ValueError(f"{len(ws)} tiles do not fill rows of {cols}")
    groups = [ws[i: i + cols] for i in range(0, len(ws), cols)]
    rows = split_spans(out_hw[0], [sum(g) for g in groups])
    return tuple(Region(r, c) for r, g in zip(rows, groups, strict=True) for c in split_spans(out_hw[1], g))


def tile_regions(graph: Graph, in_hw: tuple[int, int], tiles: Sequence[Region]) -> tuple[TileRegions, ...]:
    return tuple(back_propagate(graph, in_hw, t) for t in tiles)


def compute_fraction(graph: Graph, regions: TileRegions) -> float:
    """Share of the untiled block's compute a tile does (halo recomputation included): each layer's
    computed area over its full area, weighted by the layer's ``cost``."""
    total = done = 0.0
    for layer in graph.layers:
        h, w = regions.sizes[layer.name]
        total += layer.cost
        need = regions.needs.get(layer.name)
        if need is not None:
            done += layer.cost * need.area / (h * w)
    return done / total if total else 0.0
