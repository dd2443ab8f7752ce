"""Transfer Layer (TL) kinds: an Encoder that runs on the board after the head and a Decoder
that runs on the edge before the tail, restoring the exact feature shape at the split.

Three kinds:

* ``reference`` -- ScissionLite's parameter-free TL: 2x2 max-pool (``ceil_mode=True``, so odd
  sizes keep their last row/column) on the board, nearest x2 up-sampling cropped to the exact
  ``(H, W)`` on the edge. ``C * ceil(H/2) * ceil(W/2)`` values are sent: about 4x fewer.
* ``bottleneck`` -- a learned one. The overall reduction ratio ``R`` (values in / values out,
  one of :data:`RATIOS`) is split into a spatial factor (4, i.e. 2x2 average pooling, when
  ``R >= 8``; else 1) and a channel factor ``r_c = R / spatial``: the encoder is
  ``[avg-pool 2x2] -> 1x1 conv C -> ceil(C / r_c)`` (linear: no activation, so negative features
  survive; one MAC per value and output channel, a few % of the head at worst), the decoder is
  ``[nearest up-sample to (H, W)] -> 3x3 conv -> ReLU -> 1x1 conv back to C``.
* ``transform`` -- transform coding, fitted in closed form (:meth:`TransferLayer.fit_transform`):
  the encoder rotates the channels onto their principal components, takes an orthonormal 2-D
  DCT of each component plane and rounds to a uniform quantisation step; the decoder inverts
  both. It keeps every value (ratio 1): the bytes go down because the integer coefficients are
  very skewed and codec ``ans`` entropy-codes them with the TL's own per-(channel, frequency
  band) model (``TransferLayer.tables``, :mod:`runtime.wire.entropy`). ``--step`` trades bytes for
  fidelity. Distillation cannot train it (rounding has no gradient); ``--finetune-tail`` can
  adapt the tail to its quantisation error.

A bottleneck can start from a closed-form PCA initialisation (:meth:`TransferLayer.init_pca`):
the encoder's 1x1 conv becomes the top-``k`` principal directions of the (pooled) per-pixel
channel vectors of some training features, mean-centred; the decoder's 3x3 conv becomes their
transpose plus the mean on its centre tap, shifted by a per-channel offset that keeps the ReLU in
its linear range on those features, and its 1x1 conv the identity minus that offset. Without
pooling the TL then reproduces any feature whose channel vectors lie in a ``k``-dimensional affine
subspace (and inside the offset range) exactly; otherwise it is the best rank-``k`` linear
channel code of the training features, a starting point for distillation.

Every TL is built for one feature shape ``(C, H, W)`` (the split point's, batch excluded): the
decoder needs the exact ``(H, W)`` to restore. Only rank-4 ``(N, C, H, W)`` features are
supported; other ranks raise :class:`~runtime.contracts.errors.InvalidInput`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runtime.contracts.errors import InvalidInput
from runtime.transfer.kinds import KINDS, RATIOS  # re-exported

REFERENCE_RATIO = 4


def _check_rank4(x: torch.Tensor, what: str) -> None:
    if x.dim() != 4:
        raise InvalidInput(f"{what} takes an (N, C, H, W) feature, got a rank-{x.dim()} tensor of shape "
                           f"{list(x.shape)}; Transfer Layers work only at splits with a rank-4 output")


def feature_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` from a split's ``(N, C, H, W)`` or ``(C, H, W)`` shape; InvalidInput otherwise."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3 or min(shape) <= 0:
        raise InvalidInput(f"a Transfer Layer needs an (N, C, H, W) feature at the split; this split's tensor "
                           f"has shape {list(shape)}; choose an earlier split with a 4-d (convolutional) output")
    return shape  # type: ignore[return-value]


def bottleneck_factors(channels: int, ratio: int) -> tuple[int, int]:
    """``(spatial, reduced_channels)``: spatial is 4 (2x2 pooling) when ``ratio >= 8``, else 1."""
    if ratio not in RATIOS:
        raise InvalidInput(f"bottleneck ratio must be one of {', '.join(map(str, RATIOS))}, got {ratio!r}")
    spatial = 4 if ratio >= 8 else 1
    return spatial, max(1, math.ceil(channels / (ratio // spatial)))


# -- reference ---------------------------------------------------------------------------------


class MaxPoolEncoder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rank4(x, "the reference TL encoder")
        return F.max_pool2d(x, 2, 2, ceil_mode=True)


class NearestDecoder(nn.Module):
    """Nearest x2, cropped to the exact ``(H, W)`` (for odd sizes the last row/column is dropped)."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _check_rank4(z, "the reference TL decoder")
        h, w = self.size
        return F.interpolate(z, scale_factor=2, mode="nearest")[:, :, :h, :w]


