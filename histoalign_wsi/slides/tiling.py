"""Nested multi-scale tiling on the tissue mask, in level-0 pixel coordinates.

Geometry. The finest scale's tile spans ``T0 = round(tile_px * mpp0 / slide_mpp)`` level-0
pixels; a coarser scale spans ``T0 * round(mpp_k / mpp0)``. All grids start at (0, 0), so
a coarse tile covers exactly an integer block of finer tiles (nesting is exact) and the
effective MPP of a scale is ``T_k * slide_mpp / tile_px`` (recorded in the store).

Edge policy. Only tiles lying wholly inside the slide are laid; the strip past the last
whole tile is not tiled (no padding is ever encoded). A slide smaller than one tile at a
scale has zero tiles there.

Order. Tiles are sorted by the coarsest-scale cell that holds them, then row-major, so
one read of a coarse block yields consecutive rows at every scale.

Keep rule. A tile is kept when its tissue fraction (exact area fraction of the mask under
it) reaches ``min_tissue_fraction``, at every scale independently. A fine tile's parent
index at a coarser scale is the kept coarse tile containing it, or -1 when that coarse
cell was not kept (too little tissue at that scale) or crosses the slide edge.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from ..config import TilingParams

__all__ = ["ScaleGrid", "Tiling", "scale_name", "tile_slide"]

log = logging.getLogger(__name__)


def scale_name(mpp: float) -> str:
    """Store group name of a scale, e.g. ``0.50mpp``."""
    return f"{mpp:.2f}mpp"


@dataclass(frozen=True)
class ScaleGrid:
    """Kept tiles of one scale."""

    mpp: float  # requested
    size0: int  # level-0 pixels per tile side
    coords: NDArray[np.int32]  # [N, 2] level-0 x, y (top-left)
    tissue_fraction: NDArray[np.float32]  # [N]
    parents: dict[str, NDArray[np.int32]] = field(default_factory=dict)  # coarser name -> [N]

    @property
    def name(self) -> str:
        return scale_name(self.mpp)

    def __len__(self) -> int:
        return int(self.coords.shape[0])


@dataclass(frozen=True)
class Tiling:
    slide_mpp: float
    level0_dims: tuple[int, int]
    tile_px: int
    min_tissue_fraction: float
    scales: tuple[ScaleGrid, ...]

    def effective_mpp(self, grid: ScaleGrid) -> float:
        return grid.size0 * self.slide_mpp / self.tile_px


def summed_area(mask: NDArray[np.bool_]) -> NDArray[np.int64]:
    """Summed-area table (exact integers; int32 when the mask is small enough)."""
    dt = np.int32 if mask.size < 2**31 else np.int64
    s = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dt)
    np.cumsum(mask, axis=0, dtype=dt, out=s[1:, 1:])
    np.cumsum(s[1:, 1:], axis=1, dtype=dt, out=s[1:, 1:])
    return s


def _sat_at(s: NDArray[np.int64], x: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.float64]:
    """Mask area in [0, x) x [0, y) (mask-pixel units); exact for a piecewise-constant mask,
    since the integral is bilinear inside each pixel."""
    h, w = s.shape[0] - 1, s.shape[1] - 1
    x = np.clip(x, 0, w)
    y = np.clip(y, 0, h)
    x0 = np.minimum(np.floor(x).astype(np.int64), w - 1) if w > 0 else np.zeros_like(x, np.int64)
    y0 = np.minimum(np.floor(y).astype(np.int64), h - 1) if h > 0 else np.zeros_like(y, np.int64)
    fx, fy = x - x0, y - y0
    return (
        s[y0, x0] * (1 - fx) * (1 - fy)
        + s[y0, x0 + 1] * fx * (1 - fy)
        + s[y0 + 1, x0] * (1 - fx) * fy
        + s[y0 + 1, x0 + 1] * fx * fy
    )


def tissue_fractions(
    mask: NDArray[np.bool_],
    mask_scale: float,
    xs: NDArray[np.int64],
    ys: NDArray[np.int64],
    size0: int,
    *,
    sat: NDArray[np.int64] | None = None,
) -> NDArray[np.float64]:
    """Exact tissue area fraction of level-0 squares ``(x, y, size0)``."""
    if mask.size == 0 or len(xs) == 0:
        return np.zeros(len(xs))
    s = summed_area(mask) if sat is None else sat
    x0, y0 = xs / mask_scale, ys / mask_scale
    x1, y1 = (xs + size0) / mask_scale, (ys + size0) / mask_scale
    area = _sat_at(s, x1, y1) - _sat_at(s, x0, y1) - _sat_at(s, x1, y0) + _sat_at(s, x0, y0)
    return np.clip(area / ((x1 - x0) * (y1 - y0)), 0.0, 1.0)


def tile_slide(
    mask: NDArray[np.bool_],
    *,
    mask_scale: float,
    slide_mpp: float,
    level0_dims: tuple[int, int],
    params: TilingParams,
) -> Tiling:
    """Lay the nested grids on the tissue ``mask`` (``mask_scale`` level-0 px per pixel)."""
    mpps = params.scales_mpp
    t0 = max(1, round(params.tile_px * mpps[0] / slide_mpp))
    factors = [round(m / mpps[0]) for m in mpps]
    w, h = level0_dims
    # per scale: grid shape and the dense "keep" table
    keep: list[NDArray[np.bool_]] = []
    frac: list[NDArray[np.float64]] = []
    sat = summed_area(mask) if mask.size else None
    for f in factors:
        size = t0 * f
        nx, ny = w // size, h // size
        gy, gx = np.mgrid[0:ny, 0:nx]
        fr = tissue_fractions(mask, mask_scale, gx.ravel() * size, gy.ravel() * size, size, sat=sat)
        fr = fr.reshape(ny, nx)
        frac.append(fr)
        keep.append((fr >= params.min_tissue_fraction) & (fr > 0))
    grids: list[ScaleGrid] = []
    index: list[NDArray[np.int32]] = []
    for k, f in enumerate(factors):
        size = t0 * f
        ky, kx = np.nonzero(keep[k])
        # block-major order: by the coarsest cell holding the tile, then row-major inside,
        # so the encoder, which reads one coarse block at a time, appends rows in order
        tc = t0 * factors[-1]
        order = np.lexsort((kx, ky, (kx * size) // tc, (ky * size) // tc))
        ky, kx = ky[order], kx[order]
        idx = np.full(keep[k].shape, -1, np.int32)
        idx[ky, kx] = np.arange(len(ky), dtype=np.int32)
        index.append(idx)
        coords = np.column_stack([kx * size, ky * size]).astype(np.int32).reshape(-1, 2)
        grids.append(
            ScaleGrid(
                mpp=mpps[k],
                size0=size,
                coords=coords,
                tissue_fraction=frac[k][ky, kx].astype(np.float32),
            )
        )
    for j, g in enumerate(grids):
        for k in range(j + 1, len(grids)):
            size_k = grids[k].size0
            cx = g.coords[:, 0] // size_k
            cy = g.coords[:, 1] // size_k
            ny, nx = index[k].shape
            ok = (cx < nx) & (cy < ny)
            par = np.full(len(g), -1, np.int32)
            par[ok] = index[k][cy[ok], cx[ok]]
            g.parents[grids[k].name] = par
    for g in grids:
        log.debug("scale %s: %d tiles of %d level-0 px", g.name, len(g), g.size0)
    return Tiling(
        slide_mpp=slide_mpp,
        level0_dims=(w, h),
        tile_px=params.tile_px,
        min_tissue_fraction=params.min_tissue_fraction,
        scales=tuple(grids),
    )
