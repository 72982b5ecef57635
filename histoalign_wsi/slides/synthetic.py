"""Generated pyramidal slides with planted tissue regions and their ground-truth masks.

Slides are written tile by tile (a 100k x 100k slide never sits in memory): each class
has a texture of period ``TILE`` at level 0, and every pyramid level uses that texture
area-averaged to the level's downsample, so level k is (up to JPEG error) the downsample
of level 0. Tiles that lie wholly inside one class are identical, so their JPEG bytes are
encoded once and reused; only boundary tiles are encoded individually.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import tifffile
from numpy.typing import NDArray
from PIL import Image

from .._atomic import atomic_file

__all__ = [
    "CLASS_CODES",
    "DemoSlideSpec",
    "Region",
    "demo_cohort",
    "make_demo_cohort",
    "render_labels",
    "restain",
    "write_slide",
]

log = logging.getLogger(__name__)

TILE = 256
BACKGROUND = 0
#: class index -> code (the NCT-CRC-HE codes used by the shipped ``crc`` prompt bag)
CLASS_CODES: dict[int, str] = {0: "BACK", 1: "TUM", 2: "STR", 3: "LYM"}


@dataclass(frozen=True)
class Region:
    """An ellipse of one class, in level-0 pixels; later regions paint over earlier ones."""

    cls: int
    cx: float
    cy: float
    rx: float
    ry: float
    angle: float = 0.0


@dataclass(frozen=True)
class DemoSlideSpec:
    name: str
    width: int
    height: int
    regions: tuple[Region, ...]
    mpp: float = 0.25
    objective: float = 40.0
    fmt: str = "svs"  # "svs" (Aperio) or "ome" (OME-TIFF)
    seed: int = 0
    quality: int = 90
    #: a site's stain: each channel's optical density scaled (Beer-Lambert: a stain mix
    #: that absorbs more or less in red, green, blue); None = the textures as they are
    stain_od: tuple[float, float, float] | None = None


def render_labels(
    regions: Sequence[Region], xs: NDArray[np.floating[Any]], ys: NDArray[np.floating[Any]]
) -> NDArray[np.uint8]:
    """Class label at level-0 points (``xs`` along columns, ``ys`` along rows)."""
    gx, gy = np.meshgrid(xs, ys)
    out = np.zeros(gx.shape, dtype=np.uint8)
    for r in regions:
        c, s = math.cos(r.angle), math.sin(r.angle)
        dx, dy = gx - r.cx, gy - r.cy
        u = (dx * c + dy * s) / r.rx
        v = (-dx * s + dy * c) / r.ry
        out[u * u + v * v <= 1.0] = r.cls
    return out


def _disc_texture(
    rng: np.random.Generator,
    base: tuple[int, int, int],
    dot: tuple[int, int, int],
    n: int,
    rmin: float,
    rmax: float,
) -> NDArray[np.uint8]:
    img = np.empty((TILE, TILE, 3), np.float32)
    img[:] = base
    yy, xx = np.mgrid[0:TILE, 0:TILE]
    for _ in range(n):
        cx, cy = rng.uniform(0, TILE, 2)
        r = rng.uniform(rmin, rmax)
        # periodic distance so the texture tiles seamlessly
        dx = np.minimum(np.abs(xx - cx), TILE - np.abs(xx - cx))
        dy = np.minimum(np.abs(yy - cy), TILE - np.abs(yy - cy))
        img[dx * dx + dy * dy <= r * r] = dot
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _fibre_texture(rng: np.random.Generator) -> NDArray[np.uint8]:
    yy, xx = np.mgrid[0:TILE, 0:TILE].astype(np.float32)
    phase = 2 * math.pi * (yy / TILE * 6 + 0.35 * np.sin(2 * math.pi * xx / TILE * 2))
    fibre = (np.sin(phase) > 0.55).astype(np.float32)
    base = np.array([236, 164, 196], np.float32)
    dark = np.array([205, 110, 160], np.float32)
    img = base + fibre[..., None] * (dark - base)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def class_textures(seed: int) -> dict[int, NDArray[np.uint8]]:
    """Level-0 texture (TILE x TILE, periodic) of each class."""
    rng = np.random.default_rng(seed)
    bg = np.clip(np.full((TILE, TILE, 3), 244.0) + rng.normal(0, 1.5, (TILE, TILE, 3)), 0, 255)
    return {
        0: bg.astype(np.uint8),
        1: _disc_texture(rng, (196, 150, 206), (78, 38, 128), 70, 12, 18),
        2: _fibre_texture(rng),
        3: _disc_texture(rng, (226, 190, 220), (52, 28, 110), 260, 6, 8),
    }


def restain(
    textures: dict[int, NDArray[np.uint8]], stain_od: tuple[float, float, float] | None
) -> dict[int, NDArray[np.uint8]]:
    """Each texture with its optical density scaled per channel (``stain_od``): the same
    tissue as another site's scanner and staining protocol would show it."""
    if stain_od is None:
        return textures
    k = np.asarray(stain_od, np.float64)
    out = {}
    for c, t in textures.items():
        od = -np.log((t.astype(np.float64) + 1.0) / 256.0)
        out[c] = np.clip(256.0 * np.exp(-od * k) - 1.0, 0, 255).round().astype(np.uint8)
    return out


