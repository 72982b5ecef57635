"""Slide reading behind one small interface, with openslide and tiffslide backends.

``reader="auto"`` uses openslide when it opens the file and falls back to tiffslide; an
OME-TIFF, whose pyramid openslide does not see (it opens it as a one-level generic TIFF),
goes to tiffslide too.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from ..errors import SlideError
from .integrity import check_tiff
from .native_jpeg import NativeJpeg, open_native_jpeg

__all__ = ["SLIDE_EXTENSIONS", "Slide", "SlideInfo", "open_slide"]

log = logging.getLogger(__name__)

#: file name endings treated as slides when a directory is scanned
SLIDE_EXTENSIONS = (
    ".svs",
    ".tif",
    ".tiff",
    ".ome.tif",
    ".ome.tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".dcm",
    ".dicom",
    ".isyntax",
)


class _Backend(Protocol):
    properties: Any
    level_count: int
    level_dimensions: Any
    level_downsamples: Any
    associated_images: Any

    def read_region(self, location: Any, level: int, size: Any) -> Any: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class SlideInfo:
    """What ``histoalign-wsi info`` prints."""

    path: str
    reader: str
    vendor: str
    level_count: int
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp_x: float | None
    mpp_y: float | None
    mpp_source: str
    objective_power: float | None
    associated_images: list[str]


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _tiff_resolution_mpp(path: Path) -> tuple[float, float] | None:
    """MPP from the first page's TIFF resolution tags (centimetre or inch units)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            tags = page.tags  # type: ignore[union-attr]
            unit = tags.get("ResolutionUnit")
            xr, yr = tags.get("XResolution"), tags.get("YResolution")
            if unit is None or xr is None or yr is None:
                return None
            per_um = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
            if per_um is None:
                return None
            (xn, xd), (yn, yd) = xr.value, yr.value
            if not xn or not yn:
                return None
            return per_um * xd / xn, per_um * yd / yn
    except Exception:  # not a TIFF, or unreadable tags: no MPP from here
        return None


def _head(path: Path, n: int) -> bytes:
    with path.open("rb") as fh:
        return fh.read(n)


def _open_backend(path: Path, reader: str) -> tuple[_Backend, str]:
    errors: list[str] = []
    os_slide = None
    if reader in ("auto", "openslide"):
        try:
            import openslide

            os_slide = openslide.OpenSlide(str(path))
        except Exception as exc:
            errors.append(f"openslide: {exc or type(exc).__name__}")
        if os_slide is not None:
            vendor = os_slide.properties.get("openslide.vendor")
            if reader == "openslide" or not (vendor == "generic-tiff" and _is_ome(path)):
                return cast(_Backend, os_slide), "openslide"
            os_slide.close()
    if reader in ("auto", "tiffslide"):
        try:
            import tiffslide

            return cast(_Backend, tiffslide.TiffSlide(path)), "tiffslide"
        except Exception as exc:
            errors.append(f"tiffslide: {exc or type(exc).__name__}")
    if path.suffix.lower() in (".dcm", ".dicom") or _head(path, 132)[128:] == b"DICM":
        raise SlideError(
            path,
            "is a DICOM file that OpenSlide cannot read as a whole-slide image: OpenSlide reads "
            "VL Whole Slide Microscopy Image series (an ImageType of ORIGINAL or DERIVED, tiled "
            "frames, the other files of the series in the same folder); this one is not one, or "
            "lacks those tags. Put the whole series in one folder and name one of its files, or "
            "convert the slide to a pyramidal TIFF (e.g. with wsidicomizer or bfconvert). ("
            + "; ".join(errors)
            + ")",
        )
    raise SlideError(path, "cannot be opened as a slide (" + "; ".join(errors) + ")")


def _is_ome(path: Path) -> bool:
    return path.name.lower().endswith((".ome.tif", ".ome.tiff"))


