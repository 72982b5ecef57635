"""Slide scoring: tile logits per scale (alignment + late encoder fusion, optional cohort
calibration), MIL pooling per scale, scale-aware fusion, predictions and tile scores."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from ..config import Config
from ..errors import StoreError
from ..features.store import FeatureStore
from ..slides.tiling import scale_name
from . import tile_scores
from .alignment import AlignmentSpec, fused_logits
from .calibration import CalibrationOffsets
from .keep import Screening
from .pooling import add_parent_context, fuse_scales, pool, softmax
from .prediction import NO_TILES, NO_TISSUE, Prediction
from .space import check_compatible
from .text import TextEmbeddings
from .tile_scores import BASE_COLUMNS, TileScores, class_columns

__all__ = ["SlideScores", "check_compatible", "score_store", "tile_logits", "write_scores"]


@dataclass(frozen=True)
class SlideScores:
    prediction: Prediction
    tiles: TileScores


def tile_logits(
    store: FeatureStore, scale: str, text: TextEmbeddings, spec: AlignmentSpec
) -> NDArray[np.float32]:
    """Fused class logits [N, K] of one scale's tiles."""
    n = store.features_array(scale, next(iter(text.encoders))).shape[0]
    if n == 0:
        return np.zeros((0, len(text.classes)), np.float32)
    return fused_logits({name: store.features(scale, name) for name in text.encoders}, text, spec)


def _scale_weights(cfg: Config, names: list[str]) -> dict[str, float]:
    w = cfg.pooling.scale_weights or tuple(1.0 for _ in names)
    return dict(zip(names, w, strict=True))


def score_store(
    store: FeatureStore,
    text: TextEmbeddings,
    cfg: Config,
    *,
    calibration: CalibrationOffsets | None = None,
    screening: Screening | None = None,
) -> SlideScores:
    """Score one slide by ``cfg.protocol`` (``calibration``, when given, must match the
    text and the rule; the CONCH and KEEP protocols refuse it; ``screening`` is KEEP's
    screened prompt sets, needed when ``keep.screening`` is on)."""
    if text.protocol != cfg.protocol:
        raise StoreError(
            f"the text embeddings were made for protocol {text.protocol!r} but scoring uses "
            f"{cfg.protocol!r}; re-run embed-prompts with the same configuration"
        )
    if cfg.protocol == "conch":
        if calibration is not None:
            raise StoreError("protocol: conch has no calibration; score without calibration offsets")
        return _score_conch(store, text, cfg)
    if cfg.protocol == "keep":
        if calibration is not None:
            raise StoreError("protocol: keep has no calibration; score without calibration offsets")
        return _score_keep(store, text, cfg, screening)
    return _score_histoalign(store, text, cfg, calibration)


def _score_histoalign(
    store: FeatureStore, text: TextEmbeddings, cfg: Config, calibration: CalibrationOffsets | None
) -> SlideScores:
    """Every scale, every encoder fused late, optional calibration, MIL pooling per scale,
    scale-aware fusion, parent context for tile scores."""
    names = [scale_name(m) for m in cfg.tiling.scales_mpp]
    check_compatible(store, text, names)
    spec = AlignmentSpec.from_config(cfg)
    if calibration is not None:
        calibration.check(text, spec)
    logits: dict[str, NDArray[np.float32]] = {}
    for s in names:
        lg = tile_logits(store, s, text, spec)
        if calibration is not None:
            lg = lg - calibration.offset(s, slide_id=store.slide_id)[None, :]
        logits[s] = lg
    p = cfg.pooling
    pooled: dict[str, NDArray[np.float32] | None] = {
        s: pool(lg, method=p.method, k=p.topk, temperature=p.soft_temperature) if len(lg) else None
        for s, lg in logits.items()
    }
    weights = _scale_weights(cfg, names)
    return _result(
        store,
        text,
        cfg,
        fuse_scales(pooled, weights),
        _tile_table(store, names, logits, list(text.classes), p.parent_context),
        {s: _scale_summary(len(logits[s]), pooled[s], list(text.classes)) for s in names},
        alignment={"protocol": "histoalign", "rule": spec.rule},
        pooling={
            "method": p.method,
            "topk": p.topk,
            "soft_temperature": p.soft_temperature,
            "scale_weights": weights,
            "parent_context": p.parent_context,
        },
        calibrated=calibration is not None,
    )


