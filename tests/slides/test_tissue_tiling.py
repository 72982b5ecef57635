"""Tissue detection and nested multi-scale tiling on generated slides with planted regions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from histoalign_wsi.cli import main
from histoalign_wsi.config import load_config
from histoalign_wsi.features.store import open_store
from histoalign_wsi.slides.reader import open_slide
from histoalign_wsi.slides.synthetic import DemoSlideSpec, Region, write_slide
from histoalign_wsi.slides.tiling import tile_slide, tissue_fractions
from histoalign_wsi.slides.tissue import detect_tissue

from ..conftest import jpeg_close, read_scaled


def _truth_at(masks_json: Path, name: str, shape: tuple[int, int]) -> np.ndarray:
    meta = json.loads(masks_json.read_text())
    im = Image.open(masks_json.parent / meta["masks"][name]).resize(shape[::-1], Image.Resampling.BOX)
    return np.asarray(im) > 127


def test_tissue_iou_against_ground_truth(planted: tuple[Path, Path]) -> None:
    with open_slide(planted[0]) as s:
        res = detect_tissue(s, load_config().tissue, max_megapixels=1000)
    truth = _truth_at(planted[1], "tissue", res.mask.shape)
    iou = (truth & res.mask).sum() / (truth | res.mask).sum()
    assert iou >= 0.9
    # polygons are in level-0 pixels: their area matches the mask's
    assert res.polygons.area == pytest.approx(res.mask.sum() * res.scale**2, rel=0.05)
    minx, miny, maxx, maxy = res.polygons.bounds
    assert minx >= 0 and miny >= 0 and maxx <= 8192 and maxy <= 6144


def test_background_only_slide_gives_empty_mask_and_zero_tiles(tmp_path: Path) -> None:
    spec = DemoSlideSpec(name="blank", width=4096, height=4096, regions=())
    p = write_slide(spec, tmp_path / "blank.svs")
    assert main(["tissue", str(p), "--out", str(tmp_path / "blank.png")]) == 0
    mask = np.asarray(Image.open(tmp_path / "blank.png"))
    assert mask.max() == 0
    assert (
        main(["tile", str(p), "--tissue", str(tmp_path / "blank.png"), "--out", str(tmp_path / "b.zarr")])
        == 0
    )
    store = open_store(tmp_path / "b.zarr")
    assert all(len(store.scale(n).coords) == 0 for n in store.scale_names)
    assert store.validate() == []


@pytest.fixture(scope="module")
def tiled(planted: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tiled")
    assert main(["tissue", str(planted[0]), "--out", str(d / "m.png")]) == 0
    assert main(["tile", str(planted[0]), "--tissue", str(d / "m.png"), "--out", str(d / "t.zarr")]) == 0
    return d / "m.png", d / "t.zarr"


def test_kept_tiles_pass_threshold_and_counts_match_area(tiled: tuple[Path, Path]) -> None:
    store = open_store(tiled[1])
    mask = np.asarray(Image.open(tiled[0])) > 127
    meta = json.loads(tiled[0].with_suffix(".json").read_text())
    scale = meta["level0_px_per_mask_px"]
    tissue_area = mask.sum() * scale**2
    thr = store.attrs["tiling"]["min_tissue_fraction"]
    assert [n for n in store.scale_names] == ["0.50mpp", "1.00mpp", "2.00mpp"]
    for name in store.scale_names:
        sv = store.scale(name)
        assert len(sv.coords) > 0
        recomputed = tissue_fractions(
            mask, scale, sv.coords[:, 0].astype(np.int64), sv.coords[:, 1].astype(np.int64), sv.size0
        )
        assert (recomputed >= thr - 1e-6).all()
        np.testing.assert_allclose(sv.tissue_fraction.astype(np.float32), recomputed, atol=2e-3)
        assert (sv.coords[:, 0] + sv.size0 <= 8192).all() and (sv.coords[:, 1] + sv.size0 <= 6144).all()
    # stated tolerance: the finest grid covers the tissue area within 15 %
    fine = store.scale("0.50mpp")
    assert fine.size0 == 448
    assert abs(len(fine.coords) * fine.size0**2 - tissue_area) / tissue_area < 0.15


def test_grids_are_nested(tiled: tuple[Path, Path]) -> None:
    store = open_store(tiled[1])
    names = store.scale_names
    for i, name in enumerate(names):
        sv = store.scale(name)
        for coarser in names[i + 1 :]:
            cv = store.scale(coarser)
            par = sv.parents[coarser]
            assert par.shape == (len(sv.coords),)
            has = par >= 0
            assert has.mean() > 0.8
            pc = cv.coords[par[has]]
            fc = sv.coords[has]
            assert (fc >= pc).all() and (fc + sv.size0 <= pc + cv.size0).all()
            # tiles without a parent really have no kept coarse tile around them
            kept = {tuple(c) for c in cv.coords.tolist()}
            for x, y in sv.coords[~has].tolist():
                assert ((x // cv.size0) * cv.size0, (y // cv.size0) * cv.size0) not in kept


def test_tiling_is_deterministic(planted: tuple[Path, Path], tmp_path: Path) -> None:
    for i in range(2):
        assert main(["tile", str(planted[0]), "--out", str(tmp_path / f"{i}.zarr")]) == 0
    a, b = open_store(tmp_path / "0.zarr"), open_store(tmp_path / "1.zarr")
    for n in a.scale_names:
        np.testing.assert_array_equal(a.scale(n).coords, b.scale(n).coords)


def test_store_layout_has_scale_tags(tiled: tuple[Path, Path]) -> None:
    root = zarr.open_group(tiled[1], mode="r")
    assert root.attrs["schema"] == "histoalign-features/1"
    g = root["scales/1.00mpp"]
    assert g.attrs["mpp"] == 1.0 and g.attrs["level0_tile_size"] == 896 and g.attrs["tile_px"] == 224
    assert g["coords"].dtype == np.int32 and g["tissue_fraction"].dtype == np.float16
    assert "2.00mpp" in list(g["parent"].array_keys())


def test_tile_at_1mpp_is_2x2_downsample_of_05mpp_tiles(planted: tuple[Path, Path]) -> None:
    with open_slide(planted[0]) as s:
        x, y = 3584, 2688  # inside tissue; 1.0 µm/px tile = 896 level-0 px, read from level 1
        coarse = read_scaled(s, (x, y), 896, 224)
        quad = np.zeros((448, 448, 3), np.uint8)
        for dy in (0, 1):
            for dx in (0, 1):
                quad[dy * 224 : (dy + 1) * 224, dx * 224 : (dx + 1) * 224] = read_scaled(
                    s, (x + dx * 448, y + dy * 448), 448, 224
                )
        down = quad.reshape(224, 2, 224, 2, 3).astype(np.float32).mean(axis=(1, 3)).round().astype(np.uint8)
        assert s.best_level(4.0) == 1 and s.best_level(2.0) == 0
        jpeg_close(coarse, down)


def test_slide_smaller_than_a_coarse_tile(tmp_path: Path) -> None:
    spec = DemoSlideSpec(name="small", width=1600, height=1500, regions=(Region(1, 800, 750, 780, 740),))
    p = write_slide(spec, tmp_path / "small.svs")
    cfg = load_config()
    with open_slide(p) as s:
        res = detect_tissue(s, cfg.tissue, max_megapixels=cfg.max_read_megapixels)
        t = tile_slide(
            res.mask, mask_scale=res.scale, slide_mpp=s.mpp, level0_dims=s.dimensions, params=cfg.tiling
        )
    counts = {g.name: len(g) for g in t.scales}
    assert counts["2.00mpp"] == 0  # a 1792 px tile does not fit in 1600 x 1500
    assert counts["0.50mpp"] > 0 and counts["1.00mpp"] > 0
    assert (t.scales[0].parents["2.00mpp"] == -1).all()


def test_downsample_check_catches_a_misplaced_read(planted: tuple[Path, Path]) -> None:
    with open_slide(planted[0]) as s:
        a = read_scaled(s, (3584, 2688), 896, 224)
        b = read_scaled(s, (3584 + 300, 2688 + 500), 896, 224)
    with pytest.raises(AssertionError):
        jpeg_close(a, b)
