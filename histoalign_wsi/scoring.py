"""Slide scoring: tile logits per scale (alignment + late encoder fusion, optional cohort
calibration), MIL pooling per scale, scale-aware fusion, predictions and tile scores."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from ._atomic import atomic_file
from .alignment import class_logits, fuse_encoders
from .config import Config
from .errors import StoreError
from .pooling import add_parent_context, fuse_scales, pool, softmax
from .store import FeatureStore
from .text import TextEmbeddings
from .tiling import scale_name

__all__ = ["NO_TISSUE", "SlideScores", "check_compatible", "score_store", "tile_logits", "write_scores"]

log = logging.getLogger(__name__)

NO_TISSUE = "no tissue"


@dataclass(frozen=True)
class SlideScores:
    prediction: dict[str, Any]
    tiles: pd.DataFrame


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


def tile_logits(store: FeatureStore, scale: str, text: TextEmbeddings, cfg: Config) -> NDArray[np.float32]:
    """Fused class logits [N, K] of one scale's tiles."""
    k = len(text.classes)
    n = store.features_array(scale, next(iter(text.encoders))).shape[0]
    if n == 0:
        return np.zeros((0, k), np.float32)
    rule = "centroid" if cfg.pooling.conch_protocol else cfg.alignment.rule
    per = {
        name: class_logits(
            store.features(scale, name),
            t,
            k,
            rule=rule,
            temperature=cfg.alignment.temperature,
            topk=cfg.alignment.topk,
        )
        for name, t in text.encoders.items()
    }
    return fuse_encoders(per, cfg.encoder_weights)


def _scale_weights(cfg: Config, names: list[str]) -> dict[str, float]:
    w = cfg.pooling.scale_weights or tuple(1.0 for _ in names)
    return dict(zip(names, w, strict=True))


def score_store(
    store: FeatureStore,
    text: TextEmbeddings,
    cfg: Config,
    *,
    calibration: Mapping[str, list[float]] | None = None,
) -> SlideScores:
    """Score one slide."""
    names = [scale_name(m) for m in cfg.tiling.scales_mpp]
    check_compatible(store, text, names)
    if cfg.pooling.conch_protocol and text.descriptions:
        raise StoreError(
            "pooling.conch_protocol needs text embedded from names x templates only "
            "(embed-prompts with the same config)"
        )
    classes = list(text.classes)
    logits: dict[str, NDArray[np.float32]] = {}
    for s in names:
        lg = tile_logits(store, s, text, cfg)
        if calibration is not None and s in calibration and len(lg):
            lg = lg - np.asarray(calibration[s], np.float32)[None, :]
        logits[s] = lg
    method = "topk" if cfg.pooling.conch_protocol else cfg.pooling.method
    pooled: dict[str, NDArray[np.float32] | None] = {
        s: pool(lg, method=method, k=cfg.pooling.topk, temperature=cfg.pooling.soft_temperature)
        if len(lg)
        else None
        for s, lg in logits.items()
    }
    fused = fuse_scales(pooled, _scale_weights(cfg, names))
    views = {s: store.scale(s) for s in names}
    rows = []
    for i, s in enumerate(names):
        sv = views[s]
        lg = logits[s]
        parents = [(sv.parents[c], logits[c]) for c in names[i + 1 :] if c in sv.parents]
        ctx = add_parent_context(lg, parents, cfg.pooling.parent_context)
        pr = softmax(ctx) if len(ctx) else ctx
        df = pd.DataFrame(
            {
                "scale": s,
                "mpp": sv.mpp,
                "x": sv.coords[:, 0],
                "y": sv.coords[:, 1],
                "size0": sv.size0,
                "tissue_fraction": sv.tissue_fraction.astype(np.float32),
            }
        )
        for k, c in enumerate(classes):
            df[f"prob_{c}"] = pr[:, k] if len(pr) else np.zeros(0, np.float32)
            df[f"logit_{c}"] = ctx[:, k] if len(ctx) else np.zeros(0, np.float32)
        rows.append(df)
    tiles = pd.concat(rows, ignore_index=True)
    encoders = [
        {
            "name": n,
            "weights_sha256": t.weights_sha256,
            "untrained": t.untrained,
            "weight": float(cfg.encoder_weights.get(n, 1.0)),
        }
        for n, t in text.encoders.items()
    ]
    untrained = any(t.untrained for t in text.encoders.values()) or bool(store.attrs.get("untrained"))
    pred: dict[str, Any] = {
        "slide_id": store.slide_id,
        "slide_path": store.attrs["slide"]["path"],
        "prompt_bag": {"name": text.bag_name, "hash": text.bag_hash},
        "classes": classes,
        "colors": {c: list(text.colors[c]) for c in classes},
        "encoders": encoders,
        "untrained": untrained,
        "alignment": {"rule": "centroid" if cfg.pooling.conch_protocol else cfg.alignment.rule},
        "pooling": {
            "method": method,
            "topk": cfg.pooling.topk,
            "conch_protocol": cfg.pooling.conch_protocol,
            "scale_weights": _scale_weights(cfg, names),
            "parent_context": cfg.pooling.parent_context,
        },
        "calibrated": calibration is not None,
        "per_scale": {
            s: {
                "n_tiles": len(logits[s]),
                "pooled_logits": None
                if pooled[s] is None
                else dict(zip(classes, map(float, pooled[s]), strict=True)),  # type: ignore[arg-type]
                "probabilities": None
                if pooled[s] is None
                else dict(zip(classes, map(float, softmax(pooled[s])), strict=True)),  # type: ignore[arg-type]
            }
            for s in names
        },
    }
    if fused is None:
        pred.update(status="no_tissue", predicted_class=NO_TISSUE, probabilities=None, top_tiles=[])
    else:
        probs = softmax(fused)
        best = int(np.argmax(probs))
        pred.update(
            status="ok",
            predicted_class=classes[best],
            probabilities=dict(zip(classes, map(float, probs), strict=True)),
        )
        fine = tiles[tiles["scale"] == names[0]]
        col = f"prob_{classes[best]}"
        top = fine.nlargest(cfg.pooling.top_tiles, col) if len(fine) else fine
        pred["top_tiles"] = [
            {
                "scale": r.scale,
                "x": int(r.x),  # type: ignore[arg-type]
                "y": int(r.y),  # type: ignore[arg-type]
                "size0": int(r.size0),  # type: ignore[arg-type]
                "probability": float(getattr(r, col)),
            }
            for r in top.itertuples()
        ]
    return SlideScores(pred, tiles)


def write_scores(scores: SlideScores, pred_json: str | Path, tiles_parquet: str | Path) -> None:
    """Write the prediction JSON and the tile-score table, each atomically."""
    with atomic_file(tiles_parquet) as tmp:
        scores.tiles.to_parquet(tmp, index=False)
    with atomic_file(pred_json) as tmp:
        tmp.write_text(json.dumps(scores.prediction, indent=2))