def _score_conch(store: FeatureStore, text: TextEmbeddings, cfg: Config) -> SlideScores:
    """CONCH's protocol (its prompt ensemble, MI-Zero's top-j pooling): one encoder, one
    magnification, centroid of CONCH's templates x class names, top-j mean of the tile
    logits for every reported j; the configured j makes the prediction."""
    if len(text.encoders) != 1:
        raise StoreError(f"protocol: conch scores with one encoder; the text has {sorted(text.encoders)}")
    s = scale_name(cfg.conch.scale_mpp)
    check_compatible(store, text, [s])
    classes = list(text.classes)
    lg = tile_logits(store, s, text, AlignmentSpec.from_config(cfg))
    js = sorted({*cfg.conch.report_topj, cfg.conch.topj})
    by_j = {j: pool(lg, method="topk", k=j, temperature=1.0) if len(lg) else None for j in js}
    topj: dict[str, Any] = {}
    dec = [classes[k] for k in text.decision]
    for j, v in by_j.items():
        probs = None if v is None else softmax(v[text.decision])
        topj[str(j)] = {
            "predicted_class": None if probs is None else dec[int(np.argmax(probs))],
            "probabilities": None if probs is None else dict(zip(dec, map(float, probs), strict=True)),
        }
    chosen = by_j[cfg.conch.topj]
    return _result(
        store,
        text,
        cfg,
        chosen,
        _tile_table(store, [s], {s: lg}, classes, 0.0),
        {s: _scale_summary(len(lg), chosen, classes)},
        alignment={"protocol": "conch", "rule": "centroid"},
        pooling={"method": "topk", "topj": cfg.conch.topj, "scale_mpp": cfg.conch.scale_mpp},
        calibrated=False,
        extra={"topj": topj},
    )


def _score_keep(
    store: FeatureStore, text: TextEmbeddings, cfg: Config, screening: Screening | None
) -> SlideScores:
    """KEEP's protocol (:mod:`.keep`): one encoder, one magnification, the screened
    prompt sets' classifier, neighbour smoothing and the tile vote, each switchable."""
    from .keep import classifier, prompt_sets, smooth, vote

    k = cfg.keep
    if len(text.encoders) != 1:
        raise StoreError(f"protocol: keep scores with one encoder; the text has {sorted(text.encoders)}")
    name, t = next(iter(text.encoders.items()))
    s = scale_name(k.scale_mpp)
    check_compatible(store, text, [s])
    every = list(text.classes)
    used = [i for i, c in enumerate(every) if k.other_classes or c not in text.other]
    if k.screening:
        if screening is None:
            raise StoreError(
                "protocol: keep with keep.screening needs the screened prompt sets (run 'screen-prompts')"
            )
        screening.check(text.bag_hash, name, t.weights_sha256, [every[i] for i in used])
        sets = [screening.sets[j] for j in screening.selected]
    else:
        sets = prompt_sets(t.cls, used, max_sets=k.max_sets, seed=k.seed)
    n = store.features_array(s, name).shape[0]
    feats = store.features(s, name) if n else np.zeros((0, t.emb.shape[1]), np.float32)
    raw = feats @ classifier(t.emb, sets).T  # cosine logits [N, K used]
    sv = store.scale(s)
    lg = smooth(raw, sv.coords, int(sv.size0)) if k.smoothing and len(raw) else raw
    full = np.full((len(lg), len(every)), -1e4, np.float32)  # a class left out never wins a tile
    full[:, used] = lg
    tiles = _tile_table(store, [s], {s: full * np.float32(t.logit_scale)}, every, 0.0)
    decisions = np.asarray(used)[lg.argmax(axis=1)] if len(lg) else np.zeros(0, np.intp)
    probs: NDArray[np.float64] | None = None
    if len(lg):
        if k.vote:
            _, share = vote(decisions, len(every), text.decision)
            probs = share / share.sum() if share.sum() > 0 else np.full(len(share), 1 / len(share))
        else:
            p = softmax(full * np.float32(t.logit_scale)).mean(axis=0)[text.decision]
            probs = p / p.sum()
    return _result(
        store,
        text,
        cfg,
        None if probs is None else np.log(np.maximum(probs, 1e-12)).astype(np.float32),
        tiles,
        {s: _scale_summary(len(lg), None if probs is None else full.mean(axis=0), every)},
        alignment={"protocol": "keep", "prompt_sets": len(sets), "screened": k.screening},
        pooling={
            "method": "vote" if k.vote else "mean_probability",
            "smoothing": k.smoothing,
            "other_classes": k.other_classes,
            "scale_mpp": k.scale_mpp,
        },
        calibrated=False,
        decided=probs,
    )


