"""Native JPEG tiles against the OpenSlide path: which files and levels take it, identical
full-resolution pixels, DCT-scaled pixels within JPEG tolerance of an area downsample,
each tile decoded once, and features from both paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from histoalign_wsi.cli import main
from histoalign_wsi.features.store import open_store
from histoalign_wsi.slides.native_jpeg import open_native_jpeg
from histoalign_wsi.slides.reader import open_slide

from ..conftest import CMU, shared


def test_which_slides_and_levels_take_the_native_path(
    planted: tuple[Path, Path], planted_ome: Path, tmp_path: Path
) -> None:
    with open_slide(planted[0]) as s:  # generated Aperio SVS: JPEG tiles (YCbCr) at every tiled level
        assert [s.pixel_path(i) for i in range(s.level_count)] == ["native-jpeg"] * s.level_count
    with open_slide(planted_ome) as s:  # generated OME-TIFF through tiffslide: JPEG tiles too
        assert s.reader == "tiffslide" and s.pixel_path(0) == "native-jpeg"
    with open_slide(CMU) as s:  # real Aperio: RGB JPEG tiles with shared tables; one tiled level
        assert [s.pixel_path(i) for i in range(s.level_count)] == ["native-jpeg"]
    raw = tmp_path / "raw.tif"  # uncompressed tiled TIFF: the backend's path
    tifffile.imwrite(raw, np.zeros((512, 512, 3), np.uint8), tile=(256, 256), photometric="rgb")
    with open_slide(raw, mpp_override=0.5) as s:
        assert s.pixel_path(0) == s.reader and s.read_scaled((0, 0), 0, (256, 256), 2) is None


@pytest.mark.parametrize(
    ("name", "kind"),
    [("aperio_svs/tcga-cr-7395-01a-01-ts1.svs", "JPEG 2000"), ("dicom_wsi/wsi2dcm_jpeg.dicom", "DICOM")],
)
def test_jpeg2000_and_dicom_keep_the_openslide_path(name: str, kind: str) -> None:
    path = shared("wsi", *name.split("/"))
    with open_slide(path) as s:
        assert all(s.pixel_path(i) == s.reader for i in range(s.level_count)), kind
        assert s.native_jpeg() is None


def _full(slide_path: Path, level: int, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The same box through OpenSlide and natively at full resolution."""
    x, y, w, h = box
    with open_slide(slide_path) as s:
        d = s.level_downsamples[level]
        ref = s.read_region((int(x * d), int(y * d)), level, (w, h))
        nat = s.read_scaled((int(x * d), int(y * d)), level, (w, h), 1)
    assert nat is not None
    return ref, nat


@pytest.mark.parametrize(
    ("which", "level", "box"),
    [
        ("cmu", 0, (700, 1210, 700, 500)),  # across 240-px tiles with shared JPEG tables
        ("cmu", 0, (1920, 2640, 400, 400)),  # over the right and bottom edges: partial tiles, white beyond
        ("planted", 0, (1000, 900, 1300, 700)),
        ("planted", 1, (0, 0, 2048, 1536)),
    ],
)
def test_full_resolution_decodes_are_identical(
    which: str, level: int, box: tuple[int, int, int, int], planted: tuple[Path, Path]
) -> None:
    ref, nat = _full(CMU if which == "cmu" else planted[0], level, box)
    assert ref.shape == nat.shape
    assert np.array_equal(ref, nat)
    assert ref.std() > 5  # real content, not a blank box


@pytest.mark.parametrize("scale", [2, 4, 8])
@pytest.mark.parametrize("which", ["cmu", "planted"])
def test_dct_scaled_decodes_match_an_area_downsample(
    which: str, scale: int, planted: tuple[Path, Path]
) -> None:
    path = CMU if which == "cmu" else planted[0]
    box = (720, 960, 1440, 960) if which == "cmu" else (1024, 1024, 2048, 2048)
    ref, _ = _full(path, 0, box)
    area = np.asarray(Image.fromarray(ref).reduce(scale)).astype(np.int16)
    with open_slide(path) as s:
        got = s.read_scaled((box[0], box[1]), 0, (box[2], box[3]), scale)
    assert got is not None and got.shape == area.shape
    mad = np.abs(got.astype(np.int16) - area).mean(axis=(0, 1))
    assert (mad <= 2.0).all(), mad
    # a scaled read that landed one output pixel off would differ by far more
    shifted = np.abs(got[1:, 1:].astype(np.int16) - area[:-1, :-1]).mean()
    assert shifted > 2 * mad.mean()


def test_each_native_tile_is_decoded_once(planted: tuple[Path, Path]) -> None:
    with open_slide(planted[0]) as s:
        nj = open_native_jpeg(s.path, s.level_dimensions)
        assert nj is not None
        # two side-by-side boxes sharing one column of 256-px tiles
        a = nj.read_region(0, 0, 0, 384, 256, 2)
        b = nj.read_region(0, 384, 0, 384, 256, 2)
        assert nj.decoded == 3  # tiles 0, 1 (shared, kept) and 2
        both = nj.read_region(0, 0, 0, 768, 256, 2)
        assert np.array_equal(np.concatenate([a, b], axis=1), both)
        with pytest.raises(ValueError, match="not aligned to scale 2"):
            nj.read_region(0, 1, 0, 384, 256, 2)
        nj.close()


def test_features_from_both_paths_agree(tmp_path: Path, planted: tuple[Path, Path]) -> None:
    """The generated slide at 0.25 µm/px with scales 0.5/1/2 µm/px: the native path
    decodes at 1/2 (DCT) what OpenSlide reads whole; the demo encoder's features agree."""
    slide = planted[0]
    tiles = tmp_path / "tiles.zarr"
    assert main(["tile", str(slide), "--out", str(tiles)]) == 0
    for name, flag in (("native", "true"), ("openslide", "false")):
        out = tmp_path / f"{name}.zarr"
        opts = ["--set", f"encode.native_jpeg={flag}", "--set", "encode.batch_size=32"]
        assert main(["encode", str(tiles), "--slide", str(slide), "--out", str(out), *opts]) == 0
    a, b = open_store(tmp_path / "native.zarr"), open_store(tmp_path / "openslide.zarr")
    for sc in a.scale_names:
        fa, fb = a.features(sc, "demo").astype(np.float32), b.features(sc, "demo").astype(np.float32)
        cos = (fa * fb).sum(axis=1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
        assert len(cos) and cos.min() >= 0.995, (sc, cos.min())
