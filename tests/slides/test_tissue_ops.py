"""The tissue mask's image operations (OpenCV) against their scikit-image counterparts,
on random masks and images where connectivity, size rules and borders all show."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from skimage import filters, morphology

from histoalign_wsi.config import load_config
from histoalign_wsi.slides.tissue import (
    binary_closing,
    disk,
    median3,
    otsu_threshold,
    remove_small_components,
    tissue_mask,
)


def _blobs(seed: int, shape: tuple[int, int] = (97, 113), p: float = 0.45) -> np.ndarray:
    """Random speckle: many components of 1 to dozens of pixels, diagonal-only contacts
    (4- and 8-connectivity differ), holes and components touching the edges."""
    return np.random.default_rng(seed).random(shape) < p


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_size", [1, 3, 8, 40])
def test_remove_small_components_is_scikit_image_remove_small_objects(seed: int, max_size: int) -> None:
    m = _blobs(seed)
    ours = remove_small_components(m, max_size)
    ref = morphology.remove_small_objects(m, max_size=max_size)
    assert ours.dtype == bool and np.array_equal(ours, ref)
    assert ours.sum() < m.sum()  # the case removes something


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_size", [1, 5, 30])
def test_inverted_removal_is_scikit_image_remove_small_holes(seed: int, max_size: int) -> None:
    m = _blobs(seed, p=0.6)
    ours = ~remove_small_components(~m, max_size)
    assert np.array_equal(ours, morphology.remove_small_holes(m, max_size=max_size))
    assert ours.sum() > m.sum()


def test_component_removal_of_empty_and_full_masks() -> None:
    z = np.zeros((5, 6), bool)
    assert not remove_small_components(z, 3).any()
    assert remove_small_components(~z, 3).all()  # one component of 30 px stays
    assert not remove_small_components(~z, 30).any()  # 30 px or fewer: removed


@pytest.mark.parametrize("r", [1, 2, 5])
def test_disk_and_closing_are_scikit_image_s(r: int) -> None:
    assert np.array_equal(disk(r), morphology.disk(r))
    m = _blobs(r, p=0.3)
    m[:, :3] = True  # tissue at the image edge: padded, not eroded from outside
    ref = morphology.closing(np.pad(m, r), morphology.disk(r))[r:-r, r:-r]
    ours = binary_closing(m, r)
    assert np.array_equal(ours, ref) and ours.sum() > m.sum()


@pytest.mark.parametrize("seed", range(3))
def test_median_and_otsu_are_scikit_image_s(seed: int) -> None:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (61, 47), dtype=np.uint8)
    img[10:30, 5:40] = rng.integers(150, 230, (20, 35), dtype=np.uint8)  # a bright planted block
    assert np.array_equal(median3(img), filters.median(img, np.ones((3, 3), bool)))
    assert otsu_threshold(img) == pytest.approx(float(filters.threshold_otsu(img)))
    assert otsu_threshold(np.full((4, 4), 7, np.uint8)) is None  # constant: no threshold
    assert np.array_equal(median3(img[:2]), img[:2])  # too small to filter


def test_tissue_mask_keeps_a_planted_tissue_block_and_drops_specks_and_holes() -> None:
    """Glass with a pink block holding a small hole, a pink speck and a dark speck: the
    mask is the block with its hole filled, nothing else."""
    rgb = np.full((200, 200, 3), 242, np.uint8)
    rgb[40:160, 50:170] = (200, 120, 170)
    rgb[90:94, 100:104] = 242  # a 16 px hole (closed: 16 mask px at 8 µm, 1024 µm²)
    rgb[10:12, 10:12] = (200, 120, 170)  # 4 px speck
    rgb[180:183, 20:23] = (20, 20, 20)  # too dark: not tissue
    params = replace(load_config().tissue, closing_um=16.0, min_area_um2=10_000, max_hole_um2=5_000)
    mask, thr = tissue_mask(rgb, mask_mpp=8.0, params=params)
    want = np.zeros((200, 200), bool)
    want[40:160, 50:170] = True
    want[[40, 40, 159, 159], [50, 169, 50, 169]] = False  # a 3 x 3 median rounds square corners
    assert np.array_equal(mask, want)
    assert params.min_saturation <= thr <= 0.2
