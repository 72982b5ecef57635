"""Tile scores to rasters: per-class probabilities averaged where tiles overlap."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from ..zeroshot.tile_scores import TileScores

__all__ = ["probability_raster"]


def probability_raster(
    scores: TileScores, *, shape: tuple[int, int], scale: float
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """([K, H, W] mean probability, [H, W] tile count) at ``scale`` level-0 px per pixel.

    Each tile adds its probabilities over the pixels it covers (a 2-D difference array,
    so the cost is linear in tiles plus pixels); overlaps are averaged.
    """
    h, w = shape
    tiles = scores.table
    k = len(scores.classes)
    acc = np.zeros((k + 1, h + 1, w + 1), np.float64)
    if len(tiles):
        x0 = np.clip(np.floor(tiles["x"].to_numpy() / scale).astype(int), 0, w)
        y0 = np.clip(np.floor(tiles["y"].to_numpy() / scale).astype(int), 0, h)
        x1 = np.clip(np.ceil((tiles["x"] + tiles["size0"]).to_numpy() / scale).astype(int), 0, w)
        y1 = np.clip(np.ceil((tiles["y"] + tiles["size0"]).to_numpy() / scale).astype(int), 0, h)
        vals = np.column_stack([scores.probs().astype(np.float64), np.ones(len(tiles))])
        for c in range(k + 1):
            v = vals[:, c]
            np.add.at(acc[c], (y0, x0), v)
            np.add.at(acc[c], (y0, x1), -v)
            np.add.at(acc[c], (y1, x0), -v)
            np.add.at(acc[c], (y1, x1), v)
    summed = acc.cumsum(axis=1).cumsum(axis=2)[:, :h, :w]
    count = summed[k].astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = np.where(count > 0.5, summed[:k] / np.maximum(count, 1e-9), 0.0).astype(np.float32)
    return probs, count
