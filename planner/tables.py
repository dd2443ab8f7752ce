"""The search's arrays: a profile's transfers as a table, and the cost of each cut of one link.

A :class:`Table` is built once per profile object and kept in the caller's :class:`SearchCache`
(live re-planning reuses it while only the network changes); :func:`link_cost` turns two tables
and a link into per-cut vectors, with each cut's cheapest allowed transfer chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from operator import attrgetter

import numpy as np

from planner.cache import LRU
from runtime.contracts.costmodel import Constraints, Network
from runtime.contracts.profile import Profile, Transfer

TABLES = 256  # transfer tables a SearchCache keeps (one per profile object)
TRIANGLES = 4  # order masks a SearchCache keeps (one per grid size)
NUMERIC = frozenset({"bytes", "encode_seconds", "decode_seconds"})  # Transfer fields that are always numbers


@dataclass(frozen=True)
class Table:
    """A profile's transfers as arrays: row a = the tensor after a blocks, column = option slot."""

    names: tuple[str, ...]  # every row's transfer names, row after row, in slot order
    starts: np.ndarray  # row a's names are names[starts[a]:starts[a + 1]] (length n+2)
    options: list[tuple[Transfer, ...]]  # per row, the transfers in slot order
    nbytes: np.ndarray  # (n+1, K), inf where a row has fewer options
    encode: np.ndarray  # (n+1, K) encode seconds
    decode: np.ndarray  # (n+1, K) decode seconds
    fidelity: np.ndarray  # (n+1, K) fidelity of an option (a TL, or jpeg at the input), nan = not measured
    is_tl: np.ndarray  # (n+1, K) whether the option runs a Transfer Layer
    seconds: np.ndarray  # prefix sums of block times, length n+1
    params: np.ndarray  # prefix sums of param_bytes

    def row_names(self, a: int) -> tuple[str, ...]:
        return self.names[self.starts[a]:self.starts[a + 1]]


def prefix(p: Profile, attr: str = "seconds") -> np.ndarray:
    out = np.zeros(p.n_blocks + 1)
    np.cumsum(np.fromiter(map(attrgetter(attr), p.blocks), np.float64, p.n_blocks), out=out[1:])
    return out


def build_table(p: Profile) -> Table:
    """One pass per attribute over the flat list of transfers (a 600-block profile has ~2,400), scattered
    into the (row, slot) arrays: no per-row Python tuples of numbers."""
    n = p.n_blocks
    options = [p.transfers_after(a) for a in range(n + 1)]
    counts = np.fromiter(map(len, options), np.intp, n + 1)
    flat = [t for o in options for t in o]
    m, width = len(flat), int(counts.max())
    rows = np.repeat(np.arange(n + 1), counts)
    cols = np.arange(m) - np.repeat(np.cumsum(counts) - counts, counts)

    def cells(attr: str, fill: float, dtype: type = np.float64) -> np.ndarray:
        out: np.ndarray = np.full((n + 1, width), fill, dtype=dtype)
        values = map(attrgetter(attr), flat)  # None (fidelity not measured) -> nan, tl_id "" -> False
        out[rows, cols] = np.fromiter(values, dtype, m) if attr in NUMERIC else np.array(list(values), dtype=dtype)
        return out

    starts = np.zeros(n + 2, dtype=np.intp)
    np.cumsum(counts, out=starts[1:])
    return Table(tuple(map(attrgetter("name"), flat)), starts, options, cells("bytes", np.inf),
                 cells("encode_seconds", 0.0), cells("decode_seconds", 0.0), cells("fidelity", np.nan),
                 cells("tl_id", False, bool), prefix(p, "seconds"), prefix(p, "param_bytes"))


def _triangle(size: int) -> np.ndarray:
    tri = np.full((size, size), np.inf)  # 0 where a < b, inf elsewhere
    tri[np.triu_indices(size, 1)] = 0.0
    return tri


@dataclass
class SearchCache:
    """What searches may reuse: transfer tables per profile object and order masks per grid size.
    Owned by whoever runs the searches (the re-planner keeps one; a one-off search makes its own)."""

    # id(profile) -> (the profile, kept alive so that no other object has its id while held; its table)
    tables: LRU[int, tuple[Profile, Table]] = field(default_factory=lambda: LRU(TABLES))
    triangles: LRU[int, np.ndarray] = field(default_factory=lambda: LRU(TRIANGLES))  # size -> order mask

    def table(self, p: Profile) -> Table:
        hit = self.tables.get(id(p))
        if hit is not None:
            return hit[1]
        table = build_table(p)
        self.tables.put(id(p), (p, table))
        return table

    def triangle(self, size: int) -> np.ndarray:
        """(size, size): 0 where a < b, inf elsewhere."""
        tri = self.triangles.get(size)
        if tri is None:
            tri = _triangle(size)
            self.triangles.put(size, tri)
        return tri