# -- bottleneck ---------------------------------------------------------------------------------


class BottleneckEncoder(nn.Module):
    def __init__(self, channels: int, reduced: int, spatial: int):
        super().__init__()
        self.spatial = spatial
        self.proj = nn.Conv2d(channels, reduced, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rank4(x, "the bottleneck TL encoder")
        if self.spatial > 1:
            x = F.avg_pool2d(x, 2, 2, ceil_mode=True)
        return self.proj(x)


class BottleneckDecoder(nn.Module):
    def __init__(self, channels: int, reduced: int, size: tuple[int, int], spatial: int):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.spatial = spatial
        self.expand = nn.Conv2d(reduced, channels, 3, padding=1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _check_rank4(z, "the bottleneck TL decoder")
        if self.spatial > 1:
            z = F.interpolate(z, scale_factor=2, mode="nearest")[:, :, : self.size[0], : self.size[1]]
        return self.out(F.relu(self.expand(z)))


# -- transform ---------------------------------------------------------------------------------


def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``(n, n)`` (rows: frequencies)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.float()


class _Transform(nn.Module):
    """The shared parameters of a transform TL's encoder and decoder (buffers, no gradients)."""

    def __init__(self, channels: int, size: tuple[int, int]):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("basis", torch.eye(channels))  # (C, C): columns are the components
        self.register_buffer("step", torch.ones(channels))  # quantisation step per component
        self.register_buffer("dct_h", dct_matrix(size[0]), persistent=False)
        self.register_buffer("dct_w", dct_matrix(size[1]), persistent=False)


class TransformEncoder(_Transform):
    """``x -> round(DCT_hw(basis^T (x - mean)) / step)``: integer coefficients, same shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rank4(x, "the transform TL encoder")
        z = torch.einsum("nchw,ck->nkhw", x - self.mean[None, :, None, None], self.basis)
        z = torch.einsum("ah,nkhw,bw->nkab", self.dct_h, z, self.dct_w)
        return torch.round(z / self.step[None, :, None, None])


class TransformDecoder(_Transform):
    """Inverse of :class:`TransformEncoder` up to the rounding; its input is snapped to integers
    first, so a codec that carries integers approximately (int8 with a fine scale) stays exact."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _check_rank4(z, "the transform TL decoder")
        z = torch.round(z) * self.step[None, :, None, None]
        z = torch.einsum("ah,nkab,bw->nkhw", self.dct_h, z, self.dct_w)
        return torch.einsum("nkhw,ck->nchw", z, self.basis) + self.mean[None, :, None, None]


def _channel_pca(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PCA of the per-pixel channel vectors of ``x`` ``(N, C, H, W)``: ``(vectors (N*H*W, C), mean,
    eigenvalues descending (>= 0), eigenvectors as columns in the same order)``."""
    c = x.shape[1]
    v = x.permute(0, 2, 3, 1).reshape(-1, c)
    mean = v.mean(0)
    vc = v - mean
    evals, evecs = torch.linalg.eigh(vc.T @ vc / max(1, v.shape[0]))  # ascending
    return v, mean, evals.flip(0).clamp_min(0), evecs.flip(1)


# -- the pair ----------------------------------------------------------------------------------


class TransferLayer(nn.Module):
    """Encoder (board) + decoder (edge) for one feature shape. ``state_dict`` keys start with
    ``encoder.`` / ``decoder.`` (plus ``tables``, the transform kind's entropy model); the
    reference kind has none."""

    def __init__(self, kind: str, in_shape: Sequence[int], ratio: int | None = None):
        super().__init__()
        c, h, w = feature_shape(in_shape)
        self.kind = kind
        self.in_shape = (c, h, w)
        hh, ww = (h + 1) // 2, (w + 1) // 2
        if kind == "reference":
            if ratio not in (None, REFERENCE_RATIO):
                raise InvalidInput(f"the reference TL has a fixed ratio of {REFERENCE_RATIO} (2x2 max-pool), "
                                   f"got --ratio {ratio}; omit it or use --kind bottleneck")
            self.ratio = REFERENCE_RATIO
            self.encoder: nn.Module = MaxPoolEncoder()
            self.decoder: nn.Module = NearestDecoder((h, w))
            self.encoded_shape = (c, hh, ww)
        elif kind == "bottleneck":
            ratio = 16 if ratio is None else int(ratio)
            spatial, reduced = bottleneck_factors(c, ratio)
            self.ratio = ratio
            self.encoder = BottleneckEncoder(c, reduced, spatial)
            self.decoder = BottleneckDecoder(c, reduced, (h, w), spatial)
            self.encoded_shape = (reduced, hh, ww) if spatial > 1 else (reduced, h, w)
        elif kind == "transform":
            if ratio not in (None, 1):
                raise InvalidInput("the transform TL keeps every value (ratio 1) and sets its size with the "
                                   f"quantisation step (--step), got --ratio {ratio}")
            from runtime.wire.entropy import BANDS, CLUSTERS, MAX_RANGE

            self.ratio = 1
            self.encoder = TransformEncoder(c, (h, w))
            self.decoder = TransformDecoder(c, (h, w))
            self.encoded_shape = (c, h, w)
            # the entropy model of codec "ans": P(symbol | table), symbols -R..R, a table per (channel, band)
            self.register_buffer("tables", torch.full((CLUSTERS, 2 * MAX_RANGE + 1), 1.0 / (2 * MAX_RANGE + 1)))
            self.register_buffer("table_of", torch.zeros(c, BANDS, dtype=torch.long))
            self._entropy = None
        else:
            raise InvalidInput(f"unknown Transfer Layer kind {kind!r}; known kinds: {', '.join(KINDS)}")

    @property
    def trainable(self) -> bool:
        return any(True for _ in self.parameters())

    def values_ratio(self) -> float:
        """Values out / values in (e.g. 0.0625 for 16x fewer values)."""
        return math.prod(self.encoded_shape) / math.prod(self.in_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    @property
    def entropy_model(self):
        """The :class:`runtime.wire.entropy.EntropyModel` of codec ``ans`` (transform kind), else None.
        Built on first use and rebuilt whenever the tables change (fit, load_state_dict)."""
        if self.kind != "transform":
            return None
        key = (self.tables.data_ptr(), self.tables._version, self.table_of.data_ptr(), self.table_of._version)
        if self._entropy is None or self._entropy[0] != key:
            from runtime.wire.entropy import EntropyModel

            self._entropy = (key, EntropyModel(self.tables, self.table_of, self.encoded_shape))
        return self._entropy[1]

    @torch.no_grad()
    def fit_transform(self, features: torch.Tensor, step: float = 1.0) -> dict:
        """Closed-form fit of a transform TL on ``features`` ``(N, C, H, W)``: PCA of the per-pixel
        channel vectors (the rotation), one quantisation step for every component of ``step``
        times the features' mean channel standard deviation (a uniform step is the MSE-optimal
        choice after an orthonormal transform), and the entropy tables from the training
        coefficients. Returns what was fitted."""
        from runtime.wire.entropy import MAX_RANGE, band_map, fit_tables

        self._check_fit(features, "transform", "the transform fit")
        if not step > 0 or not math.isfinite(step):
            raise InvalidInput(f"--step must be a finite number > 0, got {step}")
        c = self.in_shape[0]
        v, mean, evals, evecs = _channel_pca(features.to(torch.float64))
        std = float(v.std(0, unbiased=False).mean())
        delta = step * (std if std > 0 else 1.0)
        for part in (self.encoder, self.decoder):
            part.mean.copy_(mean)
            part.basis.copy_(evecs)
            part.step.fill_(delta)
        z = self.encoder(features)
        clipped = float((z.abs() > MAX_RANGE).double().mean())
        q = z.clamp(-MAX_RANGE, MAX_RANGE)
        tables, table_of = fit_tables(q, band_map(*self.in_shape[1:], self.table_of.shape[1]), MAX_RANGE,
                                      clusters=self.tables.shape[0], nbands=self.table_of.shape[1])
        self.tables.copy_(tables)
        self.table_of.copy_(table_of)
        self._entropy = None
        self.step_setting = step  # for reports; the artifact keeps it in training.transform
        total = float(evals.sum())
        return {"step": step, "step_abs": round(delta, 6), "channel_std": round(std, 6),
                "features": int(features.shape[0]), "clipped": clipped,
                "explained_variance_half": round(float(evals[: max(1, c // 2)].sum()) / total, 6) if total else 1.0}

    def _check_fit(self, features: torch.Tensor, kind: str, what: str) -> None:
        if self.kind != kind:
            raise InvalidInput(f"{what} needs a {kind} TL, not {self.kind!r}")
        _check_rank4(features, what)
        if tuple(features.shape[1:]) != self.in_shape:
            raise InvalidInput(f"{what}: features have shape {list(features.shape[1:])}, "
                               f"this TL takes {list(self.in_shape)}")

    @torch.no_grad()
    def init_pca(self, features: torch.Tensor, margin: float = 1.0) -> dict:
        """Closed-form PCA initialisation of a bottleneck from ``features`` ``(N, C, H, W)`` (see the
        module docstring); returns ``{"components", "explained_variance"}`` (the fraction of the
        per-pixel channel variance the kept components carry, on ``features``). ``margin`` (in
        channel standard deviations) widens the ReLU's linear range beyond the features' minimum."""
        self._check_fit(features, "bottleneck", "PCA initialisation")
        enc, dec = self.encoder, self.decoder
        x = features.to(torch.float64)
        if enc.spatial > 1:
            x = F.avg_pool2d(x, 2, 2, ceil_mode=True)
        c, k = x.shape[1], enc.proj.out_channels
        v, mean, evals, evecs = _channel_pca(x)
        vc = v - mean
        basis = evecs[:, :k]  # (C, k), orthonormal columns; k may exceed C only when C is tiny
        if basis.shape[1] < k:
            basis = torch.cat([basis, basis.new_zeros(c, k - basis.shape[1])], 1)
        recon = (vc @ basis) @ basis.T + mean  # what the decoder's 3x3 conv must output (before the shift)
        shift = (-recon.min(0).values).clamp_min(0) + margin * v.std(0, unbiased=False) + 1e-3
        enc.proj.weight.copy_(basis.T.reshape(k, c, 1, 1))
        enc.proj.bias.copy_(-(basis.T @ mean))
        dec.expand.weight.zero_()
        dec.expand.weight[:, :, 1, 1] = basis
        dec.expand.bias.copy_(mean + shift)
        dec.out.weight.copy_(torch.eye(c, dtype=torch.float64).reshape(c, c, 1, 1))
        dec.out.bias.copy_(-shift)
        total = float(evals.sum())
        return {"components": k,
                "explained_variance": round(float(evals[:k].sum()) / total, 6) if total > 0 else 1.0}
