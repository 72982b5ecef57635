"""QuPath GeoJSON export, streamed: every tile as a ``tile`` object with per-class
probability measurements, class regions (probability above a threshold) and tissue
outlines as ``annotation`` (Multi)Polygons, all in level-0 pixels."""

from __future__ import annotations

import gzip
import io
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import shapely
from shapely.geometry import mapping
from skimage import transform

from .._atomic import atomic_file
from .._progress import Progress
from ..slides.geometry import mask_to_polygons
from ..zeroshot import tile_scores
from ..zeroshot.tile_scores import TileScores

__all__ = ["REGION_MODES", "class_regions", "export_geojson"]

_NS = uuid.UUID("6f1c2a53-3d1e-4b8e-9a57-2f0c6b1d9e44")


def _id(*parts: object) -> str:
    # deterministic UUIDs: identical inputs give byte-identical files
    return str(uuid.uuid5(_NS, "/".join(map(str, parts))))


def _feature(fid: str, geom: Mapping[str, Any], props: Mapping[str, Any]) -> str:
    return json.dumps(
        {"type": "Feature", "id": fid, "geometry": geom, "properties": props}, separators=(",", ":")
    )


REGION_MODES = ("argmax", "threshold")


def class_regions(
    scores: TileScores,
    *,
    mode: str,
    threshold: float,
    bounds: tuple[int, int],
    simplify: float,
    upsample: int = 4,
) -> list[shapely.MultiPolygon]:
    """One region per class, in class order (empty where the class has none).

    The finest tiles' probabilities form a grid per class (one cell per tile) plus a
    coverage grid; each is interpolated bilinearly ``upsample`` times finer, so outlines
    follow the probability field between tile centres instead of tile edges. ``argmax``
    (default) gives each covered cell to its most probable class, so every slide with
    tiles has regions whatever the probabilities; ``threshold`` keeps cells where the
    class's probability reaches ``threshold``.
    """
    k = len(scores.classes)
    tab = scores.table
    if len(tab) == 0:
        return [shapely.MultiPolygon() for _ in range(k)]
    size = int(tab["size0"].iloc[0])
    gx, gy = (tab["x"].to_numpy() // size), (tab["y"].to_numpy() // size)
    grid = np.zeros((k + 1, bounds[1] // size + 1, bounds[0] // size + 1), np.float32)
    grid[:k, gy, gx] = scores.probs().T
    grid[k, gy, gx] = 1.0
    shape = (k + 1, grid.shape[1] * upsample, grid.shape[2] * upsample)
    fine = transform.resize(grid, shape, order=1, mode="edge", anti_aliasing=False)
    covered = fine[k] >= 0.5
    if mode == "argmax":
        best = fine[:k].argmax(axis=0)
        masks = [covered & (best == c) for c in range(k)]
    elif mode == "threshold":
        masks = [fine[c] >= threshold for c in range(k)]
    else:
        raise ValueError(f"unknown region mode {mode!r} (choose {', '.join(REGION_MODES)})")
    return [mask_to_polygons(m, scale=size / upsample, simplify=simplify, bounds=bounds) for m in masks]


def export_geojson(
    tile_scores_path: str | Path,
    out: str | Path,
    *,
    colors: Mapping[str, tuple[int, int, int]],
    level0_dims: tuple[int, int],
    mpp: float | None = None,
    tissue_polygons: Mapping[str, Any] | None = None,
    regions: str = "argmax",
    threshold: float = 0.5,
    simplify_px: float = 1.0,
    gzip_output: bool | None = None,
    attention: Mapping[tuple[int, int], float] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Stream the FeatureCollection to ``out`` (gzip when it ends in ``.gz``); region
    areas are also given in µm² when the level-0 ``mpp`` is known. ``provenance`` (what it
    was made from) goes in a foreign member ``histoalign`` (RFC 7946, 6.1), which QuPath
    ignores."""
    out = Path(out)
    gz = out.name.endswith(".gz") if gzip_output is None else gzip_output
    with (
        atomic_file(out) as tmp,
        gzip.open(tmp, "wt", encoding="utf-8") if gz else tmp.open("w", encoding="utf-8") as fh,
    ):
        _write(
            fh,
            Path(tile_scores_path),
            colors,
            level0_dims,
            tissue_polygons,
            _RegionSpec(
                regions, threshold, simplify_px, mpp, dict(attention) if attention is not None else None
            ),
            members={"histoalign": {"provenance": dict(provenance) if provenance is not None else None}},
        )
    return out


@dataclass(frozen=True)
class _RegionSpec:
    mode: str
    threshold: float
    simplify: float
    mpp: float | None
    attention: dict[tuple[int, int], float] | None = None


def _write(
    fh: TextIO | io.TextIOWrapper,
    path: Path,
    colors: Mapping[str, tuple[int, int, int]],
    dims: tuple[int, int],
    tissue: Mapping[str, Any] | None,
    spec: _RegionSpec,
    members: Mapping[str, Any] | None = None,
) -> None:
    fh.write('{"type":"FeatureCollection","features":[')
    first = True

    def emit(s: str) -> None:
        nonlocal first
        fh.write(s if first else "," + s)
        first = False

    scores = tile_scores.read(path)
    slide_id, classes, t = scores.slide_id, list(scores.classes), scores.table
    if members is not None and "histoalign" in members:
        # made with an untrained (demo) encoder: QuPath users see it in the file itself
        members = {**members, "histoalign": {**members["histoalign"], "untrained": scores.untrained}}
    att = spec.attention
    cols = (t["x"].tolist(), t["y"].tolist(), t["size0"].tolist(), scores.probs().tolist())
    bar = Progress(len(t), desc=f"export-geojson {slide_id}")
    for i, (x, y, s, pr) in enumerate(zip(*cols, strict=True)):
        if i % 1000 == 999:
            bar.update(1000)
        best = int(np.argmax(pr))
        props = {
            "objectType": "tile",
            "name": f"{slide_id} tile {x},{y}",
            "classification": {"name": classes[best], "color": list(colors[classes[best]])},
            "measurements": {f"prob_{c}": float(p) for c, p in zip(classes, pr, strict=True)}
            | ({"attention": att.get((x, y), 0.0)} if att is not None else {}),
            "isLocked": True,
        }
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        emit(_feature(_id(slide_id, "tile", x, y, s), {"type": "Polygon", "coordinates": [ring]}, props))
    bar.update(len(t) % 1000)
    bar.close()
    regions = class_regions(
        scores, mode=spec.mode, threshold=spec.threshold, bounds=dims, simplify=spec.simplify
    )
    how = "most probable class" if spec.mode == "argmax" else f"p >= {spec.threshold:g}"
    for c, region in zip(classes, regions, strict=True):
        if region.is_empty:
            continue
        area: dict[str, float] = {"area_px": float(region.area)}
        if spec.mpp:
            area["area_um2"] = float(region.area) * spec.mpp**2
        props = {
            "objectType": "annotation",
            "name": f"{c} ({how})",
            "classification": {"name": c, "color": list(colors[c])},
            "isLocked": True,
            "measurements": area,
        }
        emit(_feature(_id(slide_id, "region", c), mapping(region), props))
    if tissue:
        geom = shapely.geometry.shape(dict(tissue))
        geom = shapely.make_valid(geom).intersection(shapely.box(0, 0, dims[0], dims[1]))
        if not geom.is_empty:
            props = {
                "objectType": "annotation",
                "name": "tissue",
                "classification": {"name": "Tissue", "color": [60, 60, 60]},
                "isLocked": True,
            }
            emit(_feature(_id(slide_id, "tissue"), mapping(geom), props))
    more = "".join(
        f",{json.dumps(k)}:{json.dumps(v, ensure_ascii=False)}" for k, v in (members or {}).items()
    )
    fh.write(f"]{more}}}\n")
