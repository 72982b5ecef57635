"""One image-text space: a store's features and the text embeddings they are scored
against must come from the same encoder's weights, be projected into the joint space, and
have the same width; checked before any scoring (refused in one line naming the store)."""

from __future__ import annotations

from typing import Any

from ..errors import StoreError
from ..features.store import FeatureStore
from .text import TextEmbeddings

__all__ = ["check_compatible"]


def check_compatible(store: FeatureStore, text: TextEmbeddings, scales: list[str]) -> None:
    """The store holds every configured scale and features from the same weights as the text."""
    for s in scales:
        if s not in store.scale_names:
            raise StoreError(
                f"{str(store.path)!r} has no scale {s} (it has {', '.join(store.scale_names) or 'none'}); "
                "re-run tiling and encoding with the configured scales_mpp"
            )
    for enc, t in text.encoders.items():
        try:
            attrs = store.encoder_attrs(enc)
        except StoreError:
            if all(len(store.scale(s).coords) == 0 for s in scales):
                continue
            raise
        if attrs.get("weights_sha256") != t.weights_sha256:
            raise StoreError(
                f"{str(store.path)!r}: features of encoder {enc!r} come from weights "
                f"{attrs.get('weights_sha256')} but the text embeddings from {t.weights_sha256}; "
                "stores from different encoders or weights cannot be scored together"
            )
        _check_space(store, enc, attrs, t.emb.shape[1], scales)


def _check_space(store: FeatureStore, enc: str, attrs: Any, text_dim: int, scales: list[str]) -> None:
    """Image features and text embeddings must live in one space: the same width, and
    features recorded as projected (a store whose features skip the projection head is
    refused, never scored)."""
    space = attrs.get("space") if isinstance(attrs, dict) else None
    if isinstance(space, dict) and space.get("projected") is False:
        raise StoreError(
            f"{str(store.path)!r}: features of encoder {enc!r} are recorded as not projected into the "
            "joint image-text space; re-encode them with the projection head"
        )
    for s in scales:
        width = store.features_array(s, enc).shape[1]
        if width != text_dim:
            raise StoreError(
                f"{str(store.path)!r}: {s}/features/{enc} have width {width} but the text embeddings "
                f"{text_dim}: not one image-text space (a projection head dropped?); re-encode"
            )
