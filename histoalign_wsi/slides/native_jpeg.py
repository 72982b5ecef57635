"""Native JPEG tiles: the compressed tiles of a JPEG-compressed tiled TIFF or SVS level,
read straight from the file (tifffile gives the offsets, byte counts and shared JPEG
tables) and decoded by libjpeg-turbo through ``simplejpeg``, optionally with its
DCT-domain scaling (1/2, 1/4, 1/8): a tile wanted at half resolution is decoded at half
size, about a quarter of the work of decoding it whole and resizing.

Only levels that are tiled, 8-bit, 3-sample, chunky and JPEG-compressed qualify; every
other level and format (JPEG 2000, DICOM, MRXS, NDPI, uncompressed TIFF) keeps the
OpenSlide/tiffslide path. Decoded tiles that straddle a region's edge are kept (bounded
LRU) so that neighbouring reads do not decode them again.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

__all__ = ["SCALES", "JpegLevel", "NativeJpeg", "Piece", "open_native_jpeg"]

#: the DCT scaling factors libjpeg-turbo offers (and that this module uses)
SCALES = (1, 2, 4, 8)

#: an Adobe APP14 segment with transform 0: tells libjpeg the three components are RGB,
#: not YCbCr (Aperio writes RGB JPEG tiles and says so only in the TIFF photometric tag)
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


@dataclass(frozen=True)
class JpegLevel:
    """One qualifying TIFF page: its size, tile grid and where each tile's bytes are."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    tables: bytes | None
    rgb: bool  # photometric RGB: the JPEG streams hold RGB, not YCbCr

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_w)

    def jpeg(self, raw: bytes) -> bytes:
        """A complete JPEG stream from a tile's bytes (shared tables spliced in; the RGB
        marker added when the stream is RGB)."""
        body = raw[2:]  # after SOI
        head = b"\xff\xd8"
        if self.rgb:
            head += _ADOBE_RGB
        if self.tables:
            head += self.tables[2:-2]  # the tables between their own SOI and EOI
        return head + body


@dataclass(frozen=True)
class Piece:
    """One native tile's part of a region: ``src`` (x0, y0, x1, y1) in the decoded tile,
    placed at ``dst`` (x, y) in the region's image; ``straddles`` when the tile reaches
    past the region (a neighbouring region needs it too)."""

    index: int
    src: tuple[int, int, int, int]
    dst: tuple[int, int]
    straddles: bool


def _qualifies(page: object) -> bool:
    p = page
    return bool(
        getattr(p, "is_tiled", False)
        and getattr(p, "compression", None) == 7
        and getattr(p, "samplesperpixel", 0) == 3
        and getattr(p, "bitspersample", 0) == 8
        and getattr(p, "planarconfig", 1) == 1
        and int(getattr(p, "photometric", 0)) in (2, 6)
    )