def _result(
    store: FeatureStore,
    text: TextEmbeddings,
    cfg: Config,
    fused: NDArray[np.float32] | None,
    tiles: pd.DataFrame,
    per_scale: dict[str, dict[str, Any]],
    *,
    alignment: dict[str, Any],
    pooling: dict[str, Any],
    calibrated: bool,
    extra: dict[str, Any] | None = None,
    decided: NDArray[np.float64] | None = None,
) -> SlideScores:
    """The prediction (class, probabilities, top tiles) from the fused slide logits over
    every class; the slide decides among the decision classes only ("other tissue"
    classes stay in the tile table and the heatmaps)."""
    every = list(text.classes)
    decision = text.decision
    classes = [every[k] for k in decision]
    finest = str(tiles["scale"].iloc[0]) if len(tiles) else next(iter(per_scale))
    if fused is None:
        status = _no_tiles_status(store, next(iter(per_scale)))
        predicted, probabilities, top = NO_TILES if status == "no_tiles" else NO_TISSUE, None, []
    else:
        probs = decided if decided is not None else softmax(fused[decision])
        if not np.isfinite(probs).all():
            raise StoreError(
                f"slide {store.slide_id!r}: non-finite probabilities from store {str(store.path)!r} "
                "(its features or the prompt embeddings hold NaN or infinity); re-encode it"
            )
        best = int(np.argmax(probs))
        status, predicted = "ok", classes[best]
        probabilities = dict(zip(classes, map(float, probs), strict=True))
        top = _top_tiles(tiles, finest, decision[best], cfg.pooling.top_tiles)
        extra = {**(extra or {}), "region_area_mm2": _region_areas(store, tiles, finest, every)}
    encoders = [
        {
            "name": n,
            "weights_sha256": t.weights_sha256,
            "untrained": t.untrained,
            "weight": float(cfg.encoder_weights.get(n, 1.0)),
        }
        for n, t in text.encoders.items()
    ]
    pred = Prediction(
        slide_id=store.slide_id,
        slide_path=str(store.attrs["slide"]["path"]),
        classes=tuple(classes),
        colors={c: text.colors[c] for c in every},
        status=status,
        predicted_class=predicted,
        probabilities=probabilities,
        prompt_bag={"name": text.bag_name, "hash": text.bag_hash}
        | ({"ordered": True} if text.ordered else {}),
        encoders=encoders,
        untrained=any(t.untrained for t in text.encoders.values()) or bool(store.attrs.get("untrained")),
        alignment=alignment,
        pooling=pooling,
        calibrated=calibrated,
        per_scale=per_scale,
        top_tiles=top,
        extra=extra or {},
    )
    if text.other:
        pred = dataclasses.replace(pred, extra={**pred.extra, "other_classes": list(text.other)})
    return SlideScores(pred, TileScores(store.slide_id, tuple(every), tiles, pred.untrained))


def _scale_summary(n: int, pooled: NDArray[np.float32] | None, classes: list[str]) -> dict[str, Any]:
    if pooled is None:
        return {"n_tiles": n, "pooled_logits": None, "probabilities": None}
    return {
        "n_tiles": n,
        "pooled_logits": dict(zip(classes, map(float, pooled), strict=True)),
        "probabilities": dict(zip(classes, map(float, softmax(pooled)), strict=True)),
    }


def _region_areas(
    store: FeatureStore, tiles: pd.DataFrame, finest: str, classes: list[str]
) -> dict[str, float]:
    """Tissue area (mm²) of each class's argmax region at the finest scale (tiles there do
    not overlap); classes without a region are left out."""
    fine = tiles[tiles["scale"] == finest]
    probs = fine[class_columns(classes, "prob")].to_numpy()
    counts = (
        np.bincount(probs.argmax(axis=1), minlength=len(classes)) if len(fine) else np.zeros(len(classes))
    )
    side_mm = float(fine["size0"].iloc[0]) * float(store.attrs["slide"]["mpp"]) / 1000 if len(fine) else 0.0
    return {c: float(n) * side_mm**2 for c, n in zip(classes, counts, strict=True) if n}


def _no_tiles_status(store: FeatureStore, finest: str) -> str:
    """``no_tiles`` when the slide is smaller than one tile of the finest scale, else ``no_tissue``."""
    w, h = store.attrs["slide"]["level0_dims"]
    return "no_tiles" if min(int(w), int(h)) < store.scale(finest).size0 else "no_tissue"


def _tile_table(
    store: FeatureStore,
    names: list[str],
    logits: dict[str, NDArray[np.float32]],
    classes: list[str],
    parent_context: float,
) -> pd.DataFrame:
    """Every scale's tiles with probabilities and logits (after parent context)."""
    prob_cols, logit_cols = class_columns(classes, "prob"), class_columns(classes, "logit")
    rows = []
    for i, s in enumerate(names):
        sv = store.scale(s)
        parents = [(sv.parents[c], logits[c]) for c in names[i + 1 :] if c in sv.parents]
        ctx = add_parent_context(logits[s], parents, parent_context)
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
        probs = pd.DataFrame(pr.reshape(-1, len(classes)), columns=prob_cols, dtype=np.float32)
        lgs = pd.DataFrame(ctx.reshape(-1, len(classes)), columns=logit_cols, dtype=np.float32)
        rows.append(pd.concat([df, probs, lgs], axis=1))
    return pd.concat(rows, ignore_index=True)


def _top_tiles(tiles: pd.DataFrame, finest: str, best: int, n: int) -> list[dict[str, Any]]:
    """The ``n`` finest-scale tiles most probable for class ``best``."""
    fine = tiles[tiles["scale"] == finest]
    col = fine.columns[len(BASE_COLUMNS) + best]
    top = fine.nlargest(n, col) if len(fine) else fine
    return [
        {"scale": finest, "x": int(x), "y": int(y), "size0": int(z), "probability": float(p)}
        for x, y, z, p in zip(top["x"], top["y"], top["size0"], top[col], strict=True)
    ]


def write_scores(scores: SlideScores, pred_json: str | Path, tiles_parquet: str | Path) -> None:
    """Write the tile-score table and the prediction JSON, each atomically."""
    tile_scores.write(scores.tiles, tiles_parquet)
    scores.prediction.write(pred_json)
