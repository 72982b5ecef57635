"""Tile scores to rasters: per-class probabilities averaged where tiles overlap, one class
at a time (memory holds one class image, whatever the number of classes)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from ..zeroshot.tile_scores import TileScores

__all__ = ["Raster", "probability_raster"]


class Raster:
    """The tiles of ``scores`` on an ``shape`` pixel grid at ``scale`` level-0 px per
    pixel. Each tile adds its value over the pixels it covers (a 2-D difference array, so
    the cost is linear in tiles plus pixels); overlaps are averaged."""

    def __init__(self, scores: TileScores, *, shape: tuple[int, int], scale: float) -> None:
        self.shape = shape
        h, w = shape
        tiles = scores.table
        self._probs = scores.probs() if len(tiles) else np.zeros((0, len(scores.classes)), np.float32)
        x, y, s = (tiles[c].to_numpy() for c in ("x", "y", "size0"))
        self._corners = (
            np.clip(np.floor(y / scale).astype(int), 0, h),
            np.clip(np.floor(x / scale).astype(int), 0, w),
            np.clip(np.ceil((y + s) / scale).astype(int), 0, h),
            np.clip(np.ceil((x + s) / scale).astype(int), 0, w),
        )
        self.count = self._paint(np.ones(len(tiles))).astype(np.float32)
        self.covered = self.count > 0.5

    def _paint(self, v: NDArray[np.float64]) -> NDArray[np.float64]:
        h, w = self.shape
        acc = np.zeros((h + 1, w + 1), np.float64)
        y0, x0, y1, x1 = self._corners
        np.add.at(acc, (y0, x0), v)
        np.add.at(acc, (y0, x1), -v)
        np.add.at(acc, (y1, x0), -v)
        np.add.at(acc, (y1, x1), v)
        return acc.cumsum(axis=0).cumsum(axis=1)[:h, :w]

    def mean(self, k: int) -> NDArray[np.float32]:
        """[H, W] mean probability of class ``k`` (0 where no tile lies)."""
        summed = self._paint(self._probs[:, k].astype(np.float64))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.covered, summed / np.maximum(self.count, 1e-9), 0.0).astype(np.float32)


def probability_raster(
    scores: TileScores, *, shape: tuple[int, int], scale: float
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """([K, H, W] mean probability, [H, W] tile count): every class at once, for the few
    classes a segmentation evaluation compares (heatmaps use :class:`Raster` per class)."""
    r = Raster(scores, shape=shape, scale=scale)
    return np.stack([r.mean(k) for k in range(len(scores.classes))]), r.count