class Slide:
    """An open slide. Coordinates are level-0 pixels; pixels come back as RGB uint8 arrays
    with transparent or out-of-bounds areas composited onto white.

    Use :func:`open_slide` to make one.
    """

    def __init__(
        self,
        path: Path,
        backend: _Backend,
        reader: str,
        mpp_override: float | None,
        mpp_default: float | None,
    ) -> None:
        self.path = path
        self.reader = reader
        self._b = backend
        props = backend.properties
        self.properties: dict[str, str] = {str(k): str(v) for k, v in dict(props).items() if v is not None}
        pre = reader
        self.vendor = self.properties.get(f"{pre}.vendor") or ("ome" if _is_ome(path) else "unknown")
        self.level_count = int(backend.level_count)
        self.level_dimensions = [(int(w), int(h)) for w, h in backend.level_dimensions]
        self.level_downsamples = [float(d) for d in backend.level_downsamples]
        self.dimensions = self.level_dimensions[0]
        self.objective_power = _float(self.properties.get(f"{pre}.objective-power"))
        self.associated_images = sorted(str(k) for k in backend.associated_images)
        mx, my = _float(self.properties.get(f"{pre}.mpp-x")), _float(self.properties.get(f"{pre}.mpp-y"))
        source = "metadata"
        if mx is None or my is None:
            tags = _tiff_resolution_mpp(path)
            if tags is not None:
                mx, my = tags
                source = "tiff-resolution-tags"
        if mpp_override is not None:
            mx = my = float(mpp_override)
            source = "override"
        elif (mx is None or my is None) and mpp_default is not None:
            mx = my = float(mpp_default)
            source = "config mpp_override"
        self.mpp_x, self.mpp_y, self.mpp_source = mx, my, source

    # -- geometry -------------------------------------------------------------------
    @property
    def mpp(self) -> float:
        """Level-0 micrometres per pixel (mean of x and y); an error when unknown."""
        if self.mpp_x is None or self.mpp_y is None:
            raise SlideError(
                self.path,
                "has no resolution (MPP) in its metadata; give one as an 'mpp' column in the slide "
                "sheet, 'mpp_override: 0.25' in config.yaml (snakemake --config mpp_override=0.25), "
                "or --mpp when running a histoalign-wsi command by hand",
            )
        return (self.mpp_x + self.mpp_y) / 2

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample``."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + 1e-3):
                best = i
        return best

    # -- pixels ---------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> NDArray[np.uint8]:
        """RGB uint8 array of ``size`` (w, h) at ``level``, top-left at level-0 ``location``."""
        if not 0 <= level < self.level_count:
            raise SlideError(self.path, f"level={level} out of range (slide has {self.level_count})")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            return np.full((max(h, 0), max(w, 0), 3), 255, np.uint8)
        try:
            img = self._b.read_region((int(location[0]), int(location[1])), level, (w, h))
        except Exception as exc:
            raise SlideError(
                self.path,
                f"cannot decode pixels at level-0 x={location[0]}, y={location[1]}, "
                f"level {level}, size {w}x{h}: {exc or type(exc).__name__}",
            ) from exc
        return _to_rgb(img)

    def native_jpeg(self) -> NativeJpeg | None:
        """The native JPEG tile reader of this file's qualifying levels (None if none)."""
        if not hasattr(self, "_native"):
            self._native = open_native_jpeg(self.path, self.level_dimensions)
        return self._native

    def pixel_path(self, level: int) -> str:
        """How pixels of ``level`` are decoded: ``native-jpeg`` (compressed tiles straight
        to libjpeg-turbo, DCT scaling available) or the backend's name."""
        nj = self.native_jpeg()
        return "native-jpeg" if nj is not None and nj.supports(level) else self.reader

    def read_scaled(
        self, location: tuple[int, int], level: int, size: tuple[int, int], scale: int
    ) -> NDArray[np.uint8] | None:
        """Pixels of ``size`` (w, h, level pixels) at ``level`` decoded at 1/``scale``
        (DCT scaling) from native JPEG tiles, shape (h / scale, w / scale, 3); None when
        this level or box cannot be read that way (then use :meth:`read_region`)."""
        nj = self.native_jpeg()
        if nj is None or not nj.supports(level):
            return None
        d = self.level_downsamples[level]
        lx, ly = location[0] / d, location[1] / d
        if lx != int(lx) or ly != int(ly) or any(int(v) % scale for v in (lx, ly, *size)):
            return None
        try:
            return nj.read_region(level, int(lx), int(ly), int(size[0]), int(size[1]), scale)
        except Exception as exc:
            raise SlideError(
                self.path,
                f"cannot decode JPEG tiles at level-0 x={location[0]}, y={location[1]}, level {level}: "
                f"{exc or type(exc).__name__}",
            ) from exc

    def attrs(self, slide_id: str) -> dict[str, Any]:
        """What a store records about its slide."""
        return {
            "id": slide_id,
            "path": str(self.path),
            "size_bytes": self.path.stat().st_size,
            "level0_dims": list(self.dimensions),
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "vendor": self.vendor,
            "reader": self.reader,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": self.level_downsamples,
        }

    def info(self) -> SlideInfo:
        return SlideInfo(
            path=str(self.path),
            reader=self.reader,
            vendor=self.vendor,
            level_count=self.level_count,
            level_dimensions=self.level_dimensions,
            level_downsamples=self.level_downsamples,
            mpp_x=self.mpp_x,
            mpp_y=self.mpp_y,
            mpp_source=self.mpp_source if self.mpp_x is not None else "missing",
            objective_power=self.objective_power,
            associated_images=self.associated_images,
        )

    def close(self) -> None:
        nj = getattr(self, "_native", None)
        if nj is not None:
            nj.close()
        self._b.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_rgb(img: Any) -> NDArray[np.uint8]:
    if isinstance(img, Image.Image):
        if img.mode == "RGBA":
            bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, img)
        return np.array(img.convert("RGB"))
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[2] == 4:
        a = arr[..., 3:4].astype(np.float32) / 255
        arr = (arr[..., :3] * a + 255 * (1 - a)).round().astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3], dtype=np.uint8)