def _downsample_texture(tex: NDArray[np.uint8], d: int) -> NDArray[np.uint8]:
    """Area-average the periodic texture by ``d`` and tile it back to TILE x TILE."""
    if d == 1:
        return tex
    if d >= TILE:
        mean = tex.reshape(-1, 3).mean(axis=0)
        return np.broadcast_to(np.round(mean).astype(np.uint8), tex.shape).copy()
    small = tex.reshape(TILE // d, d, TILE // d, d, 3).astype(np.float32).mean(axis=(1, 3))
    reps = d
    return np.round(np.tile(small, (reps, reps, 1))).astype(np.uint8)


def _levels(width: int, height: int) -> list[int]:
    """Aperio-style pyramid: downsample x4 until the level fits in ~1024 px."""
    ds = [1]
    while max(width, height) / ds[-1] > 1024 and len(ds) < 8:
        ds.append(ds[-1] * 4)
    return ds


def _bbox_hits(r: Region, x0: float, x1: float, y0: float, y1: float) -> bool:
    rad = max(r.rx, r.ry)  # the rotated ellipse lies inside this square
    return not (x1 < r.cx - rad or x0 > r.cx + rad or y1 < r.cy - rad or y0 > r.cy + rad)


def _encode(tile: NDArray[np.uint8], quality: int) -> bytes:
    # the same JPEG flavour tifffile writes for photometric='rgb': YCbCr, 2x2 subsampling
    data = imagecodecs.jpeg8_encode(
        tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
    )
    return bytes(data)


def _level_tiles(spec: DemoSlideSpec, d: int, textures: dict[int, NDArray[np.uint8]]) -> Iterator[bytes]:
    lw, lh = math.ceil(spec.width / d), math.ceil(spec.height / d)
    texs = {c: _downsample_texture(t, d) for c, t in textures.items()}
    cache: dict[int, bytes] = {}
    for ty in range(0, lh, TILE):
        ys = (np.arange(ty, ty + TILE) + 0.5) * d
        for tx in range(0, lw, TILE):
            xs = (np.arange(tx, tx + TILE) + 0.5) * d
            x0, x1, y0, y1 = xs[0], xs[-1], ys[0], ys[-1]
            near = [r for r in spec.regions if _bbox_hits(r, x0, x1, y0, y1)]
            if not near:  # far from every region: background, no per-pixel work
                if BACKGROUND not in cache:
                    cache[BACKGROUND] = _encode(texs[BACKGROUND], spec.quality)
                yield cache[BACKGROUND]
                continue
            labels = render_labels(spec.regions, xs, ys)
            # pixels past the slide edge are background
            labels[:, xs >= spec.width] = BACKGROUND
            labels[ys >= spec.height, :] = BACKGROUND
            first = int(labels[0, 0])
            if (labels == first).all():
                if first not in cache:
                    cache[first] = _encode(texs[first], spec.quality)
                yield cache[first]
                continue
            tile = np.empty((TILE, TILE, 3), np.uint8)
            for c, t in texs.items():
                sel = labels == c
                tile[sel] = t[sel]
            yield _encode(tile, spec.quality)


def write_slide(spec: DemoSlideSpec, path: str | Path) -> Path:
    """Write ``spec`` as a pyramidal JPEG-tiled TIFF (Aperio SVS or OME-TIFF), atomically."""
    path = Path(path)
    textures = restain(class_textures(spec.seed), spec.stain_od)
    levels = _levels(spec.width, spec.height)
    bigtiff = spec.width * spec.height > 2**28
    common = {
        "dtype": np.uint8,
        "tile": (TILE, TILE),
        "compression": "jpeg",
        "photometric": "rgb",
    }
    res = (1e4 / spec.mpp, 1e4 / spec.mpp)
    with (
        atomic_file(path, keep_identical=True) as tmp,  # a rerun leaves an identical slide untouched
        tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=spec.fmt == "ome") as tif,
    ):
        for i, d in enumerate(levels):
            lw, lh = math.ceil(spec.width / d), math.ceil(spec.height / d)
            kwargs: dict[str, object] = dict(common)
            if spec.fmt == "svs":
                size = f"{spec.width}x{spec.height}"
                head = (
                    f"Aperio Image Library v12.0.15 \r\n{size} [0,0 {size}] ({TILE}x{TILE}) "
                    f"JPEG/RGB Q={spec.quality}"
                )
                if i > 0:
                    head += f" -> {lw}x{lh}"
                kwargs["description"] = (
                    f"{head}|AppMag = {spec.objective:g}|MPP = {spec.mpp:g}"
                    f"|Filename = {spec.name}|Generator = histoalign-wsi synthetic"
                )
                kwargs["resolution"] = (res[0] / d, res[1] / d)
                kwargs["resolutionunit"] = "CENTIMETER"
                kwargs["metadata"] = None
            elif i == 0:
                kwargs["subifds"] = len(levels) - 1
                kwargs["metadata"] = {
                    "axes": "YXS",
                    "Name": spec.name,
                    "UUID": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'histoalign-demo/{spec}')}",
                    "PhysicalSizeX": spec.mpp,
                    "PhysicalSizeXUnit": "µm",
                    "PhysicalSizeY": spec.mpp,
                    "PhysicalSizeYUnit": "µm",
                }
                kwargs["resolution"] = res
                kwargs["resolutionunit"] = "CENTIMETER"
            else:
                kwargs["subfiletype"] = 1
                kwargs["metadata"] = None
            tif.write(_level_tiles(spec, d, textures), shape=(lh, lw, 3), **kwargs)  # type: ignore[arg-type]
            if spec.fmt == "svs" and i == 0:
                # Aperio convention: the second directory is a stripped thumbnail
                tif.write(
                    _thumbnail(spec, textures),
                    photometric="rgb",
                    compression="jpeg",
                    description=f"Aperio Image Library v12.0.15 \r\n{spec.width}x{spec.height} -> thumbnail",
                    metadata=None,
                )
    return path


