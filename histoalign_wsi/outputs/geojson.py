"""QuPath GeoJSON export, streamed: every tile as a ``tile`` object with per-class
probability measurements, class regions (probability above a threshold) and tissue
outlines as ``annotation`` (Multi)Polygons, all in level-0 pixels."""

from __future__ import annotations

import gzip
import io
import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import shapely
from shapely.geometry import mapping
from skimage import transform

from .._atomic import atomic_file
from ..slides.geometry import mask_to_polygons
from ..zeroshot import tile_scores
from ..zeroshot.tile_scores import TileScores

__all__ = ["export_geojson", "region_polygons"]

_NS = uuid.UUID("6f1c2a53-3d1e-4b8e-9a57-2f0c6b1d9e44")


def _id(*parts: object) -> str:
    # deterministic UUIDs: identical inputs give byte-identical files
    return str(uuid.uuid5(_NS, "/".join(map(str, parts))))


def _feature(fid: str, geom: Mapping[str, Any], props: Mapping[str, Any]) -> str:
    return json.dumps(
        {"type": "Feature", "id": fid, "geometry": geom, "properties": props}, separators=(",", ":")
    )


def region_polygons(
    scores: TileScores,
    k: int,
    *,
    threshold: float,
    bounds: tuple[int, int],
    simplify: float,
    upsample: int = 4,
) -> shapely.MultiPolygon:
    """Regions where class ``k``'s probability reaches ``threshold``.

    The finest tiles' probabilities form a grid (one cell per tile, 0 where no tile); it is
    interpolated bilinearly ``upsample`` times finer, so region outlines follow the
    probability field between tile centres instead of tile edges, then traced and scaled
    to level 0.
    """
    tab = scores.table
    if len(tab) == 0:
        return shapely.MultiPolygon()
    size = int(tab["size0"].iloc[0])
    gx, gy = (tab["x"].to_numpy() // size), (tab["y"].to_numpy() // size)
    grid = np.zeros((bounds[1] // size + 1, bounds[0] // size + 1), np.float32)
    grid[gy, gx] = scores.probs()[:, k]
    fine = transform.resize(
        grid, (grid.shape[0] * upsample, grid.shape[1] * upsample), order=1, mode="edge", anti_aliasing=False
    )
    return mask_to_polygons(fine >= threshold, scale=size / upsample, simplify=simplify, bounds=bounds)


def export_geojson(
    tile_scores_path: str | Path,
    out: str | Path,
    *,
    colors: Mapping[str, tuple[int, int, int]],
    level0_dims: tuple[int, int],
    tissue_polygons: Mapping[str, Any] | None = None,
    threshold: float = 0.5,
    simplify_px: float = 1.0,
    gzip_output: bool | None = None,
) -> Path:
    """Stream the FeatureCollection to ``out`` (gzip when it ends in ``.gz``)."""
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
            threshold,
            simplify_px,
        )
    return out


def _write(
    fh: TextIO | io.TextIOWrapper,
    path: Path,
    colors: Mapping[str, tuple[int, int, int]],
    dims: tuple[int, int],
    tissue: Mapping[str, Any] | None,
    threshold: float,
    simplify: float,
) -> None:
    fh.write('{"type":"FeatureCollection","features":[')
    first = True

    def emit(s: str) -> None:
        nonlocal first
        fh.write(s if first else "," + s)
        first = False

    scores = tile_scores.read(path)
    slide_id, classes, t = scores.slide_id, list(scores.classes), scores.table
    cols = (t["x"].tolist(), t["y"].tolist(), t["size0"].tolist(), scores.probs().tolist())
    for x, y, s, pr in zip(*cols, strict=True):
        best = int(np.argmax(pr))
        props = {
            "objectType": "tile",
            "name": f"{slide_id} tile {x},{y}",
            "classification": {"name": classes[best], "color": list(colors[classes[best]])},
            "measurements": {f"prob_{c}": float(p) for c, p in zip(classes, pr, strict=True)},
            "isLocked": True,
        }
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        emit(_feature(_id(slide_id, "tile", x, y, s), {"type": "Polygon", "coordinates": [ring]}, props))
    for k, c in enumerate(classes):
        region = region_polygons(scores, k, threshold=threshold, bounds=dims, simplify=simplify)
        if region.is_empty:
            continue
        props = {
            "objectType": "annotation",
            "name": f"{c} (p >= {threshold:g})",
            "classification": {"name": c, "color": list(colors[c])},
            "isLocked": True,
            "measurements": {"area_px": float(region.area)},
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
    fh.write("]}\n")
