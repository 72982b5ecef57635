"""Heatmap images: per-class probability overlays on the slide thumbnail (with a colour bar
and the class name drawn inside the image), an argmax map with a legend, and a small
argmax thumbnail for the report. WebP by default (about a quarter of the bytes of PNG:
a 9-class slide's heatmaps stay under 2 MB), JPEG or PNG on request; the longest side
is at most ``max_size`` px, or set by a resolution in µm per pixel."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

from .._atomic import atomic_dir
from ..slides.reader import Slide
from ..slides.tissue import read_thumbnail
from ..zeroshot.tile_scores import TileScores, safe_names
from .raster import Raster

__all__ = ["FORMATS", "THUMB_PX", "attention_scores", "class_files", "heatmap_side", "write_heatmaps"]

#: heatmap.format -> (file extension, Pillow format, save options)
FORMATS: dict[str, tuple[str, str, dict[str, object]]] = {
    "webp": ("webp", "WEBP", {"quality": 80, "method": 4}),
    "jpeg": ("jpg", "JPEG", {"quality": 85}),
    "png": ("png", "PNG", {}),
}
#: the longest side of ``argmax_thumb.*``, the report's thumbnail
THUMB_PX = 192


def class_files(classes: list[str], fmt: str = "webp") -> dict[str, str]:
    """The file name of each class's heatmap: a safe, unique name that never collides
    with ``thumbnail``, ``argmax``, ``argmax_thumb`` or ``attention``."""
    names = safe_names(["thumbnail", "argmax", "argmax_thumb", "attention", *classes])[4:]
    ext = FORMATS[fmt][0]
    return {c: f"{n}.{ext}" for c, n in zip(classes, names, strict=True)}


def heatmap_side(
    dimensions: tuple[int, int], slide_mpp: float | None, *, max_size: int, mpp: float | None
) -> int:
    """The longest side of a slide's heatmaps in pixels: at ``mpp`` µm per pixel when
    given (and the slide's resolution is known), never above ``max_size``."""
    longest = max(dimensions)
    if mpp is not None and slide_mpp:
        return max(16, min(max_size, round(longest * slide_mpp / mpp)))
    return min(max_size, longest)


def _save(img: Image.Image, path: Path, fmt: str, side: int) -> None:
    """Save within ``side`` px (the thumbnail read is at most twice the asked size)."""
    if max(img.size) > side:
        f = side / max(img.size)
        img = img.resize(
            (max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.LANCZOS
        )
    ext, pil, opts = FORMATS[fmt]
    img.convert("RGB").save(path.with_suffix(f".{ext}"), pil, **opts)


def _font(img: Image.Image) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """A font about 1/40 of the image width (at least 12 px), so the text stays legible
    when the PNG is shown shrunk in a report or a viewer."""
    return ImageFont.load_default(size=max(12, img.width // 40))


def _legend(img: Image.Image, entries: list[tuple[str, tuple[int, int, int]]]) -> None:
    d = ImageDraw.Draw(img)
    f = _font(img)
    row = int(f.size * 1.4) if isinstance(f, ImageFont.FreeTypeFont) else 14
    sw = row - 4
    w = sw + 12 + max((int(d.textlength(t, font=f)) for t, _ in entries), default=40)
    d.rectangle([4, 4, 8 + w + 4, 8 + row * len(entries)], fill=(255, 255, 255))
    for i, (t, c) in enumerate(entries):
        y = 6 + i * row
        d.rectangle([8, y + 2, 8 + sw, y + 2 + sw], fill=c, outline=(60, 60, 60))
        d.text((8 + sw + 6, y), t, fill=(0, 0, 0), font=f)


UNTRAINED_MARK = "UNTRAINED demo encoder: meaningless"


def _mark_untrained(img: Image.Image) -> None:
    """A red band across the top right: this image came from an untrained encoder."""
    d = ImageDraw.Draw(img)
    f = _font(img)
    w = int(d.textlength(UNTRAINED_MARK, font=f)) + 12
    h = int((f.size if isinstance(f, ImageFont.FreeTypeFont) else 10) * 1.5)
    x0 = max(0, img.width - w - 4)
    d.rectangle([x0, 4, x0 + w, 4 + h], fill=(200, 0, 0))
    d.text((x0 + 6, 5), UNTRAINED_MARK, fill=(255, 255, 255), font=f)


def _colorbar(img: Image.Image, name: str, cmap: matplotlib.colors.Colormap) -> None:
    d = ImageDraw.Draw(img)
    f = _font(img)
    fs = f.size if isinstance(f, ImageFont.FreeTypeFont) else 10
    w, h = img.size
    bw, bh = max(80, min(w // 2, int(w / 3))), max(10, int(fs * 0.8))
    x0, y0 = 6, h - bh - int(fs * 1.6)
    d.rectangle([x0 - 3, y0 - int(fs * 1.5), x0 + bw + 3, h - 4], fill=(255, 255, 255))
    d.text((x0, y0 - int(fs * 1.4)), name, fill=(0, 0, 0), font=f)
    ramp = (cmap(np.linspace(0.0, 1.0, bw))[:, :3] * 255).astype(np.uint8)  # one call, not one per column
    img.paste(Image.fromarray(np.repeat(ramp[None], bh + 1, axis=0)), (x0, y0))
    d.text((x0, y0 + bh + 1), "0", fill=(0, 0, 0), font=f)
    d.text((x0 + bw - int(fs * 0.7), y0 + bh + 1), "1", fill=(0, 0, 0), font=f)


def _blend(
    base: NDArray[np.uint8], over: NDArray[np.float32], mask: NDArray[np.bool_], alpha: float
) -> NDArray[np.uint8]:
    out = base.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * over[mask]
    return out.round().clip(0, 255).astype(np.uint8)


def write_heatmaps(
    slide: Slide,
    scores: TileScores,
    colors: Mapping[str, tuple[int, int, int]],
    outdir: str | Path,
    *,
    max_size: int,
    alpha: float,
    max_megapixels: float,
    attention: pd.DataFrame | None = None,
    fmt: str = "webp",
    mpp: float | None = None,
) -> Path:
    """Write ``{class}.{ext}`` per class, ``argmax.{ext}``, ``argmax_thumb.{ext}`` (the
    report's thumbnail) and ``thumbnail.{ext}`` into ``outdir`` from the finest scale of
    ``scores``; with a head's ``attention`` (scale, x, y, attention per tile) also
    ``attention.{ext}``. ``fmt`` is a key of :data:`FORMATS`; the longest side is
    :func:`heatmap_side`."""
    fine = scores.finest()
    classes, slide_id = list(scores.classes), scores.slide_id
    w, h = slide.dimensions
    side = heatmap_side((w, h), slide.mpp, max_size=max_size, mpp=mpp)
    thumb, scale = read_thumbnail(slide, max(w, h) / side, max_megapixels=max_megapixels)
    if max(thumb.shape[:2]) > side:  # the read is up to twice the size: draw at the size written
        f = side / max(thumb.shape[:2])
        small = (max(1, round(thumb.shape[1] * f)), max(1, round(thumb.shape[0] * f)))
        scale *= thumb.shape[1] / small[0]
        thumb = np.asarray(Image.fromarray(thumb).resize(small, Image.Resampling.BOX))
    raster = Raster(fine, shape=thumb.shape[:2], scale=scale)
    covered = raster.covered
    cmap = matplotlib.colormaps["inferno"]
    files = class_files(classes, fmt)
    with atomic_dir(outdir) as tmp:
        _save(Image.fromarray(thumb), tmp / "thumbnail", fmt, side)
        if not covered.any():
            grey = (0.35 * thumb.astype(np.float32) + 0.65 * 160).astype(np.uint8)
            for name in [*files.values(), "argmax"]:
                img = Image.fromarray(grey)
                ImageDraw.Draw(img).text(
                    (8, 8), f"{slide_id}: no tissue tiles", fill=(0, 0, 0), font=_font(img)
                )
                _save(img, tmp / Path(name).stem, fmt, side)
            _save(Image.fromarray(grey), tmp / "argmax_thumb", fmt, THUMB_PX)
            return Path(outdir)
        best = np.full(covered.shape, -np.inf, np.float32)
        arg = np.zeros(covered.shape, np.intp)
        for k, c in enumerate(classes):  # one class image in memory at a time
            prob = raster.mean(k)
            better = prob > best  # strictly: ties keep the first class, as argmax does
            best[better], arg[better] = prob[better], k
            rgb = (cmap(prob)[..., :3] * 255).astype(np.float32)
            img = Image.fromarray(_blend(thumb, rgb, covered, alpha))
            _colorbar(img, f"P({c})", cmap)
            if scores.untrained:
                _mark_untrained(img)
            _save(img, tmp / Path(files[c]).stem, fmt, side)
            del prob, rgb, img
        pal = np.array([colors[c] for c in classes], np.float32)
        plain = Image.fromarray(_blend(thumb, pal[arg], covered, max(alpha, 0.7)))
        _save(plain, tmp / "argmax_thumb", fmt, THUMB_PX)  # no legend: the report shows one
        _legend(plain, [(c, tuple(colors[c])) for c in classes])  # type: ignore[misc]
        if scores.untrained:
            _mark_untrained(plain)
        _save(plain, tmp / "argmax", fmt, side)
        if attention is not None:
            att = attention_scores(attention, fine)
            a_raster = Raster(att, shape=thumb.shape[:2], scale=scale)
            rgb = (cmap(a_raster.mean(0))[..., :3] * 255).astype(np.float32)
            img = Image.fromarray(_blend(thumb, rgb, a_raster.covered, alpha))
            _colorbar(img, "attention (max = 1)", cmap)
            _save(img, tmp / "attention", fmt, side)
    return Path(outdir)


def attention_scores(attention: pd.DataFrame, fine: TileScores) -> TileScores:
    """A head's per-tile attention at the finest scale, scaled so its maximum is 1, as a
    one-class tile-score table (so it rasterises like the class probabilities)."""
    finest = fine.table["scale"].iloc[0] if len(fine.table) else ""
    a = attention[attention["scale"] == finest]
    top = float(a["attention"].max()) if len(a) else 1.0
    size0 = int(fine.table["size0"].iloc[0]) if len(fine.table) else 1
    table = pd.DataFrame(
        {
            "scale": a["scale"].to_numpy(),
            "mpp": 0.0,
            "x": a["x"].to_numpy(),
            "y": a["y"].to_numpy(),
            "size0": size0,
            "tissue_fraction": 1.0,
            "prob_attention": (a["attention"] / max(top, 1e-12)).to_numpy(np.float32),
            "logit_attention": a["attention"].to_numpy(np.float32),
        }
    )
    return TileScores(fine.slide_id, ("attention",), table)
