"""Shared fixtures: generated pyramidal slides with planted regions, real shared data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histoalign_wsi.config import Config, load_config
from histoalign_wsi.slides.reader import Slide
from histoalign_wsi.slides.synthetic import DemoSlideSpec, Region, write_masks, write_slide

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
SHARED = Path(os.environ.get("HISTOALIGN_SHARED_DATA", REPO.parent / "shared" / "data"))
CMU = TEST_DATA / "CMU-1-Small-Region.svs"

# tumour ellipse with a stroma ellipse inside it and a lymphocyte blob
SPEC = DemoSlideSpec(
    name="planted",
    width=8192,
    height=6144,
    regions=(
        Region(1, 4000, 3000, 2900, 2100, 0.2),
        Region(2, 5200, 2600, 1000, 800),
        Region(3, 2400, 3800, 500, 450),
    ),
    seed=3,
)


def shared(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data {p} not present")
    return p


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(slide, masks.json) of a generated Aperio slide with planted regions."""
    d = tmp_path_factory.mktemp("planted")
    slide = write_slide(SPEC, d / "planted.svs")
    write_masks(SPEC, d / "truth")
    return slide, d / "truth" / "masks.json"


@pytest.fixture(scope="session")
def planted_ome(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ome")
    spec = DemoSlideSpec(
        name="ome", width=4096, height=3072, fmt="ome", regions=(Region(2, 2000, 1500, 1400, 1000),), seed=1
    )
    return write_slide(spec, d / "ome.ome.tiff")


@pytest.fixture()
def cfg() -> Config:
    return load_config(overrides={"encode": {"batch_size": 32}})


def jpeg_close(a: np.ndarray, b: np.ndarray, *, mean_tol: float = 6.0, p99_tol: float = 40.0) -> None:
    """Equal within JPEG error (quality 90, 4:2:0 chroma on both levels); a misplaced or
    mis-scaled read differs by tens of grey levels on these textures."""
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert d.mean() < mean_tol, d.mean()
    assert np.percentile(d, 99) < p99_tol, np.percentile(d, 99)


def read_scaled(slide: Slide, location: tuple[int, int], size0: int, out_px: int) -> np.ndarray:
    """Reference reader: one tile of ``size0`` level-0 px, read alone and resampled to
    ``out_px`` (area average) with Pillow; independent of the encode pipeline."""
    level = slide.best_level(size0 / out_px)
    n = max(1, round(size0 / slide.level_downsamples[level]))
    arr = slide.read_region(location, level, (n, n))
    if n == out_px:
        return arr
    return np.asarray(Image.fromarray(arr).resize((out_px, out_px), Image.Resampling.BOX))
