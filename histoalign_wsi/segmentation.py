"""Segmentation evaluation: Dice and IoU per class of the thresholded tile probabilities
against ground truth (PNG masks at a stated scale, or GeoJSON polygons)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import shapely
from numpy.typing import NDArray
from PIL import Image
from skimage.draw import polygon as draw_polygon

from .errors import ConfigError
from .evaluation import dice_iou
from .raster import probability_raster

__all__ = ["evaluate_segmentation", "load_truth"]


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


def evaluate_segmentation(
    tile_scores: str | Path,
    truth: str | Path,
    *,
    classes: list[str],
    threshold: float = 0.5,
    dims: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Dice/IoU per class present in the ground truth, on the truth's raster."""
    df = pd.read_parquet(tile_scores)
    fine = df[df["mpp"] == df["mpp"].min()] if len(df) else df
    masks, scale = load_truth(truth, dims)
    shape = next(iter(masks.values())).shape
    probs, count = probability_raster(fine, classes, shape=shape, scale=scale)
    out: dict[str, Any] = {}
    for k, c in enumerate(classes):
        if c in masks:
            out[c] = dice_iou((probs[k] >= threshold) & (count > 0.5), masks[c])
    return {"threshold": threshold, "per_class": out}
