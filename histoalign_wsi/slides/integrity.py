"""Checks a TIFF-based slide file (SVS, generic and OME-TIFF, BigTIFF) against its own
image directories before any pixel is read, so that a truncated or damaged file fails at
once with one line saying where the missing bytes should be, instead of half-way through
a read deep in a reader library."""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

from ..errors import SlideError

__all__ = ["check_tiff"]

_TIFF_MAGIC = {b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"}


def _first_ifd(head: bytes) -> tuple[int, bool] | None:
    """(offset of the first image directory, BigTIFF?) from the header, or None if not a TIFF."""
    if head[:4] not in _TIFF_MAGIC:
        return None
    end = "<" if head[:2] == b"II" else ">"
    if head[2:4] in (b"+\x00", b"\x00+"):
        return struct.unpack(end + "Q", head[8:16])[0], True
    return struct.unpack(end + "I", head[4:8])[0], False


def check_tiff(path: Path, *, max_megapixels: float = 1000.0) -> None:
    """Raise :class:`SlideError` when a TIFF's directories or tile data lie past its end,
    or when one of its strips or tiles declares more than ``max_megapixels`` pixels: a
    compressed strip is decoded whole, so a small file declaring one huge strip would
    otherwise take all memory at its first read (a decompression bomb). NDPI files are
    exempt: their one JPEG per level is read by restart intervals, never whole.

    Files that are not TIFFs (DICOM, MRXS index files, ...) pass unchecked.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(16)
    first = _first_ifd(head)
    if first is None:
        return
    offset, _big = first
    if offset >= size:
        raise SlideError(
            path,
            f"file is truncated or damaged (its first image directory should be at offset {offset}, "
            f"but the file has only {size} bytes)",
        )
    import tifffile

    log = logging.getLogger("tifffile")
    caught = _Collect()
    log.addHandler(caught)
    # we report the problem ourselves, once: collect tifffile's warnings whatever its
    # configured level, and keep them from reaching the user's console
    propagate, level = log.propagate, log.level
    log.propagate = False
    log.setLevel(logging.WARNING)
    try:
        with tifffile.TiffFile(path) as tif:
            pages = list(tif.pages)  # walks the whole directory chain
            if caught.messages:
                raise SlideError(
                    path, f"file is truncated or damaged ({caught.messages[0]}; the file has {size} bytes)"
                )
            for i, page in enumerate(pages):
                if not tif.is_ndpi:
                    _check_segment(path, i, page, max_megapixels)
                offsets = getattr(page, "dataoffsets", ()) or ()
                counts = getattr(page, "databytecounts", ()) or ()
                for off, n in zip(offsets, counts, strict=False):
                    if n and off + n > size:
                        raise SlideError(
                            path,
                            f"file is truncated or damaged (expected {n} bytes of tile data at "
                            f"offset {off} in image {i}, but the file has only {size} bytes)",
                        )
    except SlideError:
        raise
    except Exception as exc:  # the directory chain itself is broken
        raise SlideError(path, f"file is truncated or damaged ({exc or type(exc).__name__})") from exc
    finally:
        log.removeHandler(caught)
        log.propagate = propagate
        log.setLevel(level)


def _check_segment(path: Path, index: int, page: Any, max_megapixels: float) -> None:
    """Refuse a page whose largest strip or tile holds more than ``max_megapixels``."""
    width, length = int(getattr(page, "imagewidth", 0)), int(getattr(page, "imagelength", 0))
    if getattr(page, "is_tiled", False):
        w, h = int(page.tilewidth), int(page.tilelength) * max(int(getattr(page, "tiledepth", 1)), 1)
        kind = "tile"
    else:
        w, h = width, min(int(getattr(page, "rowsperstrip", 0) or length), length)
        kind = "strip"
    mp = w * h / 1e6
    if mp > max_megapixels:
        raise SlideError(
            path,
            f"image {index} ({width} x {length}) is stored in a {w} x {h} {kind} ({mp:,.0f} megapixels), "
            f"which is decoded whole: more than max_read_megapixels={max_megapixels:g} "
            "(a decompression bomb, or a slide to re-save tiled)",
        )


class _Collect(logging.Handler):
    """Keeps the warnings tifffile logs while parsing (it logs broken offsets, not raises)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        self.messages.append(msg.split("> ", 1)[-1] if "> " in msg else msg)