def open_slide(
    path: str | os.PathLike[str],
    *,
    reader: str = "auto",
    mpp_override: float | None = None,
    mpp_default: float | None = None,
    verify: bool = True,
    max_megapixels: float = 1000.0,
) -> Slide:
    """Open a slide.

    Parameters
    ----------
    path
        The slide file.
    reader
        ``auto``, ``openslide`` or ``tiffslide``.
    mpp_override
        Forces the level-0 MPP (a per-slide override, e.g. the sheet's ``mpp`` column).
    mpp_default
        Used only when the slide's metadata has no MPP (the config's ``mpp_override``).
    verify
        Decode a few pixels of the smallest level so an undecodable file fails here.
    max_megapixels
        The most pixels one TIFF strip or tile may declare (it is decoded whole):
        the configuration's ``max_read_megapixels``.

    Raises
    ------
    SlideError
        Naming the file and the problem.
    """
    if reader not in ("auto", "openslide", "tiffslide"):
        raise SlideError(path, f"unknown reader {reader!r} (choose auto, openslide or tiffslide)")
    p = Path(path)
    if not p.exists():
        raise SlideError(p, "does not exist")
    if p.is_dir():
        raise SlideError(p, "is a directory, not a slide file")
    if p.stat().st_size == 0:
        raise SlideError(p, "is an empty file")
    check_tiff(p, max_megapixels=max_megapixels)
    backend, name = _open_backend(p, reader)
    try:
        slide = Slide(p, backend, name, mpp_override, mpp_default)
    except Exception as exc:  # a backend that opened the file but cannot parse it
        backend.close()
        raise SlideError(p, f"cannot be read as a slide ({name}: {exc or type(exc).__name__})") from exc
    if verify:
        lvl = slide.level_count - 1
        w, h = slide.level_dimensions[lvl]
        cx, cy = (w // 2) * slide.level_downsamples[lvl], (h // 2) * slide.level_downsamples[lvl]
        try:
            slide.read_region((int(cx), int(cy)), lvl, (min(w, 16), min(h, 16)))
        except SlideError:
            slide.close()
            raise
    return slide
