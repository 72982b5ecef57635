"""QuPath GeoJSON export, streamed: every tile as a ``tile`` object with per-class
probability measurements, class regions (probability above a threshold) and tissue
outlines as ``annotation`` (Multi)Polygons, all in level-0 pixels."""

from __future__ import annotations

import gzip
import io
import json
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow.parquet as pq
import shapely
from shapely.geometry import mapping
from skimage import transform

from ._atomic import atomic_file
from .errors import HistoAlignError
from .geometry import mask_to_polygons

__all__ = ["export_geojson", "region_polygons"]

_NS = uuid.UUID("6f1c2a53-3d1e-4b8e-9a57-2f0c6b1d9e44")


def _id(*parts: object) -> str:
    # deterministic UUIDs: identical inputs give byte-identical files
    return str(uuid.uuid5(_NS, "/".join(map(str, parts))))


def _feature(fid: str, geom: Mapping[str, Any], props: Mapping[str, Any]) -> str:
    return json.dumps(
        {"type": "Feature", "id": fid, "geometry": geom, "properties": props}, separators=(",", ":")
    )


def _iter_fine(parquet: Path, classes: list[str], slide_id: str) -> Iterator[dict[str, Any]]:
    pf = pq.ParquetFile(parquet)
    cols = ["mpp", "x", "y", "size0"] + [f"prob_{c}" for c in classes]
    mpps = pq.read_table(parquet, columns=["mpp"]).column("mpp").to_numpy()
    if len(mpps) == 0:
        return
    finest = float(mpps.min())
    for batch in pf.iter_batches(batch_size=16384, columns=cols):
        d = batch.to_pydict()
        for i in range(batch.num_rows):
            if d["mpp"][i] != finest:
                continue
            probs = [d[f"prob_{c}"][i] for c in classes]
            if any(p is None or not np.isfinite(p) for p in probs):
                raise HistoAlignError(
                    f"slide {slide_id!r}: tile probabilities contain NaN; refusing to export"
                )
            yield {"x": int(d["x"][i]), "y": int(d["y"][i]), "size0": int(d["size0"][i]), "probs": probs}


def region_polygons(
    parquet: Path,
    classes: list[str],
    k: int,
    *,
    threshold: float,
    bounds: tuple[int, int],
    simplify: float,
    slide_id: str,
    upsample: int = 4,
) -> shapely.MultiPolygon:
    """Regions where class ``k``'s probability reaches ``threshold``.

    The finest tiles' probabilities form a grid (one cell per tile, 0 where no tile); it is
    interpolated bilinearly ``upsample`` times finer, so region outlines follow the
    probability field between tile centres instead of tile edges, then traced and scaled
    to level 0.
    """
    tab = pq.read_table(parquet, columns=["mpp", "x", "y", "size0", f"prob_{classes[k]}"]).to_pandas()
    if len(tab) == 0:
        return shapely.MultiPolygon()
    tab = tab[tab["mpp"] == tab["mpp"].min()]
    size = int(tab["size0"].iloc[0])
    gx, gy = (tab["x"].to_numpy() // size), (tab["y"].to_numpy() // size)
    grid = np.zeros((bounds[1] // size + 1, bounds[0] // size + 1), np.float32)
    grid[gy, gx] = tab[f"prob_{classes[k]}"].to_numpy()
    fine = transform.resize(
        grid, (grid.shape[0] * upsample, grid.shape[1] * upsample), order=1, mode="edge", anti_aliasing=False
    )
    return mask_to_polygons(fine >= threshold, scale=size / upsample, simplify=simplify, bounds=bounds)


def export_geojson(
    tile_scores: str | Path,
    out: str | Path,
    *,
    slide_id: str,
    classes: list[str],
    colors: Mapping[str, tuple[int, int, int]],
    level0_dims: tuple[int, int],
    tissue_polygons: Mapping[str, Any] | None = None,
    threshold: float = 0.5,
    simplify_px: float = 1.0,
    gzip_output: bool | None = None,
) -> Path:
    """Stream the FeatureCollection to ``out`` (gzip when it ends in ``.gz``)."""
    tile_scores, out = Path(tile_scores), Path(out)
    gz = out.name.endswith(".gz") if gzip_output is None else gzip_output
    with (
        atomic_file(out) as tmp,
        gzip.open(tmp, "wt", encoding="utf-8") if gz else tmp.open("w", encoding="utf-8") as fh,
    ):
        _write(
            fh,
            tile_scores,
            slide_id,
            classes,
            colors,
            level0_dims,
            tissue_polygons,
            threshold,
            simplify_px,
        )
    return out


def _write(
    fh: TextIO | io.TextIOWrapper,
    tile_scores: Path,
    slide_id: str,
    classes: list[str],
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

    for t in _iter_fine(tile_scores, classes, slide_id):
        x, y, s = t["x"], t["y"], t["size0"]
        best = int(np.argmax(t["probs"]))
        props = {
            "objectType": "tile",
            "name": f"{slide_id} tile {x},{y}",
            "classification": {"name": classes[best], "color": list(colors[classes[best]])},
            "measurements": {f"prob_{c}": float(p) for c, p in zip(classes, t["probs"], strict=True)},
            "isLocked": True,
        }
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        emit(_feature(_id(slide_id, "tile", x, y, s), {"type": "Polygon", "coordinates": [ring]}, props))
    for k, c in enumerate(classes):
        region = region_polygons(
            tile_scores, classes, k, threshold=threshold, bounds=dims, simplify=simplify, slide_id=slide_id
        )
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
