"""Raster masks to polygons in level-0 coordinates (tissue outlines, class regions)."""

from __future__ import annotations

import numpy as np
import shapely
from numpy.typing import NDArray
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry
from skimage import measure

__all__ = ["as_multipolygon", "mask_to_polygons"]


def as_multipolygon(geom: BaseGeometry) -> MultiPolygon:
    """Keep only the polygonal parts of ``geom`` as a MultiPolygon."""
    if geom.is_empty:
        return MultiPolygon()
    if isinstance(geom, Polygon):
        return MultiPolygon([geom])
    if isinstance(geom, MultiPolygon):
        return geom
    polys: list[Polygon] = []
    for g in getattr(geom, "geoms", []):
        polys.extend(as_multipolygon(g).geoms)
    return MultiPolygon(polys)


def _largest_polygon(geom: BaseGeometry) -> Polygon:
    polys = list(as_multipolygon(geom).geoms)
    return max(polys, key=lambda p: p.area) if polys else Polygon()


def _nest(rings: list[Polygon]) -> MultiPolygon:
    """Rings that do not cross -> polygons with holes, by nesting depth (even: outer
    boundary, odd: hole of its innermost container). An STR tree keeps it O(n log n)."""
    if not rings:
        return MultiPolygon()
    tree = shapely.STRtree(rings)
    areas = np.array([r.area for r in rings])
    # pairs (i, j): ring i lies within ring j
    inner, outer = tree.query(rings, predicate="within")
    keep = inner != outer
    inner, outer = inner[keep], outer[keep]
    depth = np.bincount(inner, minlength=len(rings))
    parent = np.full(len(rings), -1)
    for i, j in zip(inner, outer, strict=True):
        if parent[i] < 0 or areas[j] < areas[parent[i]]:
            parent[i] = j
    holes: dict[int, list[Polygon]] = {}
    for i in np.nonzero(depth % 2 == 1)[0]:
        holes.setdefault(int(parent[i]), []).append(rings[i])
    polys = [
        Polygon(rings[i].exterior.coords, [h.exterior.coords for h in holes.get(int(i), [])])
        for i in np.nonzero(depth % 2 == 0)[0]
    ]
    return as_multipolygon(shapely.make_valid(MultiPolygon(polys)))


def mask_to_polygons(
    mask: NDArray[np.bool_],
    *,
    scale: float,
    simplify: float = 0.0,
    bounds: tuple[float, float] | None = None,
) -> MultiPolygon:
    """Trace a boolean mask into (Multi)Polygons with holes, in level-0 pixels.

    Parameters
    ----------
    mask
        Boolean raster; pixel (r, c) covers level-0 ``[c*scale, (c+1)*scale)`` in x.
    scale
        Level-0 pixels per mask pixel.
    simplify
        Douglas-Peucker tolerance in mask pixels (0: none).
    bounds
        Level-0 (width, height) to clip the result to.

    Notes
    -----
    Contours at the 0.5 level of a binary image never cross, so the region is the
    even-odd combination of all closed contours (nesting depth decides outer or hole).
    """
    m = np.pad(np.asarray(mask, dtype=np.float32), 1)
    if not m.any():
        return MultiPolygon()
    rings: list[Polygon] = []
    for c in measure.find_contours(m, 0.5):
        if len(c) < 4:
            continue
        # contour points are in padded pixel-index space; pixel centres sit at i + 0.5
        xy = np.column_stack([(c[:, 1] - 1 + 0.5) * scale, (c[:, 0] - 1 + 0.5) * scale])
        poly = Polygon(xy)
        if not poly.is_valid:
            poly = _largest_polygon(shapely.make_valid(poly))
        if not poly.is_empty and poly.area > 0:
            rings.append(poly)
    region: BaseGeometry = _nest(rings)
    if simplify > 0:
        region = region.simplify(simplify * scale, preserve_topology=True)
    region = shapely.make_valid(region)
    if bounds is not None:
        region = region.intersection(shapely.box(0, 0, bounds[0], bounds[1]))
    return as_multipolygon(region)
