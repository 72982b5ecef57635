"""Tissue detection on a low-resolution level: saturation threshold (Otsu, bounded),
brightness limits, morphological clean-up, minimum area and hole filling.

The image operations are OpenCV's: they match scikit-image's (the tests hold each step
to its scikit-image counterpart) and the module loads in a few milliseconds, where
scikit-image's filters and morphology import scipy.ndimage (about half a second, most
of a tissue job's time)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import shapely
from numpy.typing import NDArray
from PIL import Image

from .._atomic import atomic_file
from .._progress import Progress
from ..config import TissueParams
from ..errors import SlideError
from .geometry import mask_to_polygons
from .reader import Slide

__all__ = ["TissueResult", "detect_tissue", "load_tissue", "read_thumbnail", "save_tissue"]

log = logging.getLogger(__name__)

#: saturation thresholds above this are a split inside tissue, not tissue vs glass
_OTSU_CAP = 0.2
_STRIP_PIXELS = 1 << 22  # pixels per strip read: memory stays flat in slide size


@dataclass(frozen=True)
class TissueResult:
    """A tissue mask at thumbnail scale and its polygons in level-0 pixels."""

    mask: NDArray[np.bool_]
    scale: float  # level-0 pixels per mask pixel
    threshold: float
    polygons: shapely.MultiPolygon
    params: TissueParams

    @property
    def area_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def read_thumbnail(
    slide: Slide, target_scale: float, *, max_megapixels: float
) -> tuple[NDArray[np.uint8], float]:
    """Read the slide at about ``target_scale`` level-0 px per pixel, memory-bounded.

    The best pyramid level is read in strips and each strip is block-averaged by an
    integer factor, so the returned scale is exact: ``level downsample x factor``.

    Raises
    ------
    SlideError
        Before reading anything, when the level to decode holds more than
        ``max_megapixels`` (a slide without a pyramid level near the wanted resolution,
        or one whose header declares an enormous size).
    """
    level = slide.best_level(target_scale)
    lds = slide.level_downsamples[level]
    f = max(1, math.floor(target_scale / lds + 1e-6))
    lw, lh = slide.level_dimensions[level]
    mp = lw * lh / 1e6
    if mp > max_megapixels:
        raise SlideError(
            slide.path,
            f"no pyramid level near {target_scale:.3g} level-0 px per pixel: the read would decode "
            f"level {level} ({lw} x {lh} px, {mp:,.0f} megapixels), over max_read_megapixels="
            f"{max_megapixels:g}; give the file a pyramid (e.g. vips tiffsave --tile --pyramid) "
            "or raise max_read_megapixels",
        )
    ow, oh = math.ceil(lw / f), math.ceil(lh / f)
    out = np.empty((oh, ow, 3), np.uint8)
    rows = max(f, (_STRIP_PIXELS // max(lw, 1) // f) * f)
    strips = math.ceil(lh / rows)
    bar = Progress(strips, desc=f"read {slide.path.name} level {level}", unit="strip") if strips > 4 else None
    for y in range(0, lh, rows):
        h = min(rows, lh - y)
        strip = slide.read_region((0, round(y * lds)), level, (lw, h))
        if f > 1:
            ph, pw = math.ceil(h / f) * f, ow * f
            padded = np.full((ph, pw, 3), 255, np.uint8)
            padded[:h, :lw] = strip
            sums = padded.reshape(ph // f, f, ow, f, 3).sum(axis=(1, 3), dtype=np.uint32)
            strip = ((sums + (f * f) // 2) // (f * f)).astype(np.uint8)
        out[y // f : y // f + strip.shape[0]] = strip
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return out, lds * f


def detect_tissue(slide: Slide, params: TissueParams, *, max_megapixels: float) -> TissueResult:
    """Detect tissue on a low-resolution read of ``slide`` (at most ``max_megapixels``
    decoded; see :func:`read_thumbnail`).

    A background-only slide gives an empty mask (a valid result).
    """
    mpp = slide.mpp
    thumb, scale = read_thumbnail(slide, params.mask_mpp / mpp, max_megapixels=max_megapixels)
    mask, thr = tissue_mask(thumb, mask_mpp=scale * mpp, params=params)
    w, h = slide.dimensions
    polys = mask_to_polygons(mask, scale=scale, simplify=0.5, bounds=(w, h))
    return TissueResult(mask=mask, scale=scale, threshold=thr, polygons=polys, params=params)


def tissue_mask(
    rgb: NDArray[np.uint8], *, mask_mpp: float, params: TissueParams
) -> tuple[NDArray[np.bool_], float]:
    """Boolean tissue mask of an RGB thumbnail whose pixels are ``mask_mpp`` µm wide."""
    if rgb.size == 0:
        return np.zeros(rgb.shape[:2], bool), params.min_saturation
    # HSV saturation (x255) and value as uint8 planes: no float HSV image is materialised,
    # so memory is a few bytes per mask pixel
    mx = rgb.max(axis=2)
    mn = rgb.min(axis=2)
    sat = ((mx - mn).astype(np.uint16) * 255 // np.maximum(mx, 1)).astype(np.uint8)
    val = mx
    sat = median3(sat)
    t = otsu_threshold(sat)
    otsu = params.min_saturation if t is None else t / 255
    thr = float(np.clip(otsu, params.min_saturation, max(_OTSU_CAP, params.min_saturation)))
    mask = (sat > thr * 255) & (val >= params.min_value * 255) & (val <= params.max_value * 255)
    r = round(params.closing_um / mask_mpp / 2)
    if r >= 1:
        mask = binary_closing(mask, r)
    px_area = mask_mpp * mask_mpp
    min_obj = int(params.min_area_um2 / px_area)
    if min_obj >= 1:
        mask = remove_small_components(mask, min_obj)
    max_hole = int(params.max_hole_um2 / px_area)
    if max_hole >= 1:
        mask = ~remove_small_components(~mask, max_hole)
    return mask.astype(bool), thr


def median3(img: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """3 x 3 median, edges replicated (scikit-image ``filters.median`` with a 3 x 3
    footprint); images under 3 px on a side are returned as they are."""
    if min(img.shape) < 3:
        return img
    return np.asarray(cv2.medianBlur(np.ascontiguousarray(img), 3))


def otsu_threshold(img: NDArray[np.uint8]) -> float | None:
    """Otsu's threshold of a uint8 image (pixels above it are foreground, as for
    scikit-image's ``threshold_otsu``); None for a constant image, which has none."""
    if img.size == 0 or img.min() == img.max():
        return None
    t, _ = cv2.threshold(np.ascontiguousarray(img), 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    return float(t)


def disk(r: int) -> NDArray[np.uint8]:
    """The disk structuring element of radius ``r`` (scikit-image ``morphology.disk``)."""
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return (x * x + y * y <= r * r).astype(np.uint8)


def binary_closing(mask: NDArray[np.bool_], r: int) -> NDArray[np.bool_]:
    """Closing by a disk of radius ``r``, the mask padded by ``r`` with background so
    that tissue at the image edge is not eroded from outside."""
    padded = np.pad(mask.astype(np.uint8), r)
    closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, disk(r))
    return np.asarray(closed[r:-r, r:-r], dtype=bool)