@dataclass(frozen=True)
class LinkCost:
    """Per cut a in 0..n: the chosen transfer and its parts (inf where no transfer is allowed).

    ``choice``/``encode``/``xfer``/``decode`` are the per-cut cheapest allowed option; the ``*_all``
    matrices (n+1, K) hold every option slot (``xfer_all`` is inf where the option is not allowed)."""

    choice: np.ndarray  # index into options[a], -1 = none
    encode: np.ndarray  # encode seconds of the choice
    rtt: float  # the link's round trip
    xfer: np.ndarray  # transfer seconds of the choice
    decode: np.ndarray  # decode seconds of the choice
    ret: np.ndarray  # seconds to send the result back
    options: list[tuple[Transfer, ...]]  # the sender's transfers per cut
    enc_all: np.ndarray  # encode seconds per option slot
    xfer_all: np.ndarray  # transfer seconds per option slot, inf where not allowed
    dec_all: np.ndarray  # decode seconds per option slot

    @property
    def total(self) -> np.ndarray:
        total: np.ndarray = self.encode + self.rtt + self.xfer + self.decode + self.ret
        return total

    @property
    def multi(self) -> bool:
        """Some cut has more than one allowed transfer."""
        return bool((np.isfinite(self.xfer_all).sum(axis=1) > 1).any())

    @cached_property
    def floors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per cut, the least encode, transfer and decode over its allowed options (inf where none)."""
        ok = np.isfinite(self.xfer_all)
        return (np.where(ok, self.enc_all, np.inf).min(axis=1), self.xfer_all.min(axis=1),
                np.where(ok, self.dec_all, np.inf).min(axis=1))

    def columns(self, expand: bool) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """(encode, xfer, decode, slot per cut) vectors: the cheapest option only, or every option slot."""
        if not (expand and self.multi):
            return [(self.encode, self.xfer, self.decode, self.choice)]
        rows = self.xfer_all.shape[0]
        return [(self.enc_all[:, s], self.xfer_all[:, s], self.dec_all[:, s], np.full(rows, s))
                for s in range(self.xfer_all.shape[1]) if np.isfinite(self.xfer_all[:, s]).any()]


def receiver_decode(sender: Table, receiver: Table) -> np.ndarray:
    """The receiver's measured decode time per option; the sender's figure where it has none."""
    if sender.names == receiver.names and np.array_equal(sender.starts, receiver.starts):
        return receiver.decode
    dec = sender.decode.copy()
    rows = len(receiver.starts) - 1
    for a in range(len(sender.starts) - 1):
        theirs = dict(zip(receiver.row_names(a), receiver.decode[a], strict=False)) if a < rows else {}
        for i, name in enumerate(sender.row_names(a)):
            if name in theirs:
                dec[a, i] = theirs[name]
    return dec


@dataclass(frozen=True)
class LinkSpec:
    """One cut's link as the search sees it: who sends, who receives, and the caps that touch only it."""

    sender: Profile  # runs the blocks before the cut
    receiver: Profile  # runs the blocks after it
    src_tier: str  # the sender's tier name
    dst_tier: str  # the receiver's tier name
    result_bytes: int  # the model's output, returned over this link when include_return
    sender_cap: float | None = None  # time cap of a sender that runs blocks [0, a) (the device)
    receiver_cap: float | None = None  # time cap of a receiver that runs [a, n) (the last tier)


def link_cost(spec: LinkSpec, network: Network, constraints: Constraints, include_return: bool,
              cache: SearchCache) -> LinkCost:
    """Per cut, the cheapest transfer that passes the constraints involving this cut's transfer alone."""
    sender, receiver = spec.sender, spec.receiver
    n = sender.n_blocks
    link = network.link(sender.machine, receiver.machine, spec.src_tier, spec.dst_tier)
    bw = link.bandwidth_bytes_per_second
    st, rt = cache.table(sender), cache.table(receiver)
    dec = receiver_decode(st, rt)
    xfer = st.nbytes / bw
    allowed = np.isfinite(st.nbytes)
    cap = constraints.max_upload_bytes.get(spec.src_tier)
    if cap is not None:
        allowed &= st.nbytes <= cap
    if constraints.min_fidelity > 0:
        # a TL must have a measured fidelity (nan fails); a codec only if it has one (jpeg at the input)
        allowed &= (~st.is_tl & np.isnan(st.fidelity)) | (st.fidelity >= constraints.min_fidelity)
    if spec.sender_cap is not None:  # same arithmetic as grid.tier_seconds, so the grid agrees
        allowed &= st.seconds[:, None] + st.encode <= spec.sender_cap
    if spec.receiver_cap is not None:
        allowed &= (rt.seconds[n] - rt.seconds)[:, None] + dec <= spec.receiver_cap
    xfer = np.where(allowed, xfer, np.inf)
    cost = st.encode + xfer + dec
    choice = np.argmin(cost, axis=1)
    rows = np.arange(n + 1)
    none = ~np.isfinite(cost[rows, choice])

    def pick(m: np.ndarray) -> np.ndarray:
        return np.where(none, np.inf, m[rows, choice])

    ret = np.full(n + 1, spec.result_bytes / bw if include_return else 0.0)
    return LinkCost(np.where(none, -1, choice), pick(st.encode), link.rtt_seconds, pick(xfer), pick(dec), ret,
                    st.options, st.encode, xfer, dec)
