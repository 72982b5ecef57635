"""Stain normalisation of tile batches on the encode device, vectorised over the batch:
Macenko (optical-density SVD, the form of torchstain's and the original code) and
Reinhard (CIE Lab mean and standard deviation). It runs after the tile cut and before
each encoder's own normalisation (``stain.method``; ``none`` by default: an ablation to
measure, not a cure).

Fallback: a tile with too little stain to fit (fewer than :data:`MIN_STAINED` pixels
with optical density above ``beta`` in every channel: white, empty or nearly unstained)
or whose fit is not finite is passed through unchanged, so no tile ever becomes NaN or
Inf; the count of such tiles is kept (:attr:`StainNormalizer.passed_through`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["METHODS", "MIN_STAINED", "StainNormalizer", "StainReference", "fit_reference"]

METHODS = ("none", "macenko", "reinhard")
#: fewest stained pixels a tile needs for a Macenko fit
MIN_STAINED = 64
IO, ALPHA, BETA = 240.0, 1.0, 0.15  # transmitted light, angle percentile, OD threshold (torchstain's)

_RGB2XYZ = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=torch.float64,
)
_WHITE = torch.tensor([0.950456, 1.0, 1.088754], dtype=torch.float64)


@dataclass(frozen=True)
class StainReference:
    """The target of normalisation: Macenko's stain matrix [3, 2] and 99th-percentile
    concentrations [2]; Reinhard's Lab means and standard deviations [3]."""

    he: tuple[tuple[float, float], ...]
    max_c: tuple[float, ...]
    lab_mean: tuple[float, ...]
    lab_std: tuple[float, ...]
    source: str = "builtin"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def load(cls, reference: str) -> StainReference:
        """``builtin`` (the shipped reference, with its provenance) or an RGB image path."""
        if reference == "builtin":
            d = json.loads(
                resources.files("histoalign_wsi.data").joinpath("stain_reference.json").read_text()
            )
            return cls(
                _floats2(d["macenko"]["he"]),
                _floats(d["macenko"]["max_c"], 2),
                _floats(d["reinhard"]["lab_mean"], 3),
                _floats(d["reinhard"]["lab_std"], 3),
                "builtin",
                d.get("provenance", {}),
            )
        p = Path(reference)
        if not p.is_file():
            raise ConfigError(f"stain.reference {reference!r}: no such image (or use 'builtin')")
        from skimage.io import imread

        try:
            img = np.asarray(imread(p))[..., :3]
        except Exception as exc:  # any decoder error: one line naming the file
            raise ConfigError(f"stain.reference {reference!r} cannot be read as an image ({exc})") from exc
        return fit_reference(img, source=str(p))


def _od(x: torch.Tensor) -> torch.Tensor:
    """[N, P, 3] 0-255 -> optical density."""
    return -torch.log((x + 1.0) / IO)


def _macenko_fit(od: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tile of ``od`` [N, P, 3]: the stain matrix [N, 3, 2], its pseudo-inverse
    [N, 2, 3], the concentrations of the pixels [N, 2, P], and whether the fit is usable [N]."""
    stained = (od >= BETA).all(dim=2)  # [N, P]
    cnt = stained.sum(dim=1)
    w = stained.to(od.dtype)
    mean = (od * w[..., None]).sum(1) / cnt.clamp(min=2)[:, None]
    centred = (od - mean[:, None, :]) * w[..., None]
    cov = centred.transpose(1, 2) @ centred / (cnt.clamp(min=2) - 1)[:, None, None]
    _, vecs = torch.linalg.eigh(cov.double())  # ascending eigenvalues (3 x 3: double is free)
    e = vecs[:, :, 1:3].to(od.dtype)  # the two largest, in torchstain's order
    t = od @ e  # [N, P, 2]
    phi = torch.atan2(t[..., 1], t[..., 0]).masked_fill(~stained, float("nan"))
    lo = torch.nanquantile(phi, ALPHA / 100, dim=1)
    hi = torch.nanquantile(phi, 1 - ALPHA / 100, dim=1)
    v_min = (e @ torch.stack([torch.cos(lo), torch.sin(lo)], 1)[..., None])[..., 0]
    v_max = (e @ torch.stack([torch.cos(hi), torch.sin(hi)], 1)[..., None])[..., 0]
    first = (v_min[:, 0] > v_max[:, 0])[:, None]
    he = torch.stack([torch.where(first, v_min, v_max), torch.where(first, v_max, v_min)], dim=2)
    fitted = (cnt >= MIN_STAINED) & torch.isfinite(he).flatten(1).all(1)
    # an unfit tile gets a stand-in matrix so that the batch solves; it is passed through
    stand_in = torch.tensor([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]], dtype=od.dtype, device=od.device)
    he = torch.where(fitted[:, None, None], he, stand_in)
    gram = he.transpose(1, 2) @ he  # least squares by the normal equations: he is [3, 2]
    fitted &= torch.linalg.det(gram).abs() > 1e-9
    gram = torch.where(fitted[:, None, None], gram, torch.eye(2, dtype=od.dtype, device=od.device))
    pinv = torch.linalg.solve(gram, he.transpose(1, 2))  # [N, 2, 3]: least squares, as lstsq
    c = pinv @ od.transpose(1, 2)  # [N, 2, P]
    max_c = _upper_quantile(c, 0.99)
    ok = fitted & (max_c > 1e-6).all(1)
    return he, pinv, c, ok & torch.isfinite(max_c).all(1)


def _upper_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(x, q, dim=-1)`` (numpy's linear rule) for a high ``q``, from the
    few largest values (a partial top-k, not a full sort)."""
    n = x.shape[-1]
    pos = q * (n - 1)
    lo = int(pos)
    k = n - lo  # ranks lo .. n-1 from the bottom are the k largest
    top = torch.topk(x, k, dim=-1, sorted=True).values  # descending
    a, b = top[..., k - 1], top[..., max(k - 2, 0)]  # x_sorted[lo], x_sorted[lo + 1]
    return a + (pos - lo) * (b - a)


def _lab(x: torch.Tensor) -> torch.Tensor:
    """[..., 3] 0-255 sRGB -> CIE Lab (D65), as scikit-image's ``rgb2lab``."""
    v = x / 255.0
    lin = torch.where(v > 0.04045, ((v + 0.055) / 1.055) ** 2.4, v / 12.92)
    xyz = lin @ _RGB2XYZ.to(x).T / _WHITE.to(x)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1
    )