def remove_small_components(mask: NDArray[np.bool_], max_size: int) -> NDArray[np.bool_]:
    """``mask`` without its 4-connected components of ``max_size`` pixels or fewer
    (scikit-image ``remove_small_objects(mask, max_size=...)``; on the inverted mask,
    ``remove_small_holes``, which also fills small background at the image edge)."""
    if not mask.any():
        return mask.astype(bool)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    keep = stats[:, cv2.CC_STAT_AREA] > max_size
    keep[0] = False  # label 0: the pixels outside every component
    return np.asarray(keep[labels], dtype=bool)


def save_tissue(
    result: TissueResult, slide: Slide, out_png: str | Path, *, provenance: Mapping[str, Any] | None = None
) -> Path:
    """Write the mask PNG and, beside it, ``<name>.json`` with scale, polygons, params and
    what it was made from (``provenance``; the JSON is written last, so a JSON with a
    record means a complete pair)."""
    out_png = Path(out_png)
    meta: dict[str, Any] = {
        "slide": str(slide.path),
        "level0_dims": list(slide.dimensions),
        "mpp": slide.mpp,
        "level0_px_per_mask_px": result.scale,
        "mask_shape": list(result.mask.shape),
        "threshold": result.threshold,
        "tissue_fraction": result.area_fraction,
        "params": asdict(result.params),
        "polygons": shapely.geometry.mapping(result.polygons),
        "provenance": dict(provenance) if provenance is not None else None,
    }
    json_path = out_png.with_suffix(".json")
    json_path.unlink(missing_ok=True)
    with atomic_file(out_png) as tmp:
        Image.fromarray(result.mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    with atomic_file(json_path) as tmp:
        tmp.write_text(json.dumps(meta))
    return out_png


def load_tissue(png: str | Path) -> tuple[NDArray[np.bool_], dict[str, Any]]:
    """The mask and its metadata written by :func:`save_tissue`."""
    png = Path(png)
    meta: dict[str, Any] = json.loads(png.with_suffix(".json").read_text())
    mask = np.asarray(Image.open(png)) > 127
    return mask, meta
