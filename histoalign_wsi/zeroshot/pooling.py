"""Multiple-instance pooling of tile logits to slide logits, per scale, then scale-aware
fusion; and parent context for tile-level (segmentation) scores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

__all__ = ["METHODS", "add_parent_context", "fuse_scales", "pool", "softmax", "topk_count"]

METHODS = ("mean", "max", "topk", "soft")


def softmax(x: NDArray[np.float32], axis: int = -1) -> NDArray[np.float32]:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def topk_count(k: float, n: int) -> int:
    """K as a count (``k >= 1``) or a fraction of ``n`` (``k < 1``), at least 1, at most n."""
    kk = round(k) if k >= 1 else int(np.ceil(k * n))
    return max(1, min(n, kk))


def pool(logits: NDArray[np.float32], *, method: str, k: float, temperature: float) -> NDArray[np.float32]:
    """Slide logits [K] from tile logits [N, K]; N must be >= 1.

    ``topk`` is the MI-Zero / CONCH top-K mean per class (``k`` a count >= 1 or a
    fraction of the tiles). ``soft`` is, per class, a softmax-weighted mean of the tiles'
    logits with weights ``softmax(logits / temperature)`` over the tiles: the temperature
    is in logit units; large values give the mean, small ones the max.
    """
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError("pool needs at least one tile")
    if method == "mean":
        return logits.mean(axis=0)
    if method == "max":
        return logits.max(axis=0)
    if method == "topk":
        kk = topk_count(k, logits.shape[0])
        return np.sort(logits, axis=0)[-kk:].mean(axis=0)
    if method == "soft":
        w = softmax(logits / np.float32(temperature), axis=0)
        return (w * logits).sum(axis=0).astype(np.float32)
    raise ValueError(f"unknown pooling method {method!r} (choose {', '.join(METHODS)})")


def fuse_scales(
    pooled: Mapping[str, NDArray[np.float32] | None], weights: Mapping[str, float]
) -> NDArray[np.float32] | None:
    """Weighted mean of per-scale slide logits over the scales that have tiles."""
    names = [n for n, v in pooled.items() if v is not None and weights.get(n, 0.0) > 0]
    if not names:
        return None
    w = np.array([weights[n] for n in names], np.float32)
    return np.tensordot(w / w.sum(), np.stack([pooled[n] for n in names]), axes=1).astype(np.float32)  # type: ignore[misc]


def add_parent_context(
    fine: NDArray[np.float32],
    parents: Sequence[tuple[NDArray[np.int32], NDArray[np.float32]]],
    alpha: float,
) -> NDArray[np.float32]:
    """``(1 - alpha) * fine + alpha * mean(parent logits)`` per tile, over the coarser
    scales where the tile has a parent (index >= 0); tiles with none keep their own."""
    if alpha <= 0 or not parents:
        return fine
    acc = np.zeros_like(fine)
    cnt = np.zeros((fine.shape[0], 1), np.float32)
    for idx, coarse in parents:
        ok = idx >= 0
        acc[ok] += coarse[idx[ok]]
        cnt[ok] += 1
    has = cnt[:, 0] > 0
    out = fine.copy()
    out[has] = (1 - alpha) * fine[has] + alpha * acc[has] / cnt[has]
    return out