def _rgb(lab: torch.Tensor) -> torch.Tensor:
    fy = (lab[..., 0] + 16) / 116
    f = torch.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16 / 116) / 7.787) * _WHITE.to(lab)
    lin = xyz @ torch.linalg.inv(_RGB2XYZ).to(lab).T
    v = torch.where(lin > 0.0031308, 1.055 * lin.clamp(min=1e-12) ** (1 / 2.4) - 0.055, 12.92 * lin)
    return v * 255.0


def fit_reference(img: np.ndarray, *, source: str) -> StainReference:
    """The Macenko and Reinhard targets of one RGB image (its stained pixels)."""
    x = torch.tensor(np.array(img[..., :3]), dtype=torch.float64).reshape(1, -1, 3)
    he, _, c, ok = _macenko_fit(_od(x))
    if not bool(ok[0]):
        raise ConfigError(f"stain.reference {source!r} has too little stained tissue to fit a stain matrix")
    max_c = torch.quantile(c[0], 0.99, dim=1)
    lab = _lab(x[0])
    return StainReference(
        _floats2(he[0].tolist()),
        _floats(max_c.tolist(), 2),
        _floats(lab.mean(0).tolist(), 3),
        _floats(lab.std(0).tolist(), 3),
        source,
    )


def _floats(v: Any, n: int) -> Any:
    out = tuple(float(x) for x in v)
    if len(out) != n:
        raise ConfigError(f"stain reference: expected {n} numbers, got {len(out)}")
    return out


def _floats2(rows: Any) -> tuple[tuple[float, float], ...]:
    return tuple(_floats(r, 2) for r in rows)


class StainNormalizer:
    """``__call__``: uint8 NCHW tiles -> normalised uint8 NCHW tiles, on their device.

    Each tile's fit (Macenko's stain matrix and concentration percentile, Reinhard's Lab
    statistics) reads every ``fit_stride``-th row and column (``1``: every pixel, as
    torchstain, the default; ``2`` reads a quarter, faster, RESULTS.md measures both); the
    transform then maps every pixel: for Macenko one 3 x 3 matrix per tile in optical
    density, ``exp(-M @ OD)``, with OD from a 256-entry table."""

    def __init__(self, method: str, reference: StainReference, *, fit_stride: int = 1) -> None:
        if method not in METHODS:
            raise ConfigError(f"stain.method {method!r} is not one of {', '.join(METHODS)}")
        self.method, self.ref, self.stride = method, reference, fit_stride
        self.passed_through = 0

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        if self.method == "none" or tiles.shape[0] == 0:
            return tiles
        n, _, h, w = tiles.shape
        px = tiles.permute(0, 2, 3, 1)  # NHWC view
        full = px.reshape(n, h * w, 3)
        fit = px[:, :: self.stride, :: self.stride].reshape(n, -1, 3)
        out, ok = self._macenko(full, fit) if self.method == "macenko" else self._reinhard(full, fit)
        ok = ok & torch.isfinite(out).flatten(1).all(1)
        self.passed_through += int((~ok).sum())
        out = torch.where(ok[:, None, None], out, full.to(out.dtype)).clamp(0, 255).round().to(torch.uint8)
        return out.reshape(n, h, w, 3).permute(0, 3, 1, 2).contiguous()

    def _macenko(self, full: torch.Tensor, fit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lut = -torch.log((torch.arange(256, dtype=torch.float32, device=full.device) + 1.0) / IO)
        _, pinv, c, ok = _macenko_fit(lut[fit.long()])
        max_c = _upper_quantile(c, 0.99).clamp(min=1e-6)
        ref_he = torch.tensor(self.ref.he, dtype=pinv.dtype, device=pinv.device)
        ref_max = torch.tensor(self.ref.max_c, dtype=pinv.dtype, device=pinv.device)
        m = ref_he @ ((ref_max / max_c)[..., None] * pinv)  # [N, 3, 3]: OD -> normalised OD
        out = IO * torch.exp(-(lut[full.long()] @ m.transpose(1, 2)))
        return out, ok

    def _reinhard(self, full: torch.Tensor, fit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sample = _lab(fit.to(torch.float32))
        mean, std = sample.mean(1, keepdim=True), sample.std(1, keepdim=True)
        ok = (std[:, 0] > 1e-3).all(1)  # a flat tile (one colour) has nothing to rescale
        ref_m = torch.tensor(self.ref.lab_mean, dtype=mean.dtype, device=mean.device)
        ref_s = torch.tensor(self.ref.lab_std, dtype=mean.dtype, device=mean.device)
        lab = _lab(full.to(torch.float32))
        return _rgb((lab - mean) / std.clamp(min=1e-3) * ref_s + ref_m), ok

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "reference": self.ref.source,
            "fit_stride": self.stride,
            "passed_through": self.passed_through,
        }
