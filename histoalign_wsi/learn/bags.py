"""Slides as bags of tile features for the learned heads, read from the feature stores
(no slide is read again): every scale's tiles, each with its scale index, the encoders'
features concatenated per tile. Stores are checked to agree (same encoders, weights and
scales) and read one slide at a time, so memory does not grow with the cohort."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from ..errors import ConfigError, StoreError
from ..features.store import FeatureStore, open_store

__all__ = ["Bag", "BagSource", "match_labels"]


@dataclass(frozen=True)
class Bag:
    """One slide: features [N, D] (float32), scale index [N], level-0 coords [N, 2]."""

    slide_id: str
    features: NDArray[np.float32]
    scale: NDArray[np.int64]
    coords: NDArray[np.int32]
    scale_names: tuple[str, ...]

    def pooled(self) -> NDArray[np.float32]:
        """Per-scale mean feature, concatenated in scale order (zeros for an empty scale)."""
        d = self.features.shape[1]
        parts = []
        for s in range(len(self.scale_names)):
            rows = self.features[self.scale == s]
            parts.append(rows.mean(axis=0) if len(rows) else np.zeros(d, np.float32))
        return np.concatenate(parts).astype(np.float32)


class BagSource:
    """The cohort's stores, checked to agree; :meth:`bag` reads one slide when asked."""

    def __init__(self, stores: Sequence[str | Path], *, cache_mb: float = 1024.0) -> None:
        """``cache_mb``: bags are kept in memory up to this many MB (epochs after the first
        then read nothing); past it they are streamed from the stores each time."""
        self._cache: dict[str, Bag] = {}
        self._cache_bytes, self._budget = 0, cache_mb * 2**20
        if not stores:
            raise ConfigError("no feature stores given")
        self.paths = [Path(p) for p in stores]
        opened = [open_store(p) for p in self.paths]
        first = opened[0]
        self.scale_names = tuple(first.scale_names)
        self.encoders = self._encoders(first)
        for st in opened[1:]:
            if tuple(st.scale_names) != self.scale_names:
                raise StoreError(
                    f"{str(st.path)!r} has scales {st.scale_names} but {str(first.path)!r} has "
                    f"{list(self.scale_names)}; stores must come from the same tiling"
                )
            enc = self._encoders(st)
            if enc != self.encoders:
                raise StoreError(
                    f"{str(st.path)!r} was encoded with {enc} but {str(first.path)!r} with {self.encoders}; "
                    "stores must come from the same encoders and weights"
                )
        self.ids = [st.slide_id for st in opened]
        self.untrained = any(bool(st.attrs.get("untrained")) for st in opened)
        dup = sorted({s for s in self.ids if self.ids.count(s) > 1})
        if dup:
            raise StoreError(f"several stores hold slide {', '.join(map(repr, dup))}")
        self.dims = {n: int(str(v["embedding_dim"])) for n, v in self.encoders.items()}

    @staticmethod
    def _encoders(st: FeatureStore) -> dict[str, dict[str, object]]:
        """Encoder name -> weights hash and dimension, from the feature arrays themselves."""
        names = sorted({e for s in st.scale_names for e in st.encoders(s)})
        out: dict[str, dict[str, object]] = {}
        for n in names:
            a = st.encoder_attrs(n)
            out[n] = {"weights_sha256": a.get("weights_sha256"), "embedding_dim": a.get("embedding_dim")}
        if not out:
            raise StoreError(f"{str(st.path)!r} holds no features (run 'encode' first)")
        return out

    @property
    def dim(self) -> int:
        return sum(self.dims.values())

    def path_of(self, slide_id: str) -> Path:
        return self.paths[self.ids.index(slide_id)]

    def bag(self, slide_id: str) -> Bag:
        hit = self._cache.get(slide_id)
        if hit is not None:
            return hit
        bag = self._read(slide_id)
        size = bag.features.nbytes + bag.coords.nbytes + bag.scale.nbytes
        if self._cache_bytes + size <= self._budget:
            self._cache[slide_id] = bag
            self._cache_bytes += size
        return bag

    def _read(self, slide_id: str) -> Bag:
        st = open_store(self.path_of(slide_id))
        feats, scales, coords = [], [], []
        for s, name in enumerate(self.scale_names):
            sv = st.scale(name)
            n = len(sv.coords)
            if n == 0:
                continue
            feats.append(np.concatenate([st.features(name, e) for e in self.encoders], axis=1))
            scales.append(np.full(n, s, np.int64))
            coords.append(sv.coords)
        if not feats:
            return Bag(
                slide_id,
                np.zeros((0, self.dim), np.float32),
                np.zeros(0, np.int64),
                np.zeros((0, 2), np.int32),
                self.scale_names,
            )
        return Bag(
            slide_id, np.concatenate(feats), np.concatenate(scales), np.concatenate(coords), self.scale_names
        )

    def bags(self, slide_ids: Sequence[str]) -> Iterator[Bag]:
        for s in slide_ids:
            yield self.bag(s)


def match_labels(
    labels: Mapping[str, str], ids: Sequence[str], *, classes: Sequence[str] | None = None
) -> list[str]:
    """The slide ids that have both a store and a label, in sorted order.

    Raises
    ------
    ConfigError
        Labelled slides without a store, labels outside ``classes``, or fewer than two
        classes among the labels.
    """
    missing = sorted(set(labels) - set(ids))
    if missing:
        raise ConfigError(f"label sheet names slides without a feature store: {', '.join(missing)}")
    if classes is not None:
        bad = sorted(set(labels.values()) - set(classes))
        if bad:
            raise ConfigError(f"labels {bad} are not classes of the bag ({', '.join(classes)})")
    present = sorted(set(labels.values()))
    if len(present) < 2:
        raise ConfigError(f"a head needs at least two classes among the labels; found {present}")
    return sorted(s for s in ids if s in labels)