class NativeJpeg:
    """Reads regions of the qualifying levels of one file; thread-safe."""

    def __init__(self, path: Path, levels: dict[int, JpegLevel], cache_mb: float = 256.0) -> None:
        self.path = path
        self.levels = levels
        self._fd = os.open(path, os.O_RDONLY)
        self._cache: OrderedDict[tuple[int, int, int], NDArray[np.uint8]] = OrderedDict()
        self._cache_bytes = 0
        self._budget = cache_mb * 2**20
        self._lock = threading.Lock()
        self.decoded = 0  # tiles decoded (a test and the benchmark read it)

    def close(self) -> None:
        os.close(self._fd)

    def supports(self, level: int) -> bool:
        return level in self.levels

    def _tile(self, level: int, index: int, scale: int) -> NDArray[np.uint8]:
        import simplejpeg

        key = (level, index, scale)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        lv = self.levels[level]
        w, h = lv.tile_w // scale, lv.tile_h // scale
        img = simplejpeg.decode_jpeg(self.stream(level, index), colorspace="RGB", min_width=w, min_height=h)
        if img.shape[:2] != (lv.tile_h // scale, lv.tile_w // scale):
            raise ValueError(
                f"tile {index} of level {level} decoded to {img.shape[1]}x{img.shape[0]}, "
                f"expected {lv.tile_w // scale}x{lv.tile_h // scale}"
            )
        with self._lock:
            self.decoded += 1
        return img

    def _keep(self, key: tuple[int, int, int], img: NDArray[np.uint8]) -> None:
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = img
            self._cache_bytes += img.nbytes
            while self._cache_bytes > self._budget and self._cache:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.nbytes

    def plan(self, level: int, x: int, y: int, w: int, h: int, scale: int = 1) -> list[Piece]:
        """The native tiles covering the level-pixel box (x, y, w, h) and where each one's
        part goes in the region's image at 1/``scale`` resolution."""
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}")
        if x % scale or y % scale or w % scale or h % scale:
            raise ValueError(f"region ({x}, {y}, {w}, {h}) is not aligned to scale {scale}")
        lv = self.levels[level]
        tw, th = lv.tile_w, lv.tile_h
        x1, y1 = min(x + w, lv.width), min(y + h, lv.height)
        pieces = []
        for ty in range(max(0, y) // th, -(-y1 // th) if y1 > 0 else 0):
            for tx in range(max(0, x) // tw, -(-x1 // tw) if x1 > 0 else 0):
                gx0, gy0 = tx * tw, ty * th  # the tile's level-pixel origin
                # the part of the tile inside both the image and the region, in level pixels
                ax0, ay0 = max(gx0, x), max(gy0, y)
                ax1, ay1 = min(gx0 + tw, x1), min(gy0 + th, y1)
                if ax1 <= ax0 or ay1 <= ay0:
                    continue
                sx0, sy0 = (ax0 - gx0) // scale, (ay0 - gy0) // scale
                sx1, sy1 = -(-(ax1 - gx0) // scale), -(-(ay1 - gy0) // scale)
                pieces.append(
                    Piece(
                        index=ty * lv.tiles_across + tx,
                        src=(sx0, sy0, sx1, sy1),
                        dst=((ax0 - x) // scale, (ay0 - y) // scale),
                        straddles=gx0 + tw > x + w or gy0 + th > y + h,
                    )
                )
        return pieces

    def stream(self, level: int, index: int) -> bytes:
        """Tile ``index`` of ``level`` as a complete JPEG stream (for another decoder)."""
        lv = self.levels[level]
        return lv.jpeg(os.pread(self._fd, lv.counts[index], lv.offsets[index]))

    def read_region(self, level: int, x: int, y: int, w: int, h: int, scale: int = 1) -> NDArray[np.uint8]:
        """RGB uint8 pixels of the level-pixel box (x, y, w, h) at 1/``scale`` resolution,
        shape (h // scale, w // scale, 3); outside the image is white. ``x``, ``y``, ``w``
        and ``h`` must be multiples of ``scale``."""
        pieces = self.plan(level, x, y, w, h, scale)
        out = np.full((h // scale, w // scale, 3), 255, np.uint8)
        for p in pieces:
            img = self._tile(level, p.index, scale)
            sx0, sy0, sx1, sy1 = p.src
            dx0, dy0 = p.dst
            out[dy0 : dy0 + sy1 - sy0, dx0 : dx0 + sx1 - sx0] = img[sy0:sy1, sx0:sx1]
            if p.straddles:  # reaches past the region: a neighbouring read wants it too
                self._keep((level, p.index, scale), img)
        return out


def open_native_jpeg(
    path: str | os.PathLike[str], level_dimensions: Sequence[tuple[int, int]]
) -> NativeJpeg | None:
    """A native JPEG reader for the slide levels (by size) held as qualifying TIFF pages,
    or None when no level qualifies, the file is not a TIFF or ``simplejpeg`` is missing."""
    try:
        import simplejpeg  # noqa: F401
        import tifffile
    except ImportError:
        return None
    p = Path(path)
    try:
        with tifffile.TiffFile(p) as tf:
            pages = [pg for pg in tf.pages if _qualifies(pg)]
            by_size = {(int(pg.imagewidth), int(pg.imagelength)): pg for pg in pages}  # type: ignore[union-attr]
            levels = {}
            for i, (w, h) in enumerate(level_dimensions):
                pg = by_size.get((int(w), int(h)))
                if pg is None:
                    continue
                tables = getattr(pg, "jpegtables", None)
                levels[i] = JpegLevel(
                    width=int(w),
                    height=int(h),
                    tile_w=int(pg.tilewidth),  # type: ignore[union-attr]
                    tile_h=int(pg.tilelength),  # type: ignore[union-attr]
                    offsets=tuple(int(o) for o in pg.dataoffsets),
                    counts=tuple(int(c) for c in pg.databytecounts),
                    tables=bytes(tables) if tables else None,
                    rgb=int(pg.photometric) == 2,  # type: ignore[union-attr]
                )
    except Exception:  # not a TIFF tifffile can parse: the backend's path only
        return None
    if not levels or any(0 in lv.counts for lv in levels.values()):
        return None
    return NativeJpeg(p, levels)
