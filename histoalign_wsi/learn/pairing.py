"""Report pairing (CLIP-IT): each image (slide or patch) gets the ``k`` reports of an
unpaired corpus most similar to it in the encoder's shared image-text space. One matrix
product per block of images against the whole (cached) corpus, then a top-k: no Python
loop over images, and memory bounded by the block, not by images x reports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from numpy.typing import NDArray

__all__ = ["Pairs", "fuse_paired_text", "pair_topk"]

#: similarities held at once: images per block x corpus size stays under this many floats
_BLOCK_FLOATS = 1 << 25


@dataclass(frozen=True)
class Pairs:
    """For image i: ``index[i, r]`` is its rank-r report (into the corpus), ``score[i, r]``
    the cosine similarity (descending along r)."""

    index: NDArray[np.int64]
    score: NDArray[np.float32]

    def table(self, items: Sequence[str], report_ids: Sequence[str]) -> pd.DataFrame:
        n, k = self.index.shape
        return pd.DataFrame(
            {
                "item": np.repeat(np.asarray(items, dtype=object), k),
                "rank": np.tile(np.arange(1, k + 1), n),
                "report_id": np.asarray(report_ids, dtype=object)[self.index.ravel()],
                "report_index": self.index.ravel(),
                "score": self.score.ravel(),
            }
        )

    @classmethod
    def from_table(cls, df: pd.DataFrame, items: Sequence[str]) -> Pairs:
        """Back from :meth:`table`, rows in ``items`` order (every item must be there)."""
        df = df.sort_values(["item", "rank"])
        k = int(df["rank"].max())
        groups = {str(i): g for i, g in df.groupby("item", sort=False)}
        missing = [i for i in items if i not in groups]
        if missing:
            raise KeyError(missing[:10])
        idx = np.stack([groups[i]["report_index"].to_numpy(np.int64)[:k] for i in items])
        sc = np.stack([groups[i]["score"].to_numpy(np.float32)[:k] for i in items])
        return cls(idx, sc)


def pair_topk(images: NDArray[np.float32], corpus: NDArray[np.float32], k: int) -> Pairs:
    """Top-``k`` corpus rows by cosine for every image row (both L2-normalised)."""
    if k < 1:
        raise ValueError("k must be at least 1")
    k = min(k, len(corpus))
    c = torch.from_numpy(np.ascontiguousarray(corpus, np.float32))
    block = max(1, _BLOCK_FLOATS // max(1, len(corpus)))
    idx, sc = [], []
    with torch.inference_mode():
        for i in range(0, len(images), block):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + block], np.float32))
            top = torch.topk(x @ c.T, k, dim=1)
            idx.append(top.indices.numpy())
            sc.append(top.values.numpy())
    if not idx:
        return Pairs(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32))
    return Pairs(np.concatenate(idx).astype(np.int64), np.concatenate(sc).astype(np.float32))


def fuse_paired_text(
    pairs: Pairs, corpus: NDArray[np.float32], temperature: float = 0.05
) -> NDArray[np.float32]:
    """The paired-text feature of each image: its top-k report embeddings averaged with
    softmax(score / temperature) weights, L2-normalised [n, D]."""
    w = pairs.score / temperature
    w = np.exp(w - w.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    t = np.einsum("nk,nkd->nd", w, corpus[pairs.index])
    return (t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)).astype(np.float32)
