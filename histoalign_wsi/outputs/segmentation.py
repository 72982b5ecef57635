"""Segmentation evaluation: Dice and IoU per class of the tiles' argmax (or thresholded)
segmentation against ground truth (PNG masks at a stated scale, or GeoJSON polygons)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from numpy.typing import NDArray
from PIL import Image
from skimage.draw import polygon as draw_polygon

from ..errors import ConfigError
from ..zeroshot.tile_scores import TileScores
from .metrics import dice_iou
from .raster import probability_raster

__all__ = ["MODES", "evaluate_segmentation", "load_truth"]


def _rasterize(geom: shapely.Geometry, shape: tuple[int, int], scale: float) -> NDArray[np.bool_]:
    out = np.zeros(shape, bool)
    polys = getattr(geom, "geoms", [geom])
    for p in polys:
        if p.is_empty or p.geom_type != "Polygon":
            continue
        ext = np.asarray(p.exterior.coords) / scale - 0.5
        rr, cc = draw_polygon(ext[:, 1], ext[:, 0], shape)
        out[rr, cc] = True
        for hole in p.interiors:
            h = np.asarray(hole.coords) / scale - 0.5
            rr, cc = draw_polygon(h[:, 1], h[:, 0], shape)
            out[rr, cc] = False
    return out


def load_truth(
    path: str | Path, dims: tuple[int, int] | None = None
) -> tuple[dict[str, NDArray[np.bool_]], float]:
    """``({class: mask}, level-0 px per mask px)`` from masks.json or a GeoJSON."""
    p = Path(path)
    raw = json.loads(p.read_text())
    if "masks" in raw:
        scale = float(raw["level0_px_per_mask_px"])
        return {c: np.asarray(Image.open(p.parent / f)) > 127 for c, f in raw["masks"].items()}, scale
    if raw.get("type") == "FeatureCollection":
        if dims is None:
            raise ConfigError(f"{p}: GeoJSON truth needs the slide dimensions")
        scale = max(1.0, max(dims) / 2048)
        shape = (int(np.ceil(dims[1] / scale)), int(np.ceil(dims[0] / scale)))
        masks: dict[str, NDArray[np.bool_]] = {}
        for f in raw["features"]:
            name = f.get("properties", {}).get("classification", {}).get("name")
            if name:
                m = _rasterize(shapely.geometry.shape(f["geometry"]), shape, scale)
                masks[name] = masks.get(name, np.zeros(shape, bool)) | m
        return masks, scale
    raise ConfigError(f"{p}: ground truth must be masks.json or a GeoJSON FeatureCollection")


MODES = ("argmax", "threshold")


def evaluate_segmentation(
    scores: TileScores,
    truth: str | Path,
    *,
    mode: str = "argmax",
    threshold: float = 0.5,
    dims: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Dice/IoU per class of the finest tiles' segmentation against ground truth, on the
    truth's raster.

    ``argmax`` (default) labels each covered pixel with its most probable class, so every
    tile lands in exactly one class; ``threshold`` takes ``p >= threshold`` per class.
    A class predicted somewhere but absent from the truth scores Dice 0 (its false
    positives count); a class absent from both is left out. ``dice_micro`` pools the
    intersections and areas of all classes, ``dice_macro`` averages the classes.
    """
    if mode not in MODES:
        raise ConfigError(f"segmentation mode {mode!r} is not one of {', '.join(MODES)}")
    fine = scores.finest()
    classes = list(fine.classes)
    masks, scale = load_truth(truth, dims)
    shape = next(iter(masks.values())).shape
    probs, count = probability_raster(fine, shape=shape, scale=scale)
    covered = count > 0.5
    best = probs.argmax(axis=0)
    per: dict[str, dict[str, float]] = {}
    inter_sum = area_sum = 0.0
    for k, c in enumerate(classes):
        pred = covered & ((best == k) if mode == "argmax" else (probs[k] >= threshold))
        t = masks.get(c, np.zeros(shape, bool))
        if not pred.any() and not t.any():
            continue
        per[c] = dice_iou(pred, t) | {"in_truth": bool(t.any())}
        inter_sum += float(np.logical_and(pred, t).sum())
        area_sum += float(pred.sum() + t.sum())
    return {
        "mode": mode,
        "threshold": threshold if mode == "threshold" else None,
        "per_class": per,
        "dice_macro": float(np.mean([v["dice"] for v in per.values()])) if per else None,
        "iou_macro": float(np.mean([v["iou"] for v in per.values()])) if per else None,
        "dice_micro": 2 * inter_sum / area_sum if area_sum else None,
        "truth_classes_not_scored": sorted(set(masks) - set(classes)),
    }