def _thumbnail(spec: DemoSlideSpec, textures: dict[int, NDArray[np.uint8]]) -> NDArray[np.uint8]:
    s = max(spec.width, spec.height) / 768
    xs = (np.arange(int(spec.width / s)) + 0.5) * s
    ys = (np.arange(int(spec.height / s)) + 0.5) * s
    labels = render_labels(spec.regions, xs, ys)
    colours = np.stack([textures[c].reshape(-1, 3).mean(axis=0) for c in sorted(textures)])
    return np.round(colours[labels]).astype(np.uint8)


def mask_scale_for(spec: DemoSlideSpec, max_size: int = 2048) -> int:
    """Level-0 pixels per ground-truth mask pixel (a power of two)."""
    s = 1
    while max(spec.width, spec.height) / s > max_size:
        s *= 2
    return s


def write_masks(spec: DemoSlideSpec, outdir: str | Path) -> dict[str, object]:
    """Ground-truth PNG per class (and ``tissue``) at a stated scale; returns the index."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    s = mask_scale_for(spec)
    xs = (np.arange(math.ceil(spec.width / s)) + 0.5) * s
    ys = (np.arange(math.ceil(spec.height / s)) + 0.5) * s
    labels = render_labels(spec.regions, xs, ys)
    files: dict[str, str] = {}
    present = sorted({r.cls for r in spec.regions})
    for c in present:
        name = CLASS_CODES[c]
        with atomic_file(outdir / f"{name}.png", keep_identical=True) as tmp:
            Image.fromarray(((labels == c) * 255).astype(np.uint8)).save(tmp, format="PNG")
        files[name] = f"{name}.png"
    with atomic_file(outdir / "tissue.png", keep_identical=True) as tmp:
        Image.fromarray(((labels != BACKGROUND) * 255).astype(np.uint8)).save(tmp, format="PNG")
    files["tissue"] = "tissue.png"
    index: dict[str, object] = {
        "slide": spec.name,
        "level0_px_per_mask_px": s,
        "level0_dims": [spec.width, spec.height],
        "masks": files,
    }
    with atomic_file(outdir / "masks.json", keep_identical=True) as tmp:
        tmp.write_text(json.dumps(index, indent=2))
    return index


def demo_cohort(
    n: int = 4, *, width: int = 16384, height: int = 12288, seed: int = 0, ome_every: int = 4
) -> list[tuple[DemoSlideSpec, str]]:
    """A small cohort: slides alternate between tumour- and stroma-dominant (the label)."""
    rng = np.random.default_rng(seed)
    out: list[tuple[DemoSlideSpec, str]] = []
    for i in range(n):
        dominant, minor = (1, 2) if i % 2 == 0 else (2, 1)
        cx, cy = width * rng.uniform(0.45, 0.55), height * rng.uniform(0.45, 0.55)
        rx, ry = width * rng.uniform(0.30, 0.36), height * rng.uniform(0.30, 0.36)
        regions = [
            Region(dominant, cx, cy, rx, ry, rng.uniform(-0.3, 0.3)),
            Region(minor, cx + rx * 0.45, cy - ry * 0.2, rx * 0.32, ry * 0.35),
            Region(3, cx - rx * 0.5, cy + ry * 0.35, rx * 0.12, ry * 0.14),
        ]
        fmt = "ome" if ome_every and (i + 1) % ome_every == 0 else "svs"
        spec = DemoSlideSpec(
            name=f"demo_{i + 1:02d}",
            width=width,
            height=height,
            regions=tuple(regions),
            fmt=fmt,
            seed=seed + i,
        )
        out.append((spec, CLASS_CODES[dominant]))
    return out


def slide_filename(spec: DemoSlideSpec) -> str:
    return f"{spec.name}.ome.tiff" if spec.fmt == "ome" else f"{spec.name}.svs"


def make_demo_cohort(
    outdir: str | Path,
    *,
    n: int = 4,
    width: int = 16384,
    height: int = 12288,
    seed: int = 0,
    ome_every: int = 4,
    masks_dir: str | Path | None = None,
) -> list[Path]:
    """Write the demo cohort: slides in ``outdir``; masks and ``labels.csv`` in ``masks_dir``
    (default ``outdir/../<outdir name>_truth``) so the slide folder holds only slides."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    truth = Path(masks_dir) if masks_dir else outdir.parent / f"{outdir.name}_truth"
    truth.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    rows: list[tuple[str, str]] = []
    for spec, label in demo_cohort(n, width=width, height=height, seed=seed, ome_every=ome_every):
        p = write_slide(spec, outdir / slide_filename(spec))
        write_masks(spec, truth / spec.name)
        log.info("wrote %s (%dx%d, %s)", p, spec.width, spec.height, spec.fmt)
        paths.append(p)
        rows.append((spec.name, label))
    with atomic_file(truth / "labels.csv", keep_identical=True) as tmp, tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label"])
        w.writerows(rows)
    return paths
