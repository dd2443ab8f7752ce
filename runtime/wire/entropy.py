"""Static entropy models and an ANS coder for integer-valued feature tensors (codec ``ans``).

A transform Transfer Layer (:mod:`runtime.transfer.layers`, kind ``transform``) turns a feature
``(N, C, H, W)`` into integer coefficients in ``[-R, R]``. Their distribution is very skewed
(most coefficients of the minor components are 0), and general-purpose byte compressors leave a
lot on the table there: on EfficientNet-Lite0's split-45 coefficients zstd -3 / lzma / brotli
came out 25-45 % above the order-0 entropy (lz4 more than 2x). So the coefficients are coded
with an asymmetric numeral system (rANS, 32-bit words; ``constriction``'s Rust coder) against
a **static** model learned with the TL: one categorical distribution per (channel, frequency
band), estimated from the training features with additive smoothing so every symbol in
``[-R, R]`` stays codable.

The model travels with the TL artifact, never with the frame: both ends hold the same tables
(the frame names the TL), and the wire carries only the coded words. Symbols are grouped by
(channel, band) so each group is coded with one model; a band is a fixed function of the
coefficient's position (:func:`band_map`), so it needs no side information.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from runtime.contracts.errors import InvalidInput

BANDS = 6  # frequency bands per channel (see band_map)
MAX_RANGE = 255  # largest |symbol|: the table width is 2 R + 1
SMOOTHING = 0.05  # pseudo-count added to every symbol of every table
CLUSTERS = 24  # tables shared by the (channel, band) groups (see fit_tables)


def band_map(h: int, w: int, bands: int = BANDS) -> torch.Tensor:
    """``(H, W)`` long tensor: the band of each DCT coefficient, by ``floor(1.5 log2(1 + a + b))``
    (DC alone in band 0, the highest frequencies share the last band)."""
    a = torch.arange(h)[:, None] + torch.arange(w)[None, :]
    return torch.clamp(torch.floor(1.5 * torch.log2(1.0 + a.double())).long(), max=bands - 1)


def fit_tables(q: torch.Tensor, bands: torch.Tensor, r: int, clusters: int = CLUSTERS, nbands: int = BANDS,
               smoothing: float = SMOOTHING) -> tuple[torch.Tensor, torch.Tensor]:
    """The model for integer coefficients ``q`` ``(N, C, H, W)`` in ``[-r, r]``: ``(tables, table_of)``.

    Every (channel, band) histogram is measured; those of similar spread (log standard
    deviation, ``clusters`` quantile groups) share one table, their pooled histogram: the coder
    then needs one call per table rather than per (channel, band), ~25x fewer on EfficientNet's
    80 channels x 6 bands, for a few per cent more bytes. ``tables`` ``(K, 2r + 1)`` float32
    sums to 1 per row; ``table_of`` ``(C, nbands)`` long gives each (channel, band) its table
    (shapes fixed by the arguments, whatever the data: bands or tables may go unused)."""
    n, c, h, w = q.shape
    nb = nbands
    if int(bands.max()) >= nb:
        raise InvalidInput(f"band map has bands up to {int(bands.max())}, more than nbands={nb}")
    width = 2 * r + 1
    idx = (q.long() + r).permute(1, 0, 2, 3).reshape(c, n, h * w)  # (C, N, HW)
    b = bands.reshape(-1).expand(c, n, h * w)
    flat = (torch.arange(c)[:, None, None] * nb + b) * width + idx
    counts = torch.bincount(flat.reshape(-1), minlength=c * nb * width).double().reshape(c * nb, width)
    values = torch.arange(-r, r + 1, dtype=torch.float64)
    total = counts.sum(1).clamp_min(1)
    mean = (counts * values).sum(1) / total
    spread = torch.log(((counts * (values - mean[:, None]) ** 2).sum(1) / total).sqrt() + 1e-3)
    k = max(1, clusters)
    order = torch.argsort(spread, stable=True)
    table_of = torch.empty(c * nb, dtype=torch.long)
    table_of[order] = torch.arange(c * nb) * k // (c * nb)  # quantile groups by spread
    pooled = torch.zeros(k, width, dtype=torch.float64).index_add_(0, table_of, counts) + smoothing
    return (pooled / pooled.sum(1, keepdim=True)).float(), table_of.reshape(c, nb)


class EntropyModel:
    """The static model of one transform TL: ``tables`` ``(C, B, 2R + 1)`` over symbols
    ``[-R, R]`` for coefficients of shape ``(C, H, W)``."""

    def __init__(self, tables: torch.Tensor, table_of: torch.Tensor, shape: tuple[int, int, int]):
        import constriction

        c, h, w = (int(d) for d in shape)
        if tables.dim() != 2 or tables.shape[1] % 2 != 1 or table_of.dim() != 2 or table_of.shape[0] != c:
            raise InvalidInput(f"entropy tables {list(tables.shape)} / table_of {list(table_of.shape)} do not fit "
                               f"coefficients {[c, h, w]}")
        self.shape = (c, h, w)
        self.range = (tables.shape[1] - 1) // 2
        if self.range > MAX_RANGE:
            raise InvalidInput(f"entropy tables cover |symbol| <= {self.range}; at most {MAX_RANGE} is supported")
        # float32 -> float64 is exact and nothing is computed on the values here, so both ends
        # (different CPUs included) hand the coder bit-identical probabilities
        t = tables.double().numpy()
        if not np.all(np.isfinite(t)) or np.any(t <= 0):
            raise InvalidInput("entropy tables must be finite and > 0 everywhere (every symbol codable)")
        which = table_of.long()
        if which.numel() and (int(which.min()) < 0 or int(which.max()) >= tables.shape[0]):
            raise InvalidInput(f"table_of names tables outside 0..{tables.shape[0] - 1}")
        bands = band_map(h, w, table_of.shape[1]).reshape(-1)
        # the table of every flattened (C*H*W) position; positions are coded grouped by table
        per_pos = which[:, bands].reshape(-1)
        order = torch.argsort(per_pos, stable=True)
        self._order = order.numpy()
        self._inverse = torch.argsort(order).numpy()
        counts = torch.bincount(per_pos, minlength=tables.shape[0]).tolist()
        model = constriction.stream.model.Categorical
        self._plan, start = [], 0  # (start, end, model) in coding order
        for k, cnt in enumerate(counts):
            if cnt:
                self._plan.append((start, start + cnt, model(t[k], perfect=False)))
                start += cnt
        self._plan_reversed = self._plan[::-1]
        self._coder = constriction.stream.stack.AnsCoder

    def encode(self, q: torch.Tensor) -> bytes:
        """Integer coefficients ``(N, C, H, W)`` (values already in ``[-R, R]``) -> coded words."""
        if q.dim() != 4 or tuple(q.shape[1:]) != self.shape:
            raise InvalidInput(f"ans codes coefficients of shape [N, {', '.join(map(str, self.shape))}], "
                               f"got {list(q.shape)}")
        n = q.shape[0]
        sym = q.detach().reshape(n, -1).to(torch.int32).numpy() + self.range
        if sym.size and (sym.min() < 0 or sym.max() > 2 * self.range):
            raise InvalidInput(f"ans symbols must lie in [-{self.range}, {self.range}]")
        flat = np.ascontiguousarray(sym[:, self._order].T).reshape(-1)  # (position in coding order, frame)
        enc = self._coder()
        for start, end, model in self._plan_reversed:
            enc.encode_reverse(flat[start * n:end * n], model)  # 1-d views: no copies
        words: np.ndarray = enc.get_compressed()  # uint32 words
        return words.astype("<u4", copy=False).tobytes()

    def decode(self, payload: bytes | bytearray | memoryview, n: int) -> torch.Tensor:
        """Coded words -> float32 coefficients ``(n, C, H, W)``; InvalidInput when the words do not
        decode to exactly ``n`` frames of symbols."""
        if len(payload) % 4:
            raise InvalidInput(f"ans payload of {len(payload)} bytes is not a whole number of 32-bit words")
        words = np.frombuffer(payload, dtype=np.uint32)  # no copy (the wire is little-endian, as the host)
        if words.size == 0 and n * math.prod(self.shape):
            raise InvalidInput("ans payload is empty but the shape has elements")
        try:
            dec = self._coder(words)
            flat = np.empty(len(self._order) * n, dtype=np.int32)
            for start, end, model in self._plan:
                flat[start * n:end * n] = dec.decode(model, (end - start) * n)
            out = flat.reshape(len(self._order), n)
        except (ValueError, RuntimeError, AssertionError) as e:
            raise InvalidInput(f"ans payload does not decode ({e}): corrupted or coded with another model") from None
        if not dec.is_empty():
            raise InvalidInput("ans payload has words left after all symbols were decoded: corrupted, or coded "
                               "with another Transfer Layer's model")
        sym = out.T[:, self._inverse].astype(np.float32) - self.range
        return torch.from_numpy(np.ascontiguousarray(sym)).reshape(n, *self.shape)
